"""Where a generation process spends its first seconds, phase by phase, in one fresh process.

    python scripts/profile_generate_startup.py EXPORT_DIR [--new 200] [--temperature 0.8] [--top-k 50]
        [--attention auto] [--profile prefill decode1 capture] [--sort tottime] [--probe]
        [--no-warmup] [--no-triton-prepare] [--tiny-first] [--switch-interval S] [--device-warmup]

Follows generate.py's path (the same imports, ``load_pretrained``, one engine, the prompt "ROMEO:")
and prints the wall time of each phase with the device synchronised after it: import torch, CUDA
init, the imports generate.py adds, loading, the engine, the prefill and its first token, the same
prefill again at the same and at a new length (a cost per shape shows there), the first and second
eager decode steps (the first pays every kernel's first use), the graph capture (two warm-up steps
and the capture), and ``--new`` replays. ``--profile`` names the phases to run under cProfile (the top
of each is printed after the table; ``--sort tottime`` puts first uses on top). The ``--no-*`` probes
turn off one of generate.py's start-up measures (``--device-warmup`` turns on the one that needs
Hydra: the device warm-up generate.py starts after composing its config, started here after torch's
import); ``--tiny-first`` runs every kernel once before the
prefill, to show what of its time is not kernels' first use. Run it twice: the second process finds
Triton's and PyTorch's on-disk caches filled, as a user's second run does.
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
STARTED = time.perf_counter()
if "--no-triton-prepare" not in sys.argv:  # as generate.py does, before its imports bring in torch
    from mqa_lm.utils.triton_prepare import prepare_triton_in_background

    prepare_triton_in_background()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("export")
    parser.add_argument("--new", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top-k", type=int, default=50)
    parser.add_argument("--attention", default="auto")
    parser.add_argument("--profile", nargs="*", default=["prefill", "decode1", "capture"])
    parser.add_argument("--rows", type=int, default=25, help="cProfile lines printed per phase")
    parser.add_argument("--sort", default="cumulative", help="cProfile order: cumulative, or tottime for first uses")
    parser.add_argument(
        "--probe", action="store_true", help="before the prefill, time a first matmul, layer norm and SDPA alone"
    )
    parser.add_argument("--no-warmup", action="store_true", help="probe: no background decode-kernel warm-up")
    parser.add_argument(
        "--no-triton-prepare", action="store_true", help="probe: no Triton start-up on a thread before torch's import"
    )
    parser.add_argument(
        "--tiny-first",
        action="store_true",
        help="probe: a 1-layer copy of the model generates 2 tokens eagerly before the real prefill, so the "
        "prefill's time is what is left once every kernel it launches has run once",
    )
    parser.add_argument(
        "--switch-interval",
        type=float,
        default=None,
        help="probe: sys.setswitchinterval(S) before the warm-up starts (how long the main thread keeps the GIL "
        "while the warm-up threads wait for it)",
    )
    parser.add_argument(
        "--device-warmup",
        action="store_true",
        help="start mqa_lm.inference.warmup's thread after torch's import (generate.py: after composing its config)",
    )
    args = parser.parse_args()
    marks: list[tuple[str, float]] = []
    profiles: dict[str, str] = {}

    def phase(name: str, fn, *fn_args):
        """Run ``fn(*fn_args)``, synchronise, and record the time since the previous phase ended."""
        profile = cProfile.Profile() if name.split()[0] in args.profile else None
        if profile is not None:
            profile.enable()
        result = fn(*fn_args)
        if "torch" in sys.modules and sys.modules["torch"].cuda.is_available():
            sys.modules["torch"].cuda.synchronize()
        if profile is not None:
            profile.disable()
            stream = io.StringIO()
            pstats.Stats(profile, stream=stream).sort_stats(args.sort).print_stats(args.rows)
            profiles[name] = stream.getvalue()
        marks.append((name, time.perf_counter() - STARTED))
        return result

    torch = phase("import torch", __import__, "torch")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device_warmup:

        def start():
            from mqa_lm.cli.options import ModelSource
            from mqa_lm.inference.config import GenerationConfig as Config
            from mqa_lm.inference.warmup import start_device_warmup

            dtype = torch.bfloat16 if device == "cuda" else torch.float32
            settings = Config(temperature=args.temperature, top_k=args.top_k)
            start_device_warmup(torch.device(device), dtype, ModelSource(args.export).peek_config, settings)

        phase("device warm-up started", start)
    phase("cuda init", lambda: torch.zeros(1, device=device))

    def tiny_warm(config):
        import dataclasses

        from mqa_lm.inference import InferenceEngine as Engine
        from mqa_lm.inference.config import GenerationConfig as Config
        from mqa_lm.model import MQATransformer

        config = dataclasses.replace(config, n_layers=1, vocab_size=min(config.vocab_size, 4096))
        with torch.random.fork_rng(devices=[torch.device(device)] if device == "cuda" else []), torch.device(device):
            tiny = MQATransformer(config)
        tiny.to(dtype=torch.bfloat16 if device == "cuda" else torch.float32).eval()
        engine = Engine(tiny, 1, 256, attention=args.attention, cuda_graph=False)
        engine.generate(
            torch.ones(1, 6, dtype=torch.long, device=device), Config(2, temperature=args.temperature, top_k=args.top_k)
        )

    def imports():
        import omegaconf  # noqa: F401  (generate.py's own imports, in its order)

        import mqa_lm.cli.main  # noqa: F401
        from mqa_lm import load_pretrained
        from mqa_lm.inference import InferenceEngine
        from mqa_lm.inference.config import GenerationConfig
        from mqa_lm.inference.text import start_ids  # noqa: F401

        return load_pretrained, InferenceEngine, GenerationConfig

    load_pretrained, InferenceEngine, GenerationConfig = phase("imports (hydra, mqa_lm)", imports)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model, tokenizer = phase("load", lambda: load_pretrained(args.export, device=device, dtype=dtype))
    config = GenerationConfig(args.new, temperature=args.temperature, top_k=args.top_k)
    if args.tiny_first:
        phase("tiny: 1-layer copy generates 2", tiny_warm, model.config)
    if args.device_warmup:  # what of it the imports and the load did not hide
        from mqa_lm.inference.warmup import wait_for_device_warmup

        phase("wait for the device warm-up", wait_for_device_warmup)
    engine = phase("engine", lambda: InferenceEngine(model, 1, 256, attention=args.attention))
    settings = engine.settings(config, None)
    if args.switch_interval is not None:
        sys.setswitchinterval(args.switch_interval)
    if not args.no_warmup:
        engine._start_decode_kernel_warmup()  # as stream() does before its prefill
    idx = torch.tensor([tokenizer.encode("ROMEO:").ids])  # on the host, as stream() hands it to the prefill
    if args.probe:  # the libraries' first use, apart from the model: cuBLAS(Lt), a norm, the SDPA backends
        d, heads = model.config.d_model, model.config.heads
        x = torch.randn(1, idx.shape[1], d, device=device, dtype=dtype)
        phase("probe: first matmul", lambda: x @ x.new_ones(d, 3 * d))
        phase("probe: first layer norm", lambda: torch.nn.functional.layer_norm(x, (d,)))
        q = torch.randn(1, heads, idx.shape[1], d // heads, device=device, dtype=dtype)
        k = torch.randn(1, 1, idx.shape[1], d // heads, device=device, dtype=dtype).expand_as(q)
        sdpa = torch.nn.functional.scaled_dot_product_attention
        phase("probe: first sdpa (causal)", lambda: sdpa(q, k, k, is_causal=True))
    mask = torch.ones_like(idx, dtype=torch.bool)

    def prefill(ids, keep):  # an unpadded prompt: no key mask, as InferenceEngine.stream() runs it
        return engine._prefill(ids, keep, padded=False)

    if settings[0] > 0:
        generator = torch.Generator(device=device).manual_seed(0)
        engine.uniforms.copy_(torch.rand(engine.chunk_capacity, 1, generator=generator, device=device))
    engine.step.zero_()
    logits = phase("prefill (forward)", lambda: prefill(idx, mask))
    phase("prefill sample (first token)", lambda: engine._sample(logits, settings, first=True))
    # Shape-dependent first-use costs (kernel plans per sequence length) show as a slow new length.
    phase("prefill again, same length", lambda: prefill(idx, mask))
    longer = torch.cat([idx, idx], dim=1)
    phase("prefill again, new length", lambda: prefill(longer, torch.ones_like(longer, dtype=torch.bool)))
    logits = phase("prefill again, first length", lambda: prefill(idx, mask))
    engine.step.zero_()
    engine._sample(logits, settings, first=True)
    # What is left of the background kernel warm-up the engine started (InferenceEngine._run waits too).
    phase("wait for the decode-kernel warm-up", engine._await_warmup)
    phase("decode1 eager step (first use)", lambda: engine._decode_step(settings))
    phase("decode2 eager step", lambda: engine._decode_step(settings))
    if engine.cuda_graph:
        phase("capture (2 warm-ups + capture)", lambda: engine._capture("decode", settings))

    def replays():
        for i in range(args.new):
            if i % engine.chunk_capacity == 0:
                engine.step.zero_()  # a round's index: stream() resets it every round
            engine._run("decode", settings)

    phase(f"{args.new} steps", replays)
    previous = 0.0
    print(f"{'phase':40s} {'s':>8s}  {'at s':>8s}")
    for name, at in marks:
        print(f"{name:40s} {at - previous:8.3f}  {at:8.3f}")
        previous = at
    steps = marks[-1][1] - marks[-2][1]
    print(f"decode as replayed: {args.new / steps:,.0f} tok/s ({1e3 * steps / args.new:.3f} ms a step)")
    for name, text in profiles.items():
        print(f"\n===== cProfile: {name} =====")
        print(text[text.find("ncalls") :][:6000])


if __name__ == "__main__":
    main()
