"""Sample from a trained model, or measure its perplexity on text.

    python generate.py ckpt_path=outputs/<date>/<time> prompt="Once upon a time" max_new_tokens=200 \
        temperature=0.8 top_k=50 top_p=0.95 num_samples=4 seed=1
    python generate.py ckpt_path=model_dir prompt_file=prompts.txt       # one prompt per line, batched
    python generate.py mode=perplexity ckpt_path=... data.paths=[file.txt] data.stride=512

Options are in configs/generate.yaml. One prompt with one sample is streamed to stdout as it is
generated; several are printed when done. Statistics go to stderr.
"""

from __future__ import annotations

import glob
import os
import sys
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig

MODES = ("sample", "perplexity")
DTYPES = {
    "fp32": "float32",
    "float32": "float32",
    "bf16": "bfloat16",
    "bfloat16": "bfloat16",
    "fp16": "float16",
    "float16": "float16",
}


class UsageError(ValueError):
    """A bad option: printed as one line naming it, exit status 2."""


def _choose(value, choices, key):
    if value not in choices:
        raise UsageError(f"{key}={value!r} is not one of: {', '.join(map(str, choices))}")
    return value


def check_config(cfg: DictConfig) -> None:
    """Every option checked before the model is loaded."""
    _choose(cfg.mode, MODES, "mode")
    if cfg.ckpt_path is None or not Path(str(cfg.ckpt_path)).expanduser().exists():
        raise UsageError(
            f"ckpt_path={cfg.ckpt_path!r} does not exist; pass a run directory, a .ckpt file or an export directory"
        )
    _choose(str(cfg.device).split(":")[0], ("auto", "cpu", "cuda"), "device")
    _choose(str(cfg.dtype), ("auto", *DTYPES), "dtype")
    if cfg.mode == "sample":
        for key, low in (("max_new_tokens", 1), ("num_samples", 1)):
            value = cfg[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise UsageError(f"{key} must be an integer >= {low}, got {value!r}")
        if not cfg.temperature >= 0:
            raise UsageError(f"temperature must be >= 0 (0 = greedy), got {cfg.temperature!r}")
        if cfg.top_k is not None and (not isinstance(cfg.top_k, int) or cfg.top_k < 1):
            raise UsageError(f"top_k must be an integer >= 1 or null, got {cfg.top_k!r}")
        if cfg.top_p is not None and not 0 < cfg.top_p <= 1:
            raise UsageError(f"top_p must be in (0, 1] or null, got {cfg.top_p!r}")
        if cfg.prompt_file is not None and not Path(str(cfg.prompt_file)).expanduser().is_file():
            raise UsageError(f"prompt_file={cfg.prompt_file!r} is not a file")
        _choose(cfg.attention, ("auto", "triton", "sdpa"), "attention")
        _choose(cfg.cuda_graph, ("auto", True, False), "cuda_graph")
    else:
        if not cfg.data.paths:
            raise UsageError("mode=perplexity needs data.paths=[file.txt,...]")
        for key in ("window", "stride"):
            value = cfg.data[key]
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise UsageError(f"data.{key} must be a positive integer or null, got {value!r}")


def text_files(paths) -> list[Path]:
    files: list[Path] = []
    for pattern in paths:
        matches = sorted(glob.glob(os.path.expanduser(str(pattern)))) or [str(pattern)]
        for match in matches:
            path = Path(match)
            if not path.is_file():
                raise UsageError(f"data.paths entry {str(pattern)!r} matches no file")
            files.append(path)
    return files


def run(cfg: DictConfig) -> None:
    check_config(cfg)
    import torch

    from mqa_lm.inference.text import Perplexity, TextStreamer, generate_ids, perplexity, start_ids
    from mqa_lm.pretrained import load_pretrained

    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device={cfg.device} but CUDA is not available; use device=cpu")
    if cfg.dtype == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        dtype = getattr(torch, DTYPES[cfg.dtype])
    extra = {"tokenizer_path": cfg.tokenizer_path} if cfg.tokenizer_path else {}
    model, tokenizer = load_pretrained(str(Path(str(cfg.ckpt_path)).expanduser()), device=device, dtype=dtype, **extra)
    if tokenizer is None:
        raise UsageError(f"{cfg.ckpt_path} carries no tokenizer; pass tokenizer_path=/path/to/tokenizer.json")

    if cfg.mode == "perplexity":
        files = text_files(cfg.data.paths)
        texts = [f.read_text(encoding="utf-8") for f in files]
        start = time.perf_counter()
        result: Perplexity = perplexity(
            model, tokenizer, texts, window=cfg.data.window, stride=cfg.data.stride, batch_size=cfg.data.batch_size
        )
        print(
            f"files={len(files)} tokens={result.tokens} bytes={result.bytes} loss={result.loss:.4f} "
            f"perplexity={result.perplexity:.3f} bits_per_byte={result.bits_per_byte:.4f}"
        )
        print(f"({time.perf_counter() - start:.1f} s)", file=sys.stderr)
        return

    if cfg.prompt_file is not None:
        lines = Path(str(cfg.prompt_file)).expanduser().read_text(encoding="utf-8").splitlines()
        prompts = [line for line in lines if line.strip()]
        if not prompts:
            raise UsageError(f"prompt_file={cfg.prompt_file!r} has no non-empty line")
    else:
        prompts = [str(cfg.prompt)]
    encoded = [tokenizer.encode(p, add_special_tokens=False).ids or start_ids(tokenizer) for p in prompts]
    rows = [ids for ids in encoded for _ in range(cfg.num_samples)]
    eos = tokenizer.token_to_id("<|endoftext|>") if cfg.stop_at_eos else None
    generator = torch.Generator(device=device).manual_seed(int(cfg.seed))

    def shown(ids: list[int]) -> list[int]:
        return [t for t in ids if t != eos]  # a row's end-of-sequence token ends it, unprinted

    streamer = None
    if len(rows) == 1:
        streamer = TextStreamer(tokenizer)
        sys.stdout.write(prompts[0])
        sys.stdout.flush()
    start = time.perf_counter()
    new = generate_ids(
        model,
        rows,
        cfg.max_new_tokens,
        temperature=float(cfg.temperature),
        top_k=cfg.top_k,
        top_p=cfg.top_p,
        eos_token_id=eos,
        generator=generator,
        attention=cfg.attention,
        cuda_graph=None if cfg.cuda_graph == "auto" else bool(cfg.cuda_graph),
        on_tokens=(lambda fresh: streamer.put(shown(fresh[0]))) if streamer is not None else None,
    )
    seconds = time.perf_counter() - start
    if streamer is not None:
        streamer.end()
    else:
        for i, ids in enumerate(new):
            prompt = prompts[i // cfg.num_samples]
            print(f"--- prompt {i // cfg.num_samples} sample {i % cfg.num_samples} ---")
            print(prompt + tokenizer.decode(shown(ids), skip_special_tokens=False))
    count = sum(len(ids) for ids in new)
    print(
        f"({count} tokens in {seconds:.2f} s, {count / seconds:.0f} tok/s, {len(rows)} rows on {device}, {dtype})",
        file=sys.stderr,
    )


@hydra.main(version_base="1.3", config_path="configs", config_name="generate")
def main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except UsageError as err:
        print(f"config error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
