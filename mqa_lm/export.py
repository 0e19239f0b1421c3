"""``python -m mqa_lm.export <ckpt_or_dir> <out_dir>``: a transformers directory that
``AutoModelForCausalLM.from_pretrained`` and ``AutoTokenizer.from_pretrained`` load without custom code.

The input is anything :func:`mqa_lm.pretrained.directory.load_pretrained` reads: an export directory, a run
directory (``outputs/<date>/<time>/``) or a Lightning ``.ckpt``. Learned-position GELU/LayerNorm
models become GPTBigCode (MQA or MHA), RoPE/SwiGLU/RMSNorm models Llama (any kv_heads); a model
neither computes exactly is refused with one error listing every option in the way (see mqa_lm.pretrained.hf).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mqa_lm.pretrained.placement import DTYPES


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


def _describe(err: BaseException) -> str:
    """One line for an error of the export: our messages as they are, an OSError as ``<path>: <reason>``."""
    if isinstance(err, OSError) and err.strerror and err.filename:
        return f"{err.filename}: {err.strerror.lower()}"
    return " ".join(str(err).split("\n"))


def main(argv: list[str] | None = None) -> Path:
    """Run the export; returns the written directory.

    A bad input (a path that holds no model, a damaged or unsupported file, a model transformers
    cannot compute, an out_dir that cannot be written) exits with status 2 and one line on stderr,
    ``export error: <what, and the fix>``, as ``train.py`` does for its errors.
    """
    args = build_parser().parse_args(argv)
    from mqa_lm.pretrained.directory import PretrainedError, load_pretrained
    from mqa_lm.pretrained.hf import HFExportError, HFImportError, check_exportable, export_hf
    from mqa_lm.utils.files import dir_write_problem

    # The output directory is checked before the model is read: a typo there costs no load. The export
    # is assembled beside it, so its parent must take new entries too.
    out = Path(args.out_dir).expanduser()
    problem = dir_write_problem(out) or dir_write_problem(out.parent)
    if problem is not None:
        print(
            f"export error: out_dir {args.out_dir} cannot be written: {problem}; choose another out_dir",
            file=sys.stderr,
        )
        raise SystemExit(2)
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
    # What each can be: HFExportError (a model transformers cannot compute),
    # PretrainedError (no model there, a damaged file, no tokenizer), HFImportError (a transformers
    # directory mqa-lm cannot represent), OSError (paths that cannot be read or written; FileExistsError
    # for a non-empty out_dir), UnicodeError (a file that is not text where text is needed).
    except (HFExportError, HFImportError, PretrainedError, OSError, UnicodeError) as err:
        print(f"export error: {_describe(err)}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"wrote {family} model to {out}")
    return out


if __name__ == "__main__":
    main()
