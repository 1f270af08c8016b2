"""``layout.pad_multiple`` against the rules it must satisfy, each written out independently:

- Megatron-Core context parallelism (``megatron/core/utils.py`` ``get_batch_on_this_cp_rank``,
  0.16.1 and 0.19.2): the sequence is viewed as ``2*CP`` equal chunks;
- Megatron-Core sequence parallelism (``tensor_parallel/mappings.py``
  ``_split_along_first_dim``: "First dimension of the tensor should be divisible by tensor
  parallel size"): each CP rank's ``S/CP`` tokens are scattered over TP;
- Transformer Engine FP8 (``transformer_engine/pytorch/utils.py`` ``assert_dim_for_fp8_exec``,
  v2.2 - v2.9, called by ``Linear`` / ``LayerNormLinear`` / ``LayerNormMLP`` on the rank-local
  input before the sequence-parallel all-gather): ``prod(shape[:-1]) % 8 == 0``.

A layout's multiple must make every multiple of it pass, for every micro-batch size, and be the
smallest such multiple (padding is waste).
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest

from megatron_adadpo.layout import ExecutionConfig, pad_multiple
from megatron_adadpo.model.config import ModelConfig
from megatron_adadpo.resolve.layout import layout_errors

QUICKSTART = Path(__file__).resolve().parents[2] / "examples/configs/quickstart.yaml"

LAYOUTS = [
    (tp, cp, sp, fp8)
    for tp, cp, sp, fp8 in itertools.product((1, 2, 3, 4, 6, 8), (1, 2, 3, 4, 8), (0, 1), (0, 1))
    if tp > 1 or not sp
]


def megatron_accepts(seq: int, tp: int, cp: int, sp: bool) -> bool:
    """CP: ``[b, S]`` viewed as ``[b, 2CP, S/(2CP)]``; SP: ``S/CP`` scattered over TP."""
    if cp > 1 and seq % (2 * cp):
        return False
    local = seq // cp
    return not (sp and local % tp)


def fp8_gemm_inputs(seq: int, tp: int, cp: int, sp: bool, b: int, h: int = 4096) -> list:
    """Shapes of the rank-local FP8 GEMM inputs of one layer: column-parallel (QKV, fc1) inputs
    ``[S/CP/TP, b, h]`` with SP (before the all-gather), ``[S/CP, b, h]`` without; row-parallel
    (proj, fc2) inputs ``[S/CP, b, h/TP]``."""
    local = seq // cp
    column = [local // tp if sp else local, b, h]
    row = [local, b, h // tp]
    return [column, row]


def te_accepts(shape: list) -> bool:
    """``assert_dim_for_fp8_exec``: product of all dims but the last divisible by 8."""
    return math.prod(shape[:-1]) % 8 == 0


def runs(seq: int, tp: int, cp: int, sp: bool, fp8: bool, batch_sizes=(1, 2, 3, 4)) -> bool:
    if not megatron_accepts(seq, tp, cp, sp):
        return False
    if not fp8:
        return True
    return all(
        te_accepts(shape) for b in batch_sizes for shape in fp8_gemm_inputs(seq, tp, cp, sp, b)
    )


@pytest.mark.parametrize("tp, cp, sp, fp8", LAYOUTS)
def test_every_multiple_runs_and_none_smaller_does(tp, cp, sp, fp8):
    m = pad_multiple(tp, cp, bool(sp), fp8=bool(fp8))
    assert all(runs(k * m, tp, cp, sp, fp8) for k in range(1, 33)), (m, tp, cp, sp, fp8)
    for smaller in range(1, m):  # a smaller multiple has a multiple that fails
        assert not all(runs(k * smaller, tp, cp, sp, fp8) for k in range(1, 2 * m + 1)), smaller


def test_layouts_the_old_multiple_broke():
    """lcm(TP, 2*CP) ignored FP8 and (S/CP) % TP: TP2+SP+FP8 (8B recipe shape) and TP8+SP+CP2."""
    assert pad_multiple(2, 1, True, fp8=True) == 16
    assert pad_multiple(8, 2, True) == 16
    assert pad_multiple(8, 2, True, fp8=True) == 128
    assert pad_multiple(1, 1, False, fp8=True) == 8
    assert pad_multiple(2, 2, False) == 4
    assert ExecutionConfig(tp=8, sequence_parallel=True, fp8="hybrid").pad_multiple == 64


TINY = dict(num_layers=4, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4)


def _errors(**execution):
    return layout_errors(
        ModelConfig(**TINY, num_query_groups=2, vocab_size=256),
        ExecutionConfig(**execution),
        micro_batch_size=1,
        global_batch_size=8,
    )


@pytest.mark.parametrize(
    "execution, message",
    [
        ({"fp8_recipe": "fp8"}, "execution.fp8_recipe='fp8'; accepted: delayed, tensorwise"),
        ({"fp8_amax_compute_algo": "mean"}, "execution.fp8_amax_compute_algo='mean'"),
        ({"fp8_amax_history_len": 0}, "execution.fp8_amax_history_len=0 must be >= 1"),
        ({"fp8_margin": -1}, "execution.fp8_margin=-1"),
        ({"fp8": "hybrid", "transformer_impl": "local"}, "execution.fp8 needs Transformer Engine"),
        ({"fp8": "e5m2"}, "execution.fp8='e5m2'"),
    ],
)
def test_bad_fp8_options_name_the_field(execution, message):
    errors = _errors(**execution)
    assert any(message in e for e in errors), errors


def test_fp8_needs_gemm_dimensions_te_accepts():
    """``assert_dim_for_fp8_exec`` also checks each GEMM input's last dim (% 16) and weight."""
    model = ModelConfig(**{**TINY, "hidden_size": 72, "num_attention_heads": 4}, vocab_size=256)
    errors = layout_errors(
        model, ExecutionConfig(fp8="hybrid"), micro_batch_size=1, global_batch_size=8
    )
    assert any("model.hidden_size = 72 divisible by 16" in e for e in errors), errors
    ok = layout_errors(
        ModelConfig(**TINY, vocab_size=256), ExecutionConfig(fp8="hybrid", tp=2),
        micro_batch_size=1, global_batch_size=8,
    )  # fmt: skip
    assert ok == []
    bf16 = layout_errors(model, ExecutionConfig(), micro_batch_size=1, global_batch_size=8)
    assert bf16 == []
