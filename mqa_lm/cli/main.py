"""The entry of every command line: one line on stderr and exit status 2 for a bad input.

Hydra composes the config and creates the run directory before an ``@hydra.main`` function runs, so
a config file with a YAML syntax error, or a ``hydra.run.dir`` that cannot be created (under a file,
on a read-only file system), reaches the user as Hydra's traceback with exit status 1, and no
``try`` in the function can catch it. :func:`hydra_main` is ``hydra.main`` with that part checked
first: before handing the command to Hydra, it composes the config exactly as Hydra will (the same
arguments, search path, ``--config-dir`` and run mode) and stops with one line when

* a config file does not parse: ``config error: <file>:<line>:<column>: <problem>; fix the YAML
  syntax of that file``;
* composition fails otherwise (an unknown option, a bad override): ``config error: <Hydra's
  message, on one line>``;
* the run directory (``hydra.run.dir``; ``hydra.sweep.dir`` with ``--multirun``) cannot be created
  or written: ``config error: hydra.run.dir=<dir> cannot be created: <what is in the way>; choose
  another hydra.run.dir``.

Nothing is created by the check; Hydra then composes again and runs the function as usual. Help,
``--cfg``, ``--info`` and shell completion go to Hydra unchecked. The module does not import
Lightning (an import-linter contract holds it), so generation and evaluation commands can use it.

Usage in an entry point (``train.py`` does exactly this)::

    from mqa_lm.cli.main import fail, hydra_main

    @hydra_main(config_path="configs", config_name="train")
    def main(cfg: DictConfig) -> None:
        try:
            run(cfg)
        except ConfigError as err:
            fail("config error", err)  # prints "config error: <message>" on stderr, exits with status 2

    if __name__ == "__main__":
        main()

A script that keeps ``@hydra.main`` can call :func:`check_hydra_command` itself before it, and
:func:`config_file_error` / :func:`mqa_lm.utils.files.dir_write_problem` are the pieces it is made of.
"""

from __future__ import annotations

import functools
import os
import re
import sys
from collections.abc import Callable, Collection
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

from mqa_lm.utils.files import dir_write_problem

if TYPE_CHECKING:
    from omegaconf import DictConfig

EXIT_BAD_INPUT = 2
F = TypeVar("F", bound=Callable[..., Any])


class UsageError(ValueError):
    """A bad option of a command: printed by its ``main`` as one ``config error:`` line naming the
    option, exit status 2, before any work."""


def fail(prefix: str, message: object, status: int = EXIT_BAD_INPUT) -> NoReturn:
    """Print ``<prefix>: <message>`` as one line on stderr and exit with ``status`` (2: a bad input)."""
    text = " ".join(str(message).split("\n"))
    print(f"{prefix}: {text}" if prefix else text, file=sys.stderr, flush=True)
    raise SystemExit(status)


def config_file_error(err: BaseException) -> str | None:
    """``<file>:<line>:<column>: <problem> (<context>); fix the YAML syntax of that file`` for a YAML
    syntax error (PyYAML's ``MarkedYAMLError``; lines and columns from 1); None for anything else."""
    import yaml

    if not isinstance(err, yaml.MarkedYAMLError):
        return None
    mark = err.problem_mark or err.context_mark
    where = f"{mark.name}:{mark.line + 1}:{mark.column + 1}" if mark is not None else "a config file"
    context = err.context
    if context and err.context_mark is not None and mark is not err.context_mark:
        context = f"{context} at line {err.context_mark.line + 1}, column {err.context_mark.column + 1}"
    problem = err.problem or "invalid YAML"
    return f"{where}: {problem}" + (f" ({context})" if context else "") + "; fix the YAML syntax of that file"


def _one_line(err: BaseException) -> str:
    """Hydra's message for a composition error (and its OmegaConf cause, as Hydra prints it) as one line."""
    from omegaconf.errors import OmegaConfBaseException

    parts = [str(err).split("\nConfig search path")[0]]  # Hydra's search path listing says nothing to fix
    if isinstance(err.__cause__, OmegaConfBaseException):
        parts.append(str(err.__cause__))
    pieces: list[str] = []
    listing = False  # under a line ending in ':', e.g. Hydra's "Available options in 'model':"
    for line in (" ".join(line.split()) for part in parts for line in part.splitlines()):
        if not line:
            listing = False
        elif listing and pieces:
            pieces[-1] += (" " if pieces[-1].endswith(":") else ", ") + line
        else:
            pieces.append(line)
            listing = line.endswith(":")
    return "; ".join(pieces)


def run_dir_error(key: str, directory: str) -> str | None:
    """``<key>=<directory> cannot be created: <why>; choose another <key>``, or None when Hydra can
    create ``directory`` and write into it (see :func:`mqa_lm.utils.files.dir_write_problem`)."""
    problem = dir_write_problem(directory)
    if problem is None:
        return None
    verb = "written" if Path(directory).expanduser().is_dir() else "created"
    return f"{key}={directory} cannot be {verb}: {problem}; choose another {key}"


def check_hydra_command(
    task_function: Callable[..., Any],
    config_path: str | None,
    config_name: str | None,
    argv: list[str],
) -> str | None:
    """The one-line error (without its ``config error:`` prefix) that stops the Hydra command ``argv``
    of ``task_function`` before Hydra runs it, or None when there is none (see the module docstring).

    ``config_path`` and ``config_name`` are what is given to ``hydra.main``. Uses Hydra's own argument
    parser, search path and composition, so the config checked is the one the task will get.
    """
    return _check_and_compose(task_function, config_path, config_name, argv)[0]


def _check_and_compose(
    task_function: Callable[..., Any],
    config_path: str | None,
    config_name: str | None,
    argv: list[str],
) -> tuple[str | None, DictConfig | None]:
    """:func:`check_hydra_command`'s message, and the config it composed (None where it composed none:
    help, ``--cfg``, a rerun, a config that does not compose)."""
    from hydra._internal.hydra import Hydra
    from hydra._internal.utils import (
        create_automatic_config_search_path,
        detect_calling_file_or_module_from_task_function,
        detect_task_name,
        get_args_parser,
    )
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.errors import CompactHydraException
    from hydra.types import RunMode
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    args = get_args_parser().parse_args(argv)
    if args.help or args.hydra_help or args.cfg or args.info or args.shell_completion:
        return None, None
    if getattr(args, "experimental_rerun", None) is not None:  # a pickled config, not composed
        return None, None
    config_name = args.config_name if args.config_name is not None else config_name
    config_path = args.config_path if args.config_path is not None else config_path
    calling_file, calling_module = detect_calling_file_or_module_from_task_function(task_function)
    search_path = create_automatic_config_search_path(calling_file, calling_module, config_path)
    if args.config_dir is not None:
        config_dir = os.path.abspath(args.config_dir)
        if not os.path.isdir(config_dir):
            return f"--config-dir {args.config_dir}: directory {config_dir} not found; give an existing directory", None
        from hydra.core.config_search_path import SearchPathQuery

        # As hydra.main adds it: before the structured configs, after the application's own configs.
        search_path.prepend(
            provider="command-line", path=f"file://{config_dir}", anchor=SearchPathQuery(provider="schema")
        )

    overrides = list(args.overrides)
    # Hydra's singletons are left as they were found, so hydra.main (or a caller's own Hydra) starts clean.
    global_hydra = GlobalHydra.instance()
    previous_hydra = global_hydra.hydra if global_hydra.is_initialized() else None
    previous_hydra_cfg = HydraConfig.instance().cfg
    try:
        hydra = Hydra.create_main_hydra2(
            task_name=detect_task_name(calling_file, calling_module), config_search_path=search_path
        )
        # The run mode as hydra.main decides it: the config's hydra.mode, else --multirun. Hydra
        # finds it by composing the config once more (get_mode); a config that leaves hydra.mode
        # unset, or agrees with the command line, is composed once here instead (each composition
        # is ~0.1 s of every command's start-up).
        mode = RunMode.MULTIRUN if args.multirun else RunMode.RUN
        try:
            cfg = hydra.compose_config(config_name=config_name, overrides=overrides, run_mode=mode)
            said = cfg.hydra.mode
        except Exception:  # noqa: BLE001 - composed again below, as Hydra does, for the error it gives
            said = cfg = None
        if cfg is None or not (said is None or said == mode or (args.multirun and said == RunMode.RUN)):
            mode = hydra.get_mode(config_name=config_name, overrides=overrides)
            if mode is None or (args.multirun and mode == RunMode.RUN):
                mode = RunMode.MULTIRUN if args.multirun else RunMode.RUN
                overrides.append(f"hydra.mode={mode.name}")
            cfg = None
        try:
            if cfg is None:
                cfg = hydra.compose_config(config_name=config_name, overrides=overrides, run_mode=mode)
        except Exception as err:
            yaml_error = config_file_error(err) or config_file_error(err.__cause__ or err.__context__ or err)
            if yaml_error is not None:
                return yaml_error, None
            if isinstance(err, CompactHydraException):
                return _one_line(err), None
            return None, None  # not a mistake in the input that we know of: Hydra reports it itself
        key = "hydra.sweep.dir" if mode == RunMode.MULTIRUN else "hydra.run.dir"
        HydraConfig.instance().set_config(cfg)  # ${hydra:...} in the directory resolves as in the job
        try:
            directory = OmegaConf.select(cfg, key, throw_on_missing=True)
        except (OmegaConfBaseException, ValueError):
            return None, None  # an interpolation Hydra itself will report
        return (run_dir_error(key, str(directory)) if directory is not None else None), cfg
    finally:
        HydraConfig.instance().cfg = previous_hydra_cfg
        if previous_hydra is None:
            global_hydra.clear()
        else:
            global_hydra.hydra = previous_hydra


def hydra_string(text: str) -> str:
    """``text`` as a single-quoted Hydra override value that parses back to ``text`` exactly: a quote
    is escaped, and so is a run of backslashes before a quote or the closing quote (Hydra's rule;
    other backslashes stay as typed)."""
    escaped = re.sub(r"(\\+)(?='|$)", lambda m: m.group(1) * 2, text)
    return "'" + escaped.replace("'", "\\'") + "'"


def quote_free_text(argv: list[str], keys: Collection[str]) -> list[str]:
    """``argv`` with each ``key=text`` of a free-text ``key`` (a prompt) passed to Hydra as the text
    typed: ``prompt=def main(``, ``prompt=Hello, world`` or ``prompt=[1, 2]`` would otherwise be a
    grammar error, a sweep or a list. Left as typed: a value Hydra reads as that same string, a value
    already quoted for Hydra (``'prompt="def main("'``), and ``null``."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = None
    out = []
    for arg in argv:
        key, sep, text = arg.partition("=")
        if sep and key.lstrip("+") in keys and not key.startswith("~"):
            parser = parser or OverridesParser.create()
            try:
                value = parser.parse_override(arg).value()
            except Exception:  # noqa: BLE001 - Hydra's grammar refused it: the text is quoted below
                typed_as_is = False
            else:
                typed_as_is = value is None or (isinstance(value, str) and (value == text or text[:1] in ("'", '"')))
            if not typed_as_is:
                arg = f"{key}={hydra_string(text)}"
        out.append(arg)
    return out


def hydra_main(
    config_path: str | None,
    config_name: str | None,
    version_base: str = "1.3",
    on_config: Callable[[DictConfig], None] | None = None,
    free_text: Collection[str] = (),
) -> Callable[[F], F]:
    """``@hydra.main(version_base=..., config_path=..., config_name=...)`` whose command is checked
    first by :func:`check_hydra_command`: a bad config file or run directory is ``config error: ...``
    on stderr and exit status 2, before Hydra creates anything. Called with a config (as Hydra's own
    ``main(cfg)``), the function runs directly.

    ``on_config`` gets the config the check composed (with its ``hydra`` node), when it passed,
    before Hydra composes it again to run the task: where an entry point starts work that needs only
    the config (a device warm-up) so that it overlaps Hydra's own start-up. It must not fail the
    command: the task still gets, and checks, Hydra's own composition. ``free_text``: keys whose
    command-line value is taken as typed (see :func:`quote_free_text`)."""
    import hydra

    def decorator(task_function: F) -> F:
        run = hydra.main(version_base=version_base, config_path=config_path, config_name=config_name)(task_function)

        @functools.wraps(task_function)
        def entry(*args: Any, **kwargs: Any) -> Any:
            if args or kwargs:  # a config passed in: no command line to check
                return run(*args, **kwargs)
            if free_text:  # hydra.main reads sys.argv itself
                sys.argv[1:] = quote_free_text(sys.argv[1:], free_text)
            message, cfg = _check_and_compose(task_function, config_path, config_name, sys.argv[1:])
            if message is not None:
                fail("config error", message)
            if on_config is not None and cfg is not None:
                on_config(cfg)
            return run()

        return entry  # type: ignore[return-value]

    return decorator
