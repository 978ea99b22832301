"""`python -m moetx.cli.convert` (`moetx-convert`): convert checkpoints between T5X, moetx and
Hugging Face, with sparse upcycling.

    python -m moetx.cli.convert --from t5x --to hf --model models/t5_1_1_small.gin \\
        t5x_run/checkpoint_1000000 hf_out
    python -m moetx.cli.convert --from hf --to moetx hf_llama_dir moetx_run   # --model: HF's
    python -m moetx.cli.convert --from moetx --to moetx --upcycle --model models/my_moe.gin \\
        dense_run moe_run                                 # dense -> MoE (Komatsuzaki et al.)
    python -m moetx.cli.convert --from moetx --to hf --model models/t5_tiny.gin \\
        --vocabulary=my_spm.model --extra_ids=100 run hf_out   # or --task=<its SeqIO task>

What each format is, the strictness rules and the optimizer-state rules are described in
`moetx.convert.formats`, the library this command wraps. `--to hf` writes the tokenizer of
`--vocabulary` / `--extra_ids` (default: moetx's default vocabulary with 100 sentinels), or of the
registered task `--task`; `--vocabulary=none` writes the weights alone.
"""

import argparse
import os
import sys
from typing import Sequence

from moetx.convert import formats
from moetx.convert.errors import ConversionError

FORMATS = formats.FORMATS
DEFAULT_EXTRA_IDS = 100  # moetx.convert.hf.tokenizer's (not imported here: keeps --help light)
DTYPES = tuple(sorted(formats.DTYPES))
_DESCRIPTION = formats.__doc__


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """The command line (see the module docstring and `--help`)."""
    p = argparse.ArgumentParser(prog="moetx-convert", description=_DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--from", dest="src_format", required=True, choices=FORMATS)
    p.add_argument("--to", dest="dst_format", required=True, choices=FORMATS)
    p.add_argument("--model", default=None, help="gin file defining MODEL, or a Hugging Face "
                   "config dir / config.json (default from --from hf: SRC's config)")
    p.add_argument("--dense_model", default=None, help="with --upcycle: SRC's dense model "
                   "(default: --model without MoE)")
    p.add_argument("--gin_bindings", action="append", default=[])
    p.add_argument("--gin_search_paths", default="")
    p.add_argument("--dtype", choices=DTYPES, default=None)
    p.add_argument("--drop_optimizer_state", action="store_true")
    p.add_argument("--upcycle", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--step", type=int, default=None)
    p.add_argument("--t5x_inline", action="store_true",
                   help="T5X output with every array inline in msgpack (no tensorstore)")
    p.add_argument("--vocabulary", default=None,
                   help="--to hf: the SentencePiece .model of the tokenizer written beside the "
                   "weights (default: moetx's default vocabulary); 'none' writes no tokenizer")
    p.add_argument("--extra_ids", type=int, default=None,
                   help="--to hf: sentinel ids after the vocabulary's pieces, as SeqIO's "
                   f"extra_ids (default {DEFAULT_EXTRA_IDS})")
    p.add_argument("--task", default=None,
                   help="--to hf: take the vocabulary and extra ids from this registered SeqIO "
                   "task or mixture (instead of --vocabulary / --extra_ids)")
    p.add_argument("src")
    p.add_argument("dst")
    return p.parse_args(argv)


def vocabulary_from_args(args: argparse.Namespace):
    """The tokenizer vocabulary `--vocabulary` / `--extra_ids` / `--task` name (for
    `formats.convert(vocabulary=...)`): a `Vocabulary`, or None for `--vocabulary=none`."""
    given = [f for f in ("vocabulary", "extra_ids", "task") if getattr(args, f) is not None]
    if args.dst_format != "hf":
        if given:
            raise ValueError(f"--{given[0]} applies to --to hf only (the tokenizer of a Hugging "
                             "Face export).")
        return None
    from moetx.convert.hf import tokenizer

    if args.task is not None:
        if args.vocabulary is not None or args.extra_ids is not None:
            raise ValueError("--task takes the vocabulary and extra ids from the task; pass "
                             "either --task or --vocabulary / --extra_ids.")
        from moetx.cli import flags

        flags.register_tasks()
        return tokenizer.vocabulary_of_task(args.task)
    if args.vocabulary is not None and args.vocabulary.lower() == "none":
        if args.extra_ids is not None:
            raise ValueError("--extra_ids with --vocabulary=none: no tokenizer is written.")
        return None
    extra_ids = tokenizer.DEFAULT_EXTRA_IDS if args.extra_ids is None else args.extra_ids
    if args.vocabulary is None:
        return tokenizer.default_vocabulary(extra_ids)
    return tokenizer.Vocabulary(os.path.abspath(os.path.expanduser(args.vocabulary)), extra_ids)


def main(argv: Sequence[str]) -> str:
    """Converts as the command line says; returns the path written."""
    args = parse_args(argv)
    vocabulary = vocabulary_from_args(args)
    search = [s for s in args.gin_search_paths.split(",") if s]
    model = args.model or (args.src if args.src_format == "hf" else None)
    if model is None:
        raise ValueError(f"--model is required with --from {args.src_format}: a gin file "
                         "defining MODEL or a Hugging Face config.")
    spec = formats.load_model(model, args.gin_bindings, search)
    dense = formats.load_model(args.dense_model, (), search) if args.dense_model else None
    out = formats.convert(args.src_format, args.dst_format, args.src, args.dst, spec,
                          dtype=args.dtype, drop_optimizer_state=args.drop_optimizer_state,
                          upcycle=args.upcycle, dense_spec=dense, seed=args.seed,
                          step=args.step, use_tensorstore=not args.t5x_inline,
                          vocabulary=vocabulary)
    print(f"moetx-convert: wrote {args.dst_format} checkpoint {out}", file=sys.stderr)
    return out


def console_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `moetx-convert` and `python -m moetx.cli.convert`; errors are reported in
    full (the key listings are the point) with exit status 2."""
    try:
        main(sys.argv[1:] if argv is None else argv)
    except (ConversionError, ValueError, FileNotFoundError, FileExistsError) as e:
        if os.environ.get("MOETX_TRACEBACK"):
            raise
        print(f"moetx-convert: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    return 0


__all__ = ["console_main", "main", "parse_args", "vocabulary_from_args"]


if __name__ == "__main__":
    sys.exit(console_main())
