"""Results files of ``eval.py``: where they go and writing them without replacing an earlier one."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mqa_lm.utils.files import dir_write_problem


@dataclass(frozen=True)
class ResultsTarget:
    """A results file to create: ``directory / name``, or, when ``name`` is None, a timestamped
    ``eval-<YYYYmmdd-HHMMSS>.json`` there (``-2``, ``-3`` ... when that name is taken)."""

    directory: Path
    name: str | None = None


def results_target(ckpt_path: str | Path, output_path: str | Path | None, key: str = "output_path") -> ResultsTarget:
    """Where the results of evaluating ``ckpt_path`` go, checked before any work.

    Default: beside the checkpoint (in the run or export directory it names, else the directory of
    the ``.ckpt``). ``output_path`` ending in ``.json`` is a file that must not exist yet; anything
    else is a directory (made when missing). ValueError naming ``key`` when the file exists or the
    directory cannot be written.
    """
    ckpt = Path(ckpt_path).expanduser()
    if output_path is None:
        target = ResultsTarget(ckpt if ckpt.is_dir() else ckpt.parent)
    else:
        out = Path(output_path).expanduser()
        if out.suffix == ".json":
            if out.exists():
                raise ValueError(
                    f"{key}={str(output_path)!r} already exists and results are never overwritten; "
                    "choose a new file name, or a directory (a timestamped file is written inside)"
                )
            target = ResultsTarget(out.parent, out.name)
        elif out.exists() and not out.is_dir():
            raise ValueError(f"{key}={str(output_path)!r} is a file; give a directory or a new .json file")
        else:
            target = ResultsTarget(out)
    problem = dir_write_problem(target.directory)
    if problem is not None:
        raise ValueError(f"cannot write results in {target.directory}: {problem}; pass {key}=<a writable directory>")
    return target


def write_results(target: ResultsTarget, results: dict[str, Any], samples: list[dict[str, Any]] | None = None) -> Path:
    """Write ``results`` as JSON (and ``samples``, one JSON object a line, to ``<stem>.samples.jsonl``);
    returns the results path. Files are created exclusively: an existing one is never replaced."""
    target.directory.mkdir(parents=True, exist_ok=True)
    text = json.dumps(results, indent=2, default=_jsonable, ensure_ascii=False) + "\n"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    attempt = 1
    while True:
        if target.name is not None:
            path = target.directory / target.name
        else:
            path = target.directory / f"eval-{stamp}{'' if attempt == 1 else f'-{attempt}'}.json"
        samples_path = path.with_suffix(".samples.jsonl")
        try:
            with open(path, "x", encoding="utf-8") as fh:
                fh.write(text)
            break
        except FileExistsError:
            if target.name is not None:
                raise FileExistsError(f"{path} appeared while evaluating; results are never overwritten") from None
            attempt += 1
    if samples is not None:
        with open(samples_path, "x", encoding="utf-8") as fh:
            for sample in samples:
                fh.write(json.dumps(sample, default=_jsonable, ensure_ascii=False) + "\n")
    return path


def _jsonable(value: Any) -> Any:
    """JSON for what the harness leaves in its results: numpy scalars, sets, dtypes and the like."""
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    return str(value)
