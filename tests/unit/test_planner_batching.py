"""The planner's batching model (``planner/batching.py``): FLOPs and padding of each mode on a
length profile, hand-checked on simple lengths; memory by micro-batch shape; the CLI's
``--lengths``; the recipes' default mode meets the padding target on UltraFeedback lengths."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from megatron_adadpo.data.batching import BatchingPolicy
from megatron_adadpo.planner import layer_activation_bytes, load, make_plan
from megatron_adadpo.planner.batching import estimate_batching, flops_coefficients
from tests.megatron_helpers import TINY
from tests.unit.test_planner import R8B, R70B, _cli


def test_flops_coefficients_reproduce_forward_flops():
    a, b = flops_coefficients(TINY, tp=2)
    for s in (1, 7, 300):
        assert a * s + b * s * s == pytest.approx(TINY.forward_flops(s, 2))


def test_estimates_written_by_hand():
    """4 pairs of rows (10, 30): fixed pads each pair to 30; packed THD has no padding."""
    a, b = flops_coefficients(TINY, 1)
    rows = np.array([[10, 30]] * 4)
    fixed = estimate_batching(BatchingPolicy("fixed", 2), rows, 4, 1, TINY)
    assert fixed.micro_batches == 2 and fixed.processed_tokens == 4 * 2 * 30
    assert fixed.padding_fraction == pytest.approx(1 - 160 / 240)
    assert fixed.processed_flops == pytest.approx(8 * (a * 30 + b * 900))
    assert fixed.useful_flops == pytest.approx(4 * (a * 40 + b * 1000))
    packed = BatchingPolicy("packed", max_tokens=80)
    thd = estimate_batching(packed, rows, 4, 1, TINY, flash=True)
    assert thd.micro_batches == 2 and thd.padding_fraction == 0 and thd.flops_overhead == 1
    local = estimate_batching(packed, rows, 4, 1, TINY, flash=False)
    assert local.processed_flops == pytest.approx(2 * (a * 80 + b * 80**2))  # dense 80 x 80


def test_packed_memory_is_one_row_of_the_budget():
    fixed, _ = load(str(R8B), ["data.batching=fixed", "data.max_tokens_per_micro_batch=null"])
    packed, _ = load(str(R8B), ["data.max_tokens_per_micro_batch=4096"])
    assert packed.batching == "packed" and packed.micro_batch_shape == (1.0, 4096.0)
    assert fixed.micro_batch_shape == (2.0, 2048.0)
    # TE (flash): activations are linear in tokens, 2 x 2048 == 1 x 4096
    assert layer_activation_bytes(packed) == pytest.approx(layer_activation_bytes(fixed))
    local = [
        p.with_execution(transformer_impl="local", attention="megatron_local", recompute=None)
        for p in (fixed, packed)
    ]
    assert layer_activation_bytes(local[1]) > layer_activation_bytes(local[0])  # 4096^2 scores


@pytest.mark.parametrize("recipe, nodes", [(R8B, 1), (R70B, 8)])
def test_recipes_pack_with_little_padding_on_ultrafeedback_lengths(recipe, nodes):
    packed = make_plan(*load(str(recipe), [], "h100", nodes, lengths="ultrafeedback"))
    today = make_plan(
        *load(
            str(recipe),
            ["data.batching=fixed", "data.max_tokens_per_micro_batch=null"],
            "h100",
            nodes,
            lengths="ultrafeedback",
        )
    )
    assert packed.input.batching == "packed" and packed.batching.padding_fraction <= 0.10
    assert packed.cost.step_time_s < today.cost.step_time_s
    assert packed.batching.max_tokens_per_micro_batch <= packed.input.max_tokens_per_micro_batch


def test_cli_lengths_flag(tmp_path):
    out = _cli("--recipe", str(R8B), "--json", "--no-suggest", "--lengths", "ultrafeedback")
    data = json.loads(out.stdout)
    assert data["batching"]["mode"] == "packed" and data["batching"]["padding_fraction"] < 0.1
    manifest = {"length_histogram": {"bin_upper_edges": [512, 1024], "counts": [3, 1]}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    text = _cli("--recipe", str(R8B), "--no-suggest", "--lengths", str(tmp_path)).stdout
    assert "packed micro-batches of" in text
    bad = _cli("--recipe", str(R8B), "--lengths", str(Path(tmp_path) / "missing"))
    assert bad.returncode == 2 and "length profile" in bad.stderr
