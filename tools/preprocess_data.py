"""Tokenize preference data once into a memory-mapped directory for training.

    python tools/preprocess_data.py --input FILE_OR_DIR [...] --tokenizer PATH --output DIR \\
        [--max-length N] [--max-prompt-length N] [--on-error fail|skip] [--workers N] \\
        [--chat-template auto|always] [--chat-template-tail keep|strip]

Inputs: .jsonl / .json / .parquet files, directories of them, `datasets.save_to_disk`
directories, or `hf:NAME[:SPLIT]` (datasets.load_dataset). Writes DIR/pairs.{bin,idx},
DIR/pair_ids.npy, DIR/manifest.json and DIR/data_report.json (every dropped row with its file,
line or row and reason). Re-running with unchanged tokenizer, settings and inputs is a no-op.
DIR must be new, empty or a preprocessed directory: another dataset there is replaced only with
--force; the leftovers of a run killed half-way (DIR.partial-*) are removed by the next run.
Point training at DIR with `data.preprocessed: DIR`.

Exit status: 0 when DIR is written or up to date; 1 when bad rows stop it (--on-error fail;
they are listed in DIR/data_report.json); 2 on a bad argument, setting or file (one `error:`
line).
"""

from __future__ import annotations

import argparse
import os
import sys

from megatron_adadpo import cli, data  # data's names import on first use: --help stays fast


def _optional_int(text: str) -> int | None:
    return None if text.lower() == "none" else int(text)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--input",
        nargs="+",
        action="extend",
        required=True,
        dest="inputs",
        help="files, directories or hf:NAME[:SPLIT] specs, read in order",
    )
    p.add_argument(
        "--tokenizer",
        required=True,
        help="HF tokenizer dir, sentencepiece .model, or a directory holding one .model",
    )
    p.add_argument("--tokenizer-kind", default="auto", choices=["auto", "hf", "sentencepiece"])
    p.add_argument("--output", required=True, help="output directory")
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument(
        "--max-prompt-length",
        type=_optional_int,
        default=-1,
        help="int (default: max-length // 2), or 'none' for no separate prompt limit",
    )
    p.add_argument("--overlength", default="truncate", choices=["truncate", "drop"])
    p.add_argument(
        "--truncation-mode",
        default="keep_start",
        choices=["keep_start", "keep_end"],
        help="under --overlength truncate, TRL's truncation_mode: what a long sequence keeps",
    )
    p.add_argument(
        "--chat-template",
        default="auto",
        choices=["auto", "always"],
        help="auto (TRL): template conversational rows, string rows are raw text; always: both",
    )
    p.add_argument(
        "--chat-template-tail",
        default="keep",
        choices=["keep", "strip"],
        help="keep (TRL) or strip what the chat template renders after the answer's EOS",
    )
    p.add_argument(
        "--on-error",
        default="skip",
        choices=["fail", "skip"],
        help="skip (default): skip bad rows and report them; fail: stop",
    )
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--schema", default="auto", choices=["auto", "explicit", "implicit"])
    p.add_argument("--prompt-field", default="prompt")
    p.add_argument("--chosen-field", default="chosen")
    p.add_argument("--rejected-field", default="rejected")
    p.add_argument(
        "--rejected-optional",
        action="store_true",
        help="rows may lack the rejected field (SFT data, for loss.name=sft only)",
    )
    p.add_argument("--split", default="train", help="split for hf: specs / DatasetDict dirs")
    p.add_argument(
        "--force",
        action="store_true",
        help="rebuild even if up to date, and replace another dataset in --output",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.max_prompt_length == -1:
        args.max_prompt_length = args.max_length // 2
    config = data.DataConfig(
        inputs=tuple(args.inputs),
        prompt_field=args.prompt_field,
        chosen_field=args.chosen_field,
        rejected_field=args.rejected_field,
        schema=args.schema,
        tokenizer=args.tokenizer,
        tokenizer_kind=args.tokenizer_kind,
        max_length=args.max_length,
        max_prompt_length=args.max_prompt_length,
        overlength=args.overlength,
        truncation_mode=args.truncation_mode,
        chat_template=args.chat_template,
        chat_template_tail=args.chat_template_tail,
        on_error=args.on_error,
        num_workers=args.workers,
        split=args.split,
        rejected_optional=args.rejected_optional,
    )
    try:
        manifest, report = data.preprocess(
            config, args.output, progress=not args.quiet, force=args.force, guard_output=True
        )
    except data.DataError as e:  # bad rows, listed in DIR/data_report.json
        print(f"error: {e}", file=sys.stderr)
        return 1
    if report is None:
        print(f"{args.output} is up to date (identity {manifest['identity'][:16]}); nothing to do")
        return 0
    seconds = manifest["seconds"]
    rate = report.rows_read / seconds if seconds else float("nan")
    print(f"{args.output}: {report.summary()}")
    print(f"{rate:.0f} rows/s with {args.workers} worker(s); identity {manifest['identity'][:16]}")
    if report.issues:
        print(f"dropped rows are listed in {os.path.join(args.output, 'data_report.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
