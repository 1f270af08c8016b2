"""LoRA on one CUDA GPU in bf16 (``execution.transformer_impl: auto``: the TE spec, its fused
norm + linear split for the adapters, where TE is installed; the local spec elsewhere); skipped
without CUDA. The CPU rule tests: tests/distributed/test_lora_te.py, tests/unit/test_lora_rules.py;
TE and CP2 end to end: benchmarks/gpu/stack_checks.py ``lora_te_spec``, ``lora_cp2_equals_cp1``."""

import math

import pytest

from tests.gpu_runs import train_on_one_gpu

pytestmark = pytest.mark.gpu


def test_bf16_lora_trains_on_one_gpu(tmp_path):
    lora = ["lora.rank=8", "reference.mode=null", "execution.transformer_impl=auto"]
    rows = train_on_one_gpu(tmp_path, "lora_bf16", ["execution.bf16=true", *lora])
    losses = [r["loss"] for r in rows if r["split"] == "train"]
    assert losses[0] == pytest.approx(math.log(2), abs=1e-6)  # B = 0: policy == reference
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
