"""Measure a trained model: benchmarks with lm-evaluation-harness, or perplexity on text files.

    python eval.py ckpt_path=outputs/<date>/<time> tasks=[hellaswag,arc_easy] limit=200 batch_size=32
    python eval.py ckpt_path=model_dir tasks=[my_task] include_path=my_tasks/ num_fewshot=5
    python eval.py mode=perplexity ckpt_path=... data.paths=[file.txt] data.window=1024 data.stride=512
    python eval.py ckpt_path=... tasks=[wikitext] data.stride=512     # rolling windows of perplexity tasks

Options are in configs/eval.yaml. The harness's table (or the perplexity line) goes to stdout, the
results JSON beside the checkpoint (or to output_path), under a new timestamped name: an earlier
results file is never replaced. Every option, task name and text file is checked before the model
is loaded; a bad one is one ``config error:`` line and exit status 2.
"""

from __future__ import annotations

import glob
import os
import sys
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from mqa_lm.cli import fail, hydra_main

MODES = ("tasks", "perplexity")


class UsageError(ValueError):
    """A bad option: printed as one line naming it, exit status 2."""


def check_common(cfg: DictConfig) -> None:
    """The options of both modes."""
    from mqa_lm.evaluation.placement import check_device, check_dtype, resolve_device
    from mqa_lm.evaluation.tasks import check_positive

    if cfg.mode not in MODES:
        raise ValueError(f"mode={cfg.mode!r} is not one of: {', '.join(MODES)}")
    if cfg.ckpt_path is None:
        raise ValueError("ckpt_path is required: pass ckpt_path=<run directory | .ckpt file | export directory>")
    if not Path(str(cfg.ckpt_path)).expanduser().exists():
        raise ValueError(
            f"ckpt_path={cfg.ckpt_path!r} does not exist; pass a run directory, a .ckpt file or an export directory"
        )
    if cfg.tokenizer_path is not None and not Path(str(cfg.tokenizer_path)).expanduser().is_file():
        raise ValueError(f"tokenizer_path={cfg.tokenizer_path!r} is not a file; give the path of a tokenizer.json")
    resolve_device(check_device(cfg.device))  # cuda on a machine without one is refused here
    check_dtype(cfg.dtype)
    check_positive(cfg.batch_size, "batch_size")
    for key in ("window", "stride"):  # against max_seq_len once the model is loaded
        value = cfg.data[key]
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"data.{key} must be a positive integer or null, got {value!r}")


def text_files(paths: Any) -> list[Path]:
    """The files ``data.paths`` names (globs expanded, in order)."""
    if not paths:
        raise ValueError("mode=perplexity needs data.paths=[file.txt,...]")
    if isinstance(paths, str):
        paths = [paths]
    files: list[Path] = []
    for pattern in paths:
        matches = sorted(glob.glob(os.path.expanduser(str(pattern)))) or [str(pattern)]
        for match in matches:
            if not Path(match).is_file():
                raise ValueError(f"data.paths entry {str(pattern)!r} matches no file")
            files.append(Path(match))
    return files


def read_texts(cfg: DictConfig) -> tuple[list[Path], list[str]]:
    """The files of ``data.paths`` and their text; every file checked (non-empty, UTF-8)."""
    from mqa_lm.evaluation.perplexity import read_text_file

    files = text_files(cfg.data.paths)
    try:
        texts = [read_text_file(f) for f in files]
    except ValueError as err:
        raise ValueError(f"data.paths: {err}") from None
    return files, texts


def load_model(cfg: DictConfig):
    """The model on the chosen device and dtype, and its tokenizer (required)."""
    from mqa_lm.evaluation.placement import resolve_device, resolve_dtype
    from mqa_lm.pretrained import load_pretrained

    device = resolve_device(str(cfg.device))
    dtype = resolve_dtype(str(cfg.dtype), device)
    extra = {"tokenizer_path": str(Path(str(cfg.tokenizer_path)).expanduser())} if cfg.tokenizer_path else {}
    try:
        model, tokenizer = load_pretrained(
            str(Path(str(cfg.ckpt_path)).expanduser()), device=device, dtype=dtype, require_tokenizer=True, **extra
        )
    except (ValueError, FileNotFoundError) as err:  # PretrainedError / MissingTokenizerError say what to pass
        raise UsageError(str(err)) from None
    return model, tokenizer


def run_perplexity(cfg: DictConfig) -> None:
    from mqa_lm.evaluation.perplexity import perplexity, perplexity_windows
    from mqa_lm.evaluation.results import results_target, write_results

    try:
        files, texts = read_texts(cfg)
        target = results_target(str(cfg.ckpt_path), cfg.output_path)
    except ValueError as err:
        raise UsageError(str(err)) from None
    model, tokenizer = load_model(cfg)
    try:
        window, stride = perplexity_windows(model.config.max_seq_len, cfg.data.window, cfg.data.stride)
    except ValueError as err:
        raise UsageError(f"data.{err}") from None
    start = time.perf_counter()
    result = perplexity(model, tokenizer, texts, window=window, stride=stride, batch_size=cfg.batch_size)
    seconds = time.perf_counter() - start
    print(
        f"files={len(files)} tokens={result.tokens} bytes={result.bytes} loss={result.loss:.4f} "
        f"perplexity={result.perplexity:.3f} bits_per_byte={result.bits_per_byte:.4f}"
    )
    record = {
        "mode": "perplexity",
        "ckpt_path": str(cfg.ckpt_path),
        "files": [str(f) for f in files],
        "window": window,
        "stride": stride,
        "tokens": result.tokens,
        "bytes": result.bytes,
        "nll": result.nll,
        "loss": result.loss,
        "perplexity": result.perplexity,
        "bits_per_byte": result.bits_per_byte,
        "seconds": seconds,
        "date": time.time(),
    }
    path = write_results(target, record)
    print(f"({seconds:.1f} s; results: {path})", file=sys.stderr)


def run_tasks(cfg: DictConfig) -> None:
    from mqa_lm.evaluation import tasks as harness_tasks
    from mqa_lm.evaluation.results import results_target, write_results

    try:
        harness_tasks.require_harness("eval.py mode=tasks")
        names = harness_tasks.check_tasks(plain(cfg.tasks), "tasks")
        include = harness_tasks.check_include_path(plain(cfg.include_path), "include_path")
        limit = harness_tasks.check_limit(cfg.limit, "limit")
        num_fewshot = harness_tasks.check_num_fewshot(cfg.num_fewshot, "num_fewshot")
        if not isinstance(cfg.log_samples, bool):
            raise ValueError(f"log_samples must be true or false, got {cfg.log_samples!r}")
        target = results_target(str(cfg.ckpt_path), cfg.output_path)
        names, manager = harness_tasks.find_tasks(names, include)
        loaded = harness_tasks.load_tasks(names, manager)
    except ValueError as err:
        raise UsageError(str(err)) from None

    from mqa_lm.evaluation.harness import MQALM

    model, tokenizer = load_model(cfg)
    try:
        lm = MQALM(
            model, tokenizer, batch_size=cfg.batch_size, rolling_window=cfg.data.window, rolling_stride=cfg.data.stride
        )
    except ValueError as err:  # the windows against max_seq_len: the other arguments were checked above
        raise UsageError(f"data.{err}") from None
    start = time.perf_counter()
    results = harness_tasks.run_tasks(
        lm, loaded, manager, num_fewshot=num_fewshot, limit=limit, log_samples=cfg.log_samples
    )
    seconds = time.perf_counter() - start
    samples = results.pop("samples", None)
    print(harness_tasks.table(results))
    results["config"].update(
        ckpt_path=str(cfg.ckpt_path), batch_size=cfg.batch_size, device=str(model.wte.weight.device), seconds=seconds
    )
    flat = [{"task": task, **sample} for task, rows in (samples or {}).items() for sample in rows]
    path = write_results(target, results, flat if samples is not None else None)
    print(f"({seconds:.1f} s; results: {path})", file=sys.stderr)


def plain(value: Any) -> Any:
    """A config value as plain Python (lists of a DictConfig are ListConfigs)."""
    return OmegaConf.to_object(value) if OmegaConf.is_config(value) else value


def run(cfg: DictConfig) -> None:
    try:
        check_common(cfg)
    except ValueError as err:
        raise UsageError(str(err)) from None
    if cfg.mode == "perplexity":
        run_perplexity(cfg)
    else:
        run_tasks(cfg)


# hydra_main: hydra.main, with config files that do not parse and bad overrides as one line (exit 2).
@hydra_main(config_path="configs", config_name="eval")
def main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except UsageError as err:
        fail("config error", err)
    except KeyboardInterrupt:
        fail("\ninterrupted", "evaluation stopped; no results were written", status=130)


if __name__ == "__main__":
    main()
