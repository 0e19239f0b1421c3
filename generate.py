"""Sample from a trained model.

    python generate.py ckpt_path=outputs/<date>/<time> prompt="Once upon a time" max_new_tokens=200 \
        temperature=0.8 top_k=50 top_p=0.95 num_samples=4 seed=1
    python generate.py ckpt_path=model_dir prompt_file=prompts.txt       # one prompt per line, batched
    python generate.py ckpt_path=... max_new_tokens=5000 context_overflow=crop   # past max_seq_len

Options are in configs/generate.yaml (the sampling ones from mqa_lm.inference.GenerationConfig). One
prompt with one sample is streamed to stdout as it is generated; several are printed when done. The
last line (stderr) gives load time, time to first token and decode speed apart. Ctrl-C stops at once
and keeps what was printed (exit status 130). Perplexity and benchmarks are eval.py's.

Imports no training code: the process loads only torch, tokenizers, Hydra and the model.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path

from omegaconf import DictConfig

from mqa_lm.utils.triton_prepare import prepare_triton_in_background

# Before the imports below bring in torch (seconds): Triton's own start-up (~0.4 s, mostly hashing
# that releases the GIL) then overlaps it instead of stalling the engine and the first decode step.
prepare_triton_in_background()

from mqa_lm.cli import config_store
from mqa_lm.cli.main import UsageError, fail, hydra_main
from mqa_lm.cli.options import ModelLoadError, ModelSource
from mqa_lm.inference.config import GenerationConfig
from mqa_lm.inference.warmup import start_device_warmup
from mqa_lm.nn.cache import DECODE_ATTENTION
from mqa_lm.utils.config import check_int
from mqa_lm.utils.files import NotUTF8Error, read_text_utf8

GENERATION_KEYS = tuple(f.name for f in fields(GenerationConfig))
config_store.register("generation", "model_source")  # what generate.yaml composes


def _choose(value, choices, key):
    if value not in choices:
        raise UsageError(f"{key}={value!r} is not one of: {', '.join(map(str, choices))}")
    return value


def check_config(cfg: DictConfig) -> tuple[ModelSource, GenerationConfig]:
    """Every option checked before the model is loaded; returns the model and the sampling settings."""
    if cfg.mode == "perplexity":
        raise UsageError(
            "generate.py only samples; perplexity moved to eval.py: "
            f"python eval.py mode=perplexity ckpt_path={cfg.ckpt_path} data.paths=[file.txt]"
        )
    _choose(cfg.mode, ("sample",), "mode")
    source = ModelSource.from_config(cfg)
    try:
        generation = GenerationConfig.from_dict({key: cfg[key] for key in GENERATION_KEYS})
        check_int(cfg.num_samples, "num_samples")
    except ValueError as err:
        raise UsageError(str(err)) from None
    if cfg.prompt_file is not None and not Path(str(cfg.prompt_file)).expanduser().is_file():
        raise UsageError(f"prompt_file={cfg.prompt_file!r} is not a file")
    _choose(cfg.attention, DECODE_ATTENTION, "attention")
    _choose(cfg.cuda_graph, ("auto", True, False), "cuda_graph")
    _choose(cfg.compile, ("auto", True, False), "compile")
    return source, generation


def read_prompts(cfg: DictConfig) -> list[str]:
    if cfg.prompt_file is None:
        return [str(cfg.prompt)]
    try:
        text = read_text_utf8(Path(str(cfg.prompt_file)).expanduser())
    except NotUTF8Error as err:
        raise UsageError(f"prompt_file: {err}") from None
    prompts = [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise UsageError(f"prompt_file={cfg.prompt_file!r} has no non-empty line")
    return prompts


def check_window(rows: list[list[int]], generation: GenerationConfig, max_seq_len: int) -> None:
    """``context_overflow=error`` refuses, before generating, a request that cannot fit the window."""
    window = max(map(len, rows)) + generation.max_new_tokens - 1
    if generation.context_overflow == "error" and window > max_seq_len:
        longest = max(map(len, rows))
        raise UsageError(
            f"a prompt of {longest} tokens + max_new_tokens={generation.max_new_tokens} needs a window of "
            f"{window} tokens, past the model's max_seq_len={max_seq_len} (context_overflow=error); set "
            f"max_new_tokens<={max_seq_len - longest + 1}, or context_overflow=slide or crop"
        )


@contextmanager
def interrupt_at_tokens():
    """Ctrl-C during generation: a flag that the token callback (the yielded function) turns into
    ``KeyboardInterrupt``, in the generation loop's own frame.

    Python runs a signal handler between bytecodes of whatever is executing, finalizers included (a
    tensor's or a weak reference's, run by the garbage collector), and a ``KeyboardInterrupt`` raised
    inside a finalizer is printed as "Exception ignored" and lost: the generation went on. A second
    Ctrl-C acts at once, as Python's default does.
    """
    pending = []

    def on_sigint(signum, frame):
        pending.append(signum)
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def check() -> None:
        if pending:
            raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():  # only the main thread takes signals
        yield lambda: None
        return
    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield check
    finally:
        signal.signal(signal.SIGINT, previous)
    check()  # a Ctrl-C after the last tokens still ends the run as interrupted


def warm_up_device(cfg: DictConfig) -> None:
    """Start the device's first work (its CUDA context, each kernel family's first launch) on a
    thread as soon as the first composition of the config names the device: it then overlaps Hydra's
    own start-up and the model's load instead of delaying the first token
    (:mod:`mqa_lm.inference.warmup`). A config that does not check starts nothing: ``run`` reports it."""
    try:
        if cfg.mode != "sample" or cfg.max_new_tokens == 0:
            return
        source = ModelSource.from_config(cfg)
        generation = GenerationConfig.from_dict({key: cfg[key] for key in GENERATION_KEYS})
        from mqa_lm.pretrained.placement import resolve_device, resolve_dtype

        device = resolve_device(str(source.device))
        dtype = resolve_dtype(str(source.dtype), device)
    except Exception:  # noqa: BLE001  checked again, and reported, by run()
        return
    start_device_warmup(device, dtype, source.peek_config, generation)


def run(cfg: DictConfig) -> None:
    source, generation = check_config(cfg)
    prompts = read_prompts(cfg)
    import torch

    from mqa_lm.data.tokenizer import EOT
    from mqa_lm.inference.text import TextStreamer, generate_ids, start_ids

    started = time.perf_counter()
    model, tokenizer, device, dtype = source.load()
    loaded = time.perf_counter()

    encoded = [tokenizer.encode(p, add_special_tokens=False).ids or start_ids(tokenizer) for p in prompts]
    rows = [ids for ids in encoded for _ in range(cfg.num_samples)]
    check_window(rows, generation, model.config.max_seq_len)
    eos = tokenizer.token_to_id(EOT) if generation.stop_at_eos else None
    generator = torch.Generator(device=device).manual_seed(generation.seed)

    def shown(ids: list[int]) -> list[int]:
        return [t for t in ids if t != eos]  # a row's end-of-sequence token ends it, unprinted

    streamer = TextStreamer(tokenizer) if len(rows) == 1 else None
    if streamer is not None:
        sys.stdout.write(prompts[0])
        sys.stdout.flush()
    first: list[float] = []  # when the first tokens arrived

    def on_tokens(fresh: list[list[int]]) -> None:
        interrupted()
        if not first:
            first.append(time.perf_counter())
        if streamer is not None:
            streamer.put(shown(fresh[0]))

    start = time.perf_counter()
    with interrupt_at_tokens() as interrupted:
        try:
            new = generate_ids(
                model,
                rows,
                generation,
                eos_token_id=eos,
                generator=generator,
                attention=cfg.attention,
                cuda_graph=None if cfg.cuda_graph == "auto" else bool(cfg.cuda_graph),
                compile=device.type == "cuda" if cfg.compile == "auto" else bool(cfg.compile),
                on_tokens=on_tokens,
            )
        finally:
            if streamer is not None:
                streamer.end()
    end = time.perf_counter()
    if streamer is None:
        for i, ids in enumerate(new):
            prompt = prompts[i // cfg.num_samples]
            print(f"--- prompt {i // cfg.num_samples} sample {i % cfg.num_samples} ---")
            print(prompt + tokenizer.decode(shown(ids), skip_special_tokens=False))
    count = sum(len(ids) for ids in new)
    first_at = first[0] if first else end
    decoded = count - len(rows)  # the first token of each row comes from the prefill
    rate = f"{decoded / (end - first_at):,.0f} tok/s" if decoded > 0 and end > first_at else "-"
    print(
        f"(load {loaded - started:.2f} s | prompt {max(map(len, rows))} tokens, first token {first_at - start:.3f} s"
        f" | {count} tokens, decode {rate} | {len(rows)} rows on {device}, {dtype})",
        file=sys.stderr,
    )


# hydra_main: hydra.main, with config files that do not parse and bad overrides as one line (exit 2).
@hydra_main(config_path="configs", config_name="generate", on_config=warm_up_device, free_text=("prompt",))
def main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except UsageError as err:
        fail("config error", err)
    except (ModelLoadError, NotUTF8Error) as err:
        fail("error", err)
    except KeyboardInterrupt:
        sys.stdout.flush()
        fail("\ninterrupted", "generation stopped (what was printed is kept)", status=130)


if __name__ == "__main__":
    main()
