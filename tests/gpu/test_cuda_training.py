"""The trainer on a CUDA GPU (NCCL, bf16, Megatron's fused CUDA paths); skipped without CUDA."""

import json
import math
from pathlib import Path

import pytest

pytestmark = pytest.mark.gpu

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("bf16", [False, True])
def test_trainer_runs_on_one_gpu(tmp_path, bf16):
    from megatron_adadpo import train
    from megatron_adadpo.platform import cpu

    run_dir = tmp_path / f"run_bf16_{bf16}"
    sets = [
        f"logging.run_dir={run_dir}",
        f"data.cache_dir={tmp_path / 'cache'}",
        "execution.tp=1",
        f"execution.bf16={str(bf16).lower()}",
        "train.train_iters=4",
        "eval.interval=0",
        "logging.progress=false",
        "checkpoint.save_at_end=true",
    ]
    argv = ["--config", str(REPO / "examples/configs/quickstart.yaml")]
    for item in sets:
        argv += ["--set", item]
    train.main(argv)
    assert not cpu.is_active()  # the CPU layer never runs on a GPU host
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in rows)
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert rows[-1]["throughput/mfu"] > 0
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "iter_0000004"
