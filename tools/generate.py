#!/usr/bin/env python
"""Generate answers from a checkpoint (any layout it was saved with), for evaluation.

    python tools/generate.py --checkpoint PATH --prompts FILE --output FILE.jsonl \\
        [--max-new-tokens 256] [--temperature 0] [--seed 1234] [--batch-size 16] \\
        [--tokenizer PATH] [--chat-template auto|always] [--generator NAME]
        [--format alpaca-eval|arena-hard]

PATH: a training checkpoint (<run_dir>/checkpoints/iter_NNNNNNN), a checkpoints root or run dir
(its `latest`), or a checkpoint written by tools/convert_hf_to_megatron.py. It is loaded into
one TP1 / PP1 process. FILE: JSON lines or a .json list; each object has a `prompt` (string or
chat messages, as in the training data), an `instruction` (AlpacaEval: one user turn) or
`turns` (an Arena-Hard question: [{"content": ...}], one user turn).
Prompts are rendered as training renders them under --chat-template (default: the run's
data.chat_template, else auto): a string `prompt` is raw text under auto (TRL's standard
format) and a user turn under always; messages and instructions get the tokenizer's chat
template (or the plain template). With --format alpaca-eval (default) the
output has one AlpacaEval record per prompt: the input object with `instruction`, `output`,
`generator` (JSON lines; a .json output is one JSON list, the form `alpaca_eval --model_outputs`
reads). With --format arena-hard it has one Arena-Hard answer per question (JSON lines:
`question_id`, `answer_id`, `model_id` = the generator name, `choices`, `tstamp`;
megatron_adadpo/generation/arena_hard.py), for data/arena-hard-v0.1/model_answer/NAME.jsonl.
--temperature 0 (default) is greedy; > 0 samples, reproducibly for a given --seed. The tokenizer
is --tokenizer, else the run's data.tokenizer, else the checkpoint's tokenizer/ directory.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megatron_adadpo import cli
from megatron_adadpo.generation.arena_hard import arena_hard_records, check_questions
from megatron_adadpo.generation.decode import SamplingConfig, generate
from megatron_adadpo.generation.policy import (
    checkpoint_tokenizer,
    load_policy,
    training_data_settings,
)
from megatron_adadpo.generation.prompts import (
    check_output,
    output_records,
    prompt_token_ids,
    read_prompts,
    write_records,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint / iter / checkpoints / run dir")
    p.add_argument("--prompts", required=True, help=".jsonl or .json prompts file")
    p.add_argument("--output", required=True, help=".jsonl (or .json) records to write")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--seed", type=int, default=1234, help="sampling seed")
    p.add_argument("--batch-size", type=int, default=16, help="prompts decoded together")
    p.add_argument("--tokenizer", default=None, help="HF tokenizer dir or sentencepiece .model")
    p.add_argument(
        "--chat-template",
        choices=["auto", "always"],
        default=None,
        help="which prompts get the chat template (default: the run's data.chat_template)",
    )
    p.add_argument("--generator", default=None, help="record's generator (default: PATH name)")
    p.add_argument(
        "--format",
        choices=["alpaca-eval", "arena-hard"],
        default="alpaca-eval",
        help="AlpacaEval records, or Arena-Hard answers (model_id = the generator name)",
    )
    return p.parse_args(argv)


def check_format(args: argparse.Namespace, prompts: list) -> None:
    """Arena-Hard reads JSON lines only, and matches answers to questions by question_id."""
    if args.format != "arena-hard":
        return
    check_questions([p.row for p in prompts])
    if Path(args.output).suffix != ".jsonl":
        raise ValueError(
            f"--format arena-hard writes JSON lines (Arena-Hard's model_answer/NAME.jsonl); "
            f"--output {args.output} is not a .jsonl path: use NAME.jsonl"
        )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    sampling = SamplingConfig(args.max_new_tokens, args.temperature, args.seed, args.batch_size)
    prompts = read_prompts(args.prompts)  # bad input fails before the model loads
    check_output(args.output, args.prompts)
    check_format(args, prompts)
    model, model_config, directory = load_policy(args.checkpoint)
    tokenizer = checkpoint_tokenizer(directory, args.tokenizer)
    mode = args.chat_template or training_data_settings(directory).get("chat_template", "auto")
    ids = prompt_token_ids(tokenizer, prompts, mode)
    longest = max(len(p) for p in ids) + args.max_new_tokens
    if longest > model_config.max_position_embeddings:
        raise ValueError(
            f"the longest prompt plus --max-new-tokens is {longest} tokens, more than the "
            f"model's max_position_embeddings ({model_config.max_position_embeddings}); lower "
            "--max-new-tokens or shorten the prompts"
        )
    generated = generate(
        model, ids, tokenizer.eos_id, model_config.vocab_size, sampling, progress=True
    )
    outputs = [tokenizer.decode(g).strip() for g in generated]
    name = args.generator or Path(args.checkpoint).resolve().name
    if args.format == "arena-hard":
        lens = [len(g) for g in generated]
        records = arena_hard_records([p.row for p in prompts], outputs, lens, name)
    else:
        records = output_records(prompts, outputs, name)
    write_records(args.output, records)
    print(f"wrote {len(outputs)} records to {args.output}")


if __name__ == "__main__":  # dist_checkpointing starts a multiprocessing Manager
    sys.exit(cli.run(main))
