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
from dataclasses import fields
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from mqa_lm.cli import config_store
from mqa_lm.cli.main import UsageError, fail, hydra_main
from mqa_lm.cli.options import ModelLoadError, ModelSource

MODES = ("tasks", "perplexity")
config_store.register("model_source", "harness")  # what eval.yaml composes


def check_common(cfg: DictConfig) -> ModelSource:
    """The options of both modes; returns the model to load."""
    from mqa_lm.utils.config import check_int

    if cfg.mode not in MODES:
        raise UsageError(f"mode={cfg.mode!r} is not one of: {', '.join(MODES)}")
    source = ModelSource.from_config(cfg)
    try:
        check_int(cfg.batch_size, "batch_size")
        for key in ("window", "stride"):  # against max_seq_len once the model is loaded
            check_int(cfg.data[key], f"data.{key}", none_ok=True)
    except ValueError as err:
        raise UsageError(str(err)) from None
    return source


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


def run_perplexity(cfg: DictConfig, source: ModelSource) -> None:
    from mqa_lm.evaluation.perplexity import perplexity, perplexity_windows
    from mqa_lm.evaluation.results import results_target, write_results

    try:
        files, texts = read_texts(cfg)
        target = results_target(str(cfg.ckpt_path), cfg.output_path)
    except ValueError as err:
        raise UsageError(str(err)) from None
    model, tokenizer, _, _ = source.load()
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


def run_tasks(cfg: DictConfig, source: ModelSource) -> None:
    from mqa_lm.evaluation import tasks as harness_tasks
    from mqa_lm.evaluation.results import results_target, write_results

    try:
        harness_tasks.require_harness("eval.py mode=tasks")
        options = harness_tasks.HarnessOptions(
            **{f.name: plain(cfg[f.name]) for f in fields(harness_tasks.HarnessOptions)}
        ).checked()
        if not isinstance(cfg.log_samples, bool):
            raise ValueError(f"log_samples must be true or false, got {cfg.log_samples!r}")
        target = results_target(str(cfg.ckpt_path), cfg.output_path)
        names, manager = harness_tasks.find_tasks(options.tasks, options.include_path)
        loaded = harness_tasks.load_tasks(names, manager)
    except ValueError as err:
        raise UsageError(str(err)) from None

    from mqa_lm.evaluation.harness import MQALM

    model, tokenizer, _, _ = source.load()
    try:
        lm = MQALM(
            model,
            tokenizer,
            batch_size=options.batch_size,
            rolling_window=cfg.data.window,
            rolling_stride=cfg.data.stride,
        )
    except ValueError as err:  # the windows against max_seq_len: the other arguments were checked above
        raise UsageError(f"data.{err}") from None
    start = time.perf_counter()
    results = harness_tasks.run_tasks(
        lm, loaded, manager, num_fewshot=options.num_fewshot, limit=options.limit, log_samples=cfg.log_samples
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
    source = check_common(cfg)
    if cfg.mode == "perplexity":
        run_perplexity(cfg, source)
    else:
        run_tasks(cfg, source)


# hydra_main: hydra.main, with config files that do not parse and bad overrides as one line (exit 2).
@hydra_main(config_path="configs", config_name="eval")
def main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except UsageError as err:
        fail("config error", err)
    except ModelLoadError as err:
        fail("error", err)
    except KeyboardInterrupt:
        fail("\ninterrupted", "evaluation stopped; no results were written", status=130)


if __name__ == "__main__":
    main()
