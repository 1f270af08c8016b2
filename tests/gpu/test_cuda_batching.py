"""``data.batching`` on a CUDA GPU: token-budget and packed runs give the losses of ``fixed`` in
fp32; skipped without CUDA. The packed run names ``execution.attention=sdpa``: with Transformer
Engine installed the layer spec is TE's but the packed rows must reach the SDPA attention as the
block-diagonal mask, never as THD ``PackedSeqParams`` (``resolve/batching.packing_format``; TE's
own THD attention has no fp32 backend, so the config refuses packed + TE attention in fp32)."""

import pytest

from tests.gpu_runs import train_on_one_gpu

pytestmark = pytest.mark.gpu

MODES = {
    "fixed": [],
    "token_budget": ["data.batching=token_budget", "data.max_tokens_per_micro_batch=320"],
    "packed": [
        "data.batching=packed",
        "data.max_tokens_per_micro_batch=320",
        "execution.attention=sdpa",
    ],
}


def test_batching_modes_match_fixed_on_one_gpu(tmp_path):
    runs = {
        name: train_on_one_gpu(tmp_path, name, ["execution.transformer_impl=auto", *extra])
        for name, extra in MODES.items()
    }
    reference = [r["loss"] for r in runs["fixed"]]
    for name, rows in runs.items():
        assert [r["loss"] for r in rows] == pytest.approx(reference, rel=1e-4), name
    assert all(r["throughput/padding_fraction"] == 0 for r in runs["packed"])
