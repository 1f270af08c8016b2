"""What ``stack_checks.py`` runs inside the processes it launches, one body each:
``python benchmarks/gpu/stack_bodies.py {param_sync,make_hf} --work DIR``."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from stack_checks import BASE, QUICKSTART, REPO, TOKENIZER  # this file's folder is sys.path[0]


def body_param_sync(work: Path) -> None:
    """Train 2 steps (saved right after step 2's optimizer step), then compare the saved
    weights with the live ones after a forced all-gather (Megatron-LM ``force_param_sync``)."""
    import torch
    import torch.distributed as dist

    from megatron_adadpo.config import load_config
    from megatron_adadpo.model.build import build_model
    from megatron_adadpo.platform import cpu
    from megatron_adadpo.platform.distributed import destroy, init_distributed
    from megatron_adadpo.platform.megatron import unwrap_model
    from megatron_adadpo.run.state import checkpoints
    from megatron_adadpo.run.state import run_dir as run_dirs
    from megatron_adadpo.run.trainer import Trainer

    run_dir = work / "param_sync_run"
    if dist.is_available() and int(os.environ.get("RANK", "0")) == 0:
        shutil.rmtree(run_dir, ignore_errors=True)
    sets = [*BASE, f"logging.run_dir={run_dir}", f"data.cache_dir={work / 'cache'}"]
    sets += ["optimizer.use_distributed_optimizer=true", "optimizer.overlap_grad_reduce=true"]
    sets += ["optimizer.overlap_param_gather=true", "train.train_iters=2"]
    sets += ["checkpoint.save_at_end=true", "optimizer.lr=1e-2", "checkpoint.resume=false"]
    sets += ["execution.bf16=true"]  # as the recipes: bf16 params, fp32 main params sharded
    config = load_config(QUICKSTART, sets)
    cpu.activate()
    init_distributed()
    trainer = Trainer(config)
    trainer.train()
    saved = build_model(config.model, config.execution)
    checkpoints.load_model(saved, run_dirs.checkpoints_root(run_dir) / "iter_0000002", config.model)
    for chunk in trainer.policy:
        chunk.start_param_sync(force_sync=True)
    worst = torch.zeros(())
    for live_chunk, saved_chunk in zip(trainer.policy, saved, strict=True):
        stored = dict(saved_chunk.named_parameters())
        for name, live in unwrap_model(live_chunk).named_parameters():
            diff = (stored[name].float() - live.float()).norm() / live.float().norm().clamp(
                min=1e-12
            )
            worst = torch.maximum(worst, diff.detach().cpu())
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    if dist.get_rank() == 0:
        result = {"max_rel_diff": float(worst), "dp": dist.get_world_size()}
        (work / "param_sync.json").write_text(json.dumps(result))
    destroy()


def body_make_hf(work: Path) -> None:
    """A tiny random ``LlamaForCausalLM`` with the bundled tokenizer (vocab 640)."""
    import torch
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=640, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.08)
    model.save_pretrained(work / "hf", safe_serialization=True)
    for f in TOKENIZER.iterdir():
        shutil.copy(f, work / "hf" / f.name)


BODIES = {"param_sync": body_param_sync, "make_hf": body_make_hf}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("body", choices=sorted(BODIES))
    parser.add_argument("--work", required=True, type=Path)
    args = parser.parse_args()
    BODIES[args.body](args.work.resolve())


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
