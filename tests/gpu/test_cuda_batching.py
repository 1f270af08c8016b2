"""``data.batching`` on a CUDA GPU: token-budget and packed runs give the losses of ``fixed``
(the packed row through Transformer Engine's THD attention when TE is installed, else through
the local spec's block-diagonal mask on CUDA); skipped without CUDA."""

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.gpu

REPO = Path(__file__).resolve().parents[2]
MODES = {
    "fixed": [],
    "token_budget": ["data.batching=token_budget", "data.max_tokens_per_micro_batch=320"],
    "packed": ["data.batching=packed", "data.max_tokens_per_micro_batch=320"],
}


def _train(tmp_path, name: str, extra: list[str]) -> list[dict]:
    from megatron_adadpo import train

    run_dir = tmp_path / name
    sets = [
        f"logging.run_dir={run_dir}",
        f"data.cache_dir={tmp_path / 'cache'}",
        "execution.tp=1",
        "execution.transformer_impl=auto",
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


def test_batching_modes_match_fixed_on_one_gpu(tmp_path):
    runs = {name: _train(tmp_path, name, extra) for name, extra in MODES.items()}
    reference = [r["loss"] for r in runs["fixed"]]
    for name, rows in runs.items():
        assert [r["loss"] for r in rows] == pytest.approx(reference, rel=1e-4), name
    assert all(r["throughput/padding_fraction"] == 0 for r in runs["packed"])
