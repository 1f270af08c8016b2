"""Export a Megatron checkpoint (any TP / PP / VPP layout it was saved with) to an HF directory.

    python tools/convert_megatron_to_hf.py --checkpoint PATH --output HF_DIR \\
        [--dtype bf16|fp32] [--tokenizer-dir DIR] [--max-shard-size-gb 2]

PATH: a checkpoint written by tools/convert_hf_to_megatron.py, a training checkpoint
(<run_dir>/checkpoints/iter_NNNNNNN), a checkpoints root or run dir (its `latest` is used).
HF_DIR receives sharded safetensors with model.safetensors.index.json, config.json,
generation_config.json and the tokenizer files; transformers.AutoModelForCausalLM loads it.
--dtype defaults to the dtype of the original config.json, else the checkpoint's. Tokenizer
files come from --tokenizer-dir, else the checkpoint's tokenizer/ or the run's config.yaml.

A LoRA run's checkpoint holds adapters only (convert/lora_export.py):

    python tools/convert_megatron_to_hf.py --checkpoint RUN_DIR --output HF_DIR --merge-lora
    python tools/convert_megatron_to_hf.py --checkpoint RUN_DIR --output ADAPTER_DIR \
        --peft-adapter [--peft-base-name HF_BASE]

--merge-lora writes the base (the run's train.init_checkpoint, or --lora-base) with the
adapters merged; --peft-adapter writes PEFT's adapter files for the HF base
(peft.PeftModel.from_pretrained(base, ADAPTER_DIR)).
"""

from __future__ import annotations

import argparse
import sys
from functools import partial

from megatron_adadpo import cli
from megatron_adadpo.convert import convert_megatron_to_hf, lora_export


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint / iter / checkpoints dir")
    p.add_argument("--output", required=True, help="HF directory to write")
    p.add_argument("--dtype", default=None, help="bf16 | fp32 (default: see above)")
    p.add_argument("--tokenizer-dir", default=None, help="where the tokenizer files are")
    p.add_argument("--max-shard-size-gb", type=float, default=2.0, help="output shard size")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--merge-lora", action="store_true", help="LoRA run: merged HF model")
    p.add_argument("--peft-adapter", action="store_true", help="LoRA run: PEFT adapter files")
    p.add_argument("--lora-base", default=None, help="the adapters' base checkpoint (checked)")
    p.add_argument("--peft-base-name", default=None, help="base_model_name_or_path to record")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not args.max_shard_size_gb > 0:
        raise ValueError(f"--max-shard-size-gb={args.max_shard_size_gb} must be > 0 (e.g. 2)")
    if args.peft_adapter:
        out = lora_export.export_peft(
            args.checkpoint, args.output, args.lora_base, args.peft_base_name
        )
        print(f"wrote {out}")
        return
    convert = convert_megatron_to_hf
    if args.merge_lora:
        convert = partial(lora_export.export_merged, base=args.lora_base)
    out = convert(
        args.checkpoint,
        args.output,
        dtype=args.dtype,
        tokenizer_dir=args.tokenizer_dir,
        max_shard_bytes=int(args.max_shard_size_gb * 1024**3),
        progress=not args.no_progress,
    )
    print(f"wrote {out}")


if __name__ == "__main__":  # dist_checkpointing starts a multiprocessing Manager
    sys.exit(cli.run(main))
