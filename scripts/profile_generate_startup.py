"""Where a generation process spends its first seconds, phase by phase, in one fresh process.

    python scripts/profile_generate_startup.py EXPORT_DIR [--new 200] [--attention auto]

Prints the wall time of: CUDA init, loading the model, building the engine, the prefill (first token),
each eager warm-up step, the graph capture, and the decode rate once captured; then the top of a
cProfile of the whole generation. Run it twice: the second process finds Triton's and PyTorch's
on-disk caches filled.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("export")
    parser.add_argument("--new", type=int, default=200)
    parser.add_argument("--attention", default="auto")
    args = parser.parse_args()
    t0 = time.perf_counter()
    import torch

    marks = [("import torch", time.perf_counter() - t0)]

    def mark(name: str) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        marks.append((name, time.perf_counter() - t0))

    torch.zeros(1, device="cuda")
    mark("cuda init")
    from mqa_lm import load_pretrained
    from mqa_lm.inference import InferenceEngine
    from mqa_lm.inference.config import GenerationConfig

    mark("import mqa_lm")
    model, tokenizer = load_pretrained(args.export, device="cuda", dtype=torch.bfloat16)
    mark("load")
    engine = InferenceEngine(model, 1, attention=args.attention)
    mark("engine")
    idx = torch.tensor([tokenizer.encode("ROMEO:").ids], device="cuda")
    mask = torch.ones_like(idx, dtype=torch.bool)
    settings = (0.0, None, None, None)
    logits = engine._prefill(idx, mask)
    engine._sample(logits, settings)
    mark("prefill + first token")
    engine._decode_step(settings)
    mark("eager step 1")
    engine._decode_step(settings)
    mark("eager step 2")
    engine._capture("decode", settings)
    mark("capture (2 warm-up steps + capture)")
    for _ in range(2):
        engine.step.zero_()  # a round's index: generate() resets it every round
        for _ in range(50):
            engine._run("decode", settings)
    mark("100 replays")
    previous = 0.0
    for name, at in marks:
        print(f"{name:40s} {at - previous:8.3f} s  (at {at:.3f} s)")
        previous = at
    profile = cProfile.Profile()
    profile.enable()
    engine.generate(idx, GenerationConfig(args.new, temperature=0.0))
    torch.cuda.synchronize()
    profile.disable()
    stream = io.StringIO()
    pstats.Stats(profile, stream=stream).sort_stats("cumulative").print_stats(18)
    print(stream.getvalue()[-4000:])


if __name__ == "__main__":
    main()
