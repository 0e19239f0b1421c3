"""``python -m mqa_lm.export <ckpt_or_dir> <out_dir>``: a transformers directory that
``AutoModelForCausalLM.from_pretrained`` and ``AutoTokenizer.from_pretrained`` load without custom code.

The input is anything :func:`mqa_lm.pretrained.load_pretrained` reads: an export directory, a run
directory (``outputs/<date>/<time>/``) or a Lightning ``.ckpt``. Learned-position GELU/LayerNorm
models become GPTBigCode (MQA or MHA), RoPE/SwiGLU/RMSNorm models Llama (any kv_heads); a model
neither computes exactly is refused with one error listing every option in the way (see mqa_lm.hf).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m mqa_lm.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="export directory, run directory or Lightning .ckpt")
    parser.add_argument("out_dir", help="the transformers directory to write (must be new or empty)")
    parser.add_argument(
        "--family",
        choices=("gpt_bigcode", "llama"),
        default=None,
        help="transformers architecture (default: by the model's positions)",
    )
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), default=None, help="weight dtype to write (default: as stored)"
    )
    parser.add_argument(
        "--tokenizer-path", default=None, help="tokenizer.json to ship (default: the one saved with the model)"
    )
    parser.add_argument("--no-tokenizer", action="store_true", help="write the model only")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty out_dir")
    return parser


def main(argv: list[str] | None = None) -> Path:
    """Run the export; returns the written directory. Errors exit with status 2 and one message."""
    args = build_parser().parse_args(argv)
    from mqa_lm.hf import HFExportError, check_exportable, export_hf
    from mqa_lm.pretrained import PretrainedError, load_pretrained

    try:
        model, tokenizer = load_pretrained(
            args.source, attn_impl="torch", tokenizer_path=args.tokenizer_path, require_tokenizer=not args.no_tokenizer
        )
        family = check_exportable(model.config, args.family)
        out = export_hf(
            model,
            args.out_dir,
            None if args.no_tokenizer else tokenizer,
            family=family,
            dtype=DTYPES.get(args.dtype),
            overwrite=args.overwrite,
        )
    except (HFExportError, PretrainedError, FileNotFoundError, FileExistsError) as err:
        print(f"export error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"wrote {family} model to {out}")
    return out


if __name__ == "__main__":
    main()
