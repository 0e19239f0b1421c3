"""Benchmark runs with lm-evaluation-harness: the options (checked before any work), finding the
tasks, running them, and their metrics as a flat dict and as the harness's table.

Shared by ``eval.py`` and the training callback (``callbacks.lm_eval``), each naming an option by
its own key (``limit`` / ``callbacks.lm_eval.limit``). The harness is imported only when tasks are
looked up or run, so the checks cost nothing and need no ``[eval]`` extra.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mqa_lm.evaluation.scoring import BATCH_SIZE
from mqa_lm.utils.config import check_int

if TYPE_CHECKING:
    from lm_eval.api.group import Group
    from lm_eval.api.model import LM
    from lm_eval.api.task import Task
    from lm_eval.tasks import TaskManager

# Keys of a task's results that are bookkeeping, not scores.
NOT_METRICS = ("alias", "name", "sample_len", "sample_count")
INSTALL_HINT = 'pip install -e ".[eval]"'


class TaskError(ValueError):
    """A task that cannot be found or loaded; the message names it and the fix."""


# ---- options ------------------------------------------------------------------------------------


def check_tasks(tasks: object, key: str) -> list[str]:
    """``tasks`` as a non-empty list of names (or YAML paths)."""
    if isinstance(tasks, str):
        tasks = [t for t in tasks.split(",") if t.strip()]
    if not isinstance(tasks, Sequence) or not tasks or not all(isinstance(t, str) and t.strip() for t in tasks):
        raise ValueError(f"{key} must name at least one task, e.g. {key}=[hellaswag,arc_easy]; got {tasks!r}")
    return [t.strip() for t in tasks]


def check_limit(limit: object, key: str) -> int | float | None:
    """``limit``: null (every example), an integer >= 1 (examples per task) or a fraction in (0, 1)."""
    if limit is None:
        return None
    if isinstance(limit, int) and not isinstance(limit, bool) and limit >= 1:
        return limit
    if isinstance(limit, float) and 0 < limit < 1:
        return limit
    raise ValueError(
        f"{key} must be null (every example), an integer >= 1 (examples per task) or a fraction in (0, 1), "
        f"got {limit!r}"
    )


def check_num_fewshot(num_fewshot: object, key: str) -> int | None:
    """``num_fewshot``: null (each task's default) or an integer >= 0."""
    return check_int(num_fewshot, key, minimum=0, none_ok=True, hint="null is each task's default")


@dataclass
class HarnessOptions:
    """The lm-evaluation-harness options that ``eval.py`` (``mode=tasks``) and ``callbacks.lm_eval``
    share: one set of defaults (``harness/_base``, generated from this class, in both configs) and
    one check.

    Attributes:
        tasks: harness task names, globs (``arc_*``) or YAML paths, e.g. ``[hellaswag, arc_easy]``.
        include_path: a directory (or a list) of task YAMLs of your own.
        num_fewshot: few-shot examples, or null for each task's default.
        limit: examples per task: an integer >= 1, a fraction in (0, 1), or null for all.
        batch_size: rows per forward of the model.
    """

    tasks: Any = field(default_factory=list)
    include_path: Any = None
    num_fewshot: int | None = None
    limit: int | float | None = None
    batch_size: int = BATCH_SIZE

    def checked(self, prefix: str = "") -> HarnessOptions:
        """A copy with every value checked (ValueError naming ``prefix`` + the key, before any work)
        and normalised: ``tasks`` a list of names, ``include_path`` a list of absolute paths."""
        return HarnessOptions(
            tasks=check_tasks(self.tasks, f"{prefix}tasks"),
            include_path=check_include_path(self.include_path, f"{prefix}include_path"),
            num_fewshot=check_num_fewshot(self.num_fewshot, f"{prefix}num_fewshot"),
            limit=check_limit(self.limit, f"{prefix}limit"),
            batch_size=check_int(self.batch_size, f"{prefix}batch_size"),
        )


def check_include_path(include_path: object, key: str) -> list[str]:
    """``include_path``: null, a directory or YAML file of tasks, or a list of them; every one must
    exist. Returns absolute paths (the working directory may change before the tasks are read)."""
    if include_path is None:
        return []
    paths = [include_path] if isinstance(include_path, (str, Path)) else include_path
    if not isinstance(paths, Sequence) or not all(isinstance(p, (str, Path)) for p in paths):
        raise ValueError(f"{key} must be a directory of task YAMLs (or a list of them), got {include_path!r}")
    resolved = []
    for p in paths:
        path = Path(p).expanduser()
        if not path.exists():
            raise ValueError(f"{key}: {str(p)!r} does not exist; give a directory (or file) of task YAMLs")
        resolved.append(str(path.resolve()))
    return resolved


def require_harness(key: str) -> None:
    """ValueError with the install command when lm-evaluation-harness is missing."""
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise ValueError(f"{key} needs lm-evaluation-harness: {INSTALL_HINT}") from None


# ---- finding tasks ----------------------------------------------------------------------------


def find_tasks(names: list[str], include_path: list[str], key: str = "tasks") -> tuple[list[str], TaskManager]:
    """The task names to run (globs expanded) and a TaskManager that knows them all.

    Reading the harness's index of its ~15,000 built-in tasks takes seconds, so when every name is a
    task of ``include_path`` only that path is indexed. An unknown name is a :class:`TaskError`
    naming it, the closest known names and where tasks come from.
    """
    from lm_eval.tasks import TaskManager

    if include_path:
        local = TaskManager(include_path=include_path, include_defaults=False)
        if all(name in local.all_subtasks for name in names):
            return list(names), local
    manager = TaskManager(include_path=include_path or None)
    known = set(manager.all_tasks)
    found: list[str] = []
    for name in names:
        if any(c in name for c in "*?["):
            matches = manager.match_tasks([name])
            if not matches:
                raise TaskError(f"{key}: the pattern {name!r} matches no task; {_where_tasks_come_from(include_path)}")
            found += [m for m in matches if m not in found]
        elif name in known or (name.endswith((".yaml", ".yml")) and Path(name).is_file()):
            found.append(name)
        else:
            close = difflib.get_close_matches(name, sorted(known), n=3)
            hint = f" (closest: {', '.join(close)})" if close else ""
            raise TaskError(f"{key}: unknown task {name!r}{hint}; {_where_tasks_come_from(include_path)}")
    return found, manager


def _where_tasks_come_from(include_path: list[str]) -> str:
    searched = f"searched the harness's tasks and include_path={include_path}" if include_path else ""
    advice = "list them with `lm-eval ls tasks`, or pass include_path=<directory of task YAMLs> for your own"
    return f"{searched}; {advice}" if searched else advice


def load_tasks(names: list[str], manager: TaskManager, key: str = "tasks") -> list[Task | Group]:
    """The harness's Task (and Group, whose score aggregates its tasks') objects for ``names``, their
    datasets loaded; a dataset that cannot be read is a :class:`TaskError` naming the task."""
    loaded: list[Task | Group] = []
    for name in names:
        try:
            found = manager.load([name])
        except Exception as err:  # datasets and the harness raise many types; the message says what
            raise TaskError(f"{key}: task {name!r} could not be loaded: {type(err).__name__}: {err}") from None
        if name in found["groups"]:
            loaded.append(found["groups"][name])
        else:
            loaded += list(found["tasks"].values())
    return loaded


# ---- running and reporting ----------------------------------------------------------------------


def run_tasks(
    lm: LM,
    tasks: Sequence[str | Task | Group],
    manager: TaskManager,
    *,
    num_fewshot: int | None = None,
    limit: int | float | None = None,
    log_samples: bool = False,
    bootstrap_iters: int = 100_000,
) -> dict[str, Any]:
    """The harness's ``simple_evaluate`` of ``lm`` on ``tasks``; returns its results dict."""
    from lm_eval import simple_evaluate

    results = simple_evaluate(
        model=lm,
        tasks=list(tasks),
        task_manager=manager,
        num_fewshot=num_fewshot,
        limit=limit,
        log_samples=log_samples,
        bootstrap_iters=bootstrap_iters,
    )
    if results is None:  # only on a rank other than 0 of a distributed harness model; ours is one process
        raise RuntimeError("lm-eval returned no results")
    return dict(results)


def metrics(results: dict[str, Any], prefix: str = "eval") -> dict[str, float]:
    """``{"<prefix>/<task>/<metric>": value}`` for every numeric metric of every task and group
    (standard errors and sample counts left out). A metric under a filter other than ``none`` is ``<metric>_<filter>``
    (``exact_match_strict-match``)."""
    flat: dict[str, float] = {}
    for section in ("results", "groups"):
        for task, values in (results.get(section) or {}).items():
            for name, value in values.items():
                metric, _, filt = name.partition(",")
                if metric.endswith("_stderr") or metric in NOT_METRICS:
                    continue
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    continue
                label = metric if filt in ("", "none") else f"{metric}_{filt}"
                flat[f"{prefix}/{task}/{label}"] = float(value)
    return flat


def table(results: dict[str, Any]) -> str:
    """The harness's markdown table of the results (and of the groups, when there are any)."""
    from lm_eval.utils import make_table

    text = make_table(results)
    if results.get("groups"):
        text += "\n" + make_table(results, "groups")
    return text
