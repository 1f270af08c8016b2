#!/usr/bin/env python
"""How long a training step waits for a checkpoint save: synchronous vs ``checkpoint.async_save``.

One Llama-shaped model (default ~265 M parameters: 16 layers, hidden 1024, vocabulary 32000)
in Megatron's DDP with the distributed optimizer (AdamW state initialised by one step), saved
with ``run/checkpoints.save_training`` (model + optimizer + scheduler + RNG, published
atomically) into a fresh run directory, alternating the two writers save by save, after a
warm-up save each (the first save starts Megatron's helper processes):

- ``sync``: the step waits for the whole write (``save_training`` returns when published);
- ``async``: the step waits only for ``save_training`` to plan the write and fork Megatron's
  writer process (``AsyncCallsQueue``); optimizer steps then run while it writes, each
  followed by the per-step ``poll`` (as in the trainer), until the checkpoint is published.
  Reported: that wait, the steps' own waits in ``poll``, and the time until published.

    python benchmarks/bench_save_wait.py --saves 2 --threads 2 --json out.json
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the benchmarks package (not installed)

from benchmarks.machine import emit_result, machine_line  # noqa: E402
from megatron_adadpo.config import load_config  # noqa: E402
from megatron_adadpo.model.build import build_model  # noqa: E402
from megatron_adadpo.platform import cpu, distributed  # noqa: E402
from megatron_adadpo.run.optimizer import build_optimizer, build_scheduler, wrap_ddp  # noqa: E402
from megatron_adadpo.run.state import checkpoints  # noqa: E402
from megatron_adadpo.run.state.checkpoint_writer import CheckpointWriter  # noqa: E402

MODEL_265M = [
    "model.num_layers=16",
    "model.hidden_size=1024",
    "model.ffn_hidden_size=2816",
    "model.num_attention_heads=16",
    "model.num_query_groups=4",
    "model.vocab_size=32000",
    "model.max_position_embeddings=2048",
    "model.make_vocab_size_divisible_by=128",
    "execution.tp=1",
    "optimizer.use_distributed_optimizer=true",
]


def build(config):
    """(policy, optimizer, scheduler, parameter count), Adam state initialised by one step."""
    policy = wrap_ddp(build_model(config.model, config.execution), config.optimizer)
    optimizer = build_optimizer(policy, config.optimizer, config.execution.bf16)
    scheduler = build_scheduler(optimizer, config.optimizer, 1000, 8)
    params = [p for chunk in policy for p in chunk.parameters()]
    for p in params:
        p.main_grad.normal_(0, 1e-3)
    optimizer.step()
    return policy, optimizer, scheduler, sum(p.numel() for p in params)


def one_save(config, run_dir: Path, step: int, pieces, writer) -> dict:
    """Seconds the step waits in ``save_training``; for async also the steps' waits in
    ``poll`` and the seconds until the checkpoint is published (steps running meanwhile)."""
    policy, optimizer, scheduler, _ = pieces
    state = {"step": step, "consumed_samples": 0}
    start = time.perf_counter()
    final = checkpoints.save_training(
        run_dir, step, policy, optimizer, scheduler, state, config.model, "", writer
    )
    out = {"wait_s": time.perf_counter() - start}
    if writer.queue is None:
        out["published_s"] = out["wait_s"]
    else:
        polls, steps = [], 0
        while writer.pending:
            optimizer.step()  # training goes on while the writer writes
            steps += 1
            poll_start = time.perf_counter()
            writer.poll()
            polls.append(time.perf_counter() - poll_start)
        out.update(published_s=time.perf_counter() - start, steps=steps, poll_s=sum(polls))
    out["bytes"] = sum(f.stat().st_size for f in final.rglob("*") if f.is_file())
    shutil.rmtree(final)  # several GiB each: keep one on disk at a time
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--saves", type=int, default=2, help="measured saves per mode")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured saves per mode first")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    config = load_config(REPO / "examples/configs/quickstart.yaml", [*MODEL_265M, *args.set])
    cpu.activate()
    distributed.init_distributed()
    distributed.init_model_parallel(config.execution, seed=1)
    pieces = build(config)
    writers = {"sync": CheckpointWriter(True, False), "async": CheckpointWriter(True, True)}
    runs = {name: [] for name in writers}
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        for i in range(args.warmup + args.saves):  # the first saves start helper processes
            for name, writer in writers.items():
                measured = one_save(config, Path(tmp) / name, i + 1, pieces, writer)
                if i >= args.warmup:
                    runs[name].append(measured)
    result = dict(machine=machine_line(), load_average=os.getloadavg(), params=pieces[3])
    result["threads"] = torch.get_num_threads()
    result["modes"] = {
        name: {key: statistics.median(r[key] for r in rs) for key in rs[0]}
        for name, rs in runs.items()
    }
    sync, asynchronous = result["modes"]["sync"], result["modes"]["async"]
    result["step_wait_sync_over_async"] = sync["wait_s"] / asynchronous["wait_s"]
    emit_result(result, args.json)
    print(
        f"step waits for a save of {sync['bytes'] / 2**30:.2f} GiB: sync {sync['wait_s']:.2f} s | "
        f"async {asynchronous['wait_s']:.2f} s (+{asynchronous['poll_s']:.3f} s in polls; "
        f"published after {asynchronous['published_s']:.2f} s)"
    )
    distributed.destroy()


if __name__ == "__main__":
    main()
