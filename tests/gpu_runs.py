"""Short quickstart-model training runs on one CUDA GPU, for the GPU tests."""

from __future__ import annotations

import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def train_on_one_gpu(tmp_path: Path, name: str, extra: list[str]) -> list[dict]:
    """Four steps of the quickstart model (TP1) in this process; the ``metrics.jsonl`` rows."""
    from megatron_adadpo import train

    run_dir = tmp_path / name
    sets = [
        f"logging.run_dir={run_dir}",
        f"data.cache_dir={tmp_path / 'cache'}",
        "execution.tp=1",
        "train.train_iters=4",
        "eval.interval=0",
        "logging.progress=false",
        "checkpoint.save_at_end=false",
        *extra,
    ]
    argv = ["--config", str(REPO / "examples/configs/quickstart.yaml")]
    for item in sets:
        argv += ["--set", item]
    train.main(argv)
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
