"""Convert an HF Llama-family model (Llama 2/3.x, Mistral, Qwen2/2.5) to a Megatron checkpoint.

    python tools/convert_hf_to_megatron.py --hf-dir HF_DIR --output CKPT_DIR [--dtype bf16|fp32]

HF_DIR: config.json, safetensors weights (sharded with model.safetensors.index.json, or a
single model.safetensors) and the tokenizer files. CKPT_DIR receives a dist_checkpointing
checkpoint that the trainer loads at any TP / PP / virtual-stage layout, model.yaml (the model
section for the training config) and tokenizer/ (tokenizer files + generation_config.json).
--dtype defaults to fp32 for fp32 weights and bf16 otherwise. Runs in one process (CPU).
"""

from __future__ import annotations

import argparse
import sys

from megatron_adadpo import cli
from megatron_adadpo.convert import convert_hf_to_megatron


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--hf-dir", required=True, help="HF model directory")
    p.add_argument("--output", required=True, help="checkpoint directory to write")
    p.add_argument("--dtype", default=None, help="bf16 | fp32 (default: from the weights)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    model = convert_hf_to_megatron(
        args.hf_dir, args.output, dtype=args.dtype, progress=not args.no_progress
    )
    print(
        f"wrote {args.output}: {model.hf_architecture}, {model.num_layers} layers, "
        f"vocab {model.vocab_size}; use {args.output}/model.yaml as the model config"
    )


if __name__ == "__main__":  # dist_checkpointing's save starts a multiprocessing Manager
    sys.exit(cli.run(main))
