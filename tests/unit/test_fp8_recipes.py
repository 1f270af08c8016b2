"""FP8 recipes: the rank-local row multiple each needs, and the GPUs that can run it.

Rules, written out independently of ``megatron_adadpo.layout``:

- every recipe: Transformer Engine ``assert_dim_for_fp8_exec`` (``transformer_engine/pytorch/
  utils.py``, v2.8 line 433): each GEMM input's ``prod(shape[:-1]) % 8 == 0``;
- with sequence parallelism, TE v2.8 - v2.13 also calls ``assert_dim_for_all_gather`` (utils.py
  v2.8 line 444, v2.12 line 450; from ``linear.py`` v2.8 line 169, ``layernorm_linear.py`` 151,
  ``layernorm_mlp.py`` 218) on the rank-local input, which must be ``is_quantizable``:
  ``MXFP8Quantizer`` (``tensor/mxfp8_tensor.py`` v2.8 lines 70-78) needs rows and last dim
  divisible by ``MXFP8_BLOCK_SCALING_SIZE = 32`` (``constants.py`` v2.8 line 91);
  ``Float8BlockQuantizer`` (``tensor/float8_blockwise_tensor.py`` v2.8 lines 195-203) by its
  ``block_len = 128`` (line 53). ``Float8Quantizer`` / current scaling accept any shape.
- MXFP8 GEMMs: ``check_mxfp8_support`` (v2.8 ``fp8.py`` lines 48-55, v2.12
  ``quantization.py`` lines 62-69): "Device compute capability 10.0 or higher required".
"""

from __future__ import annotations

import dataclasses
import itertools

import pytest

from megatron_adadpo.layout import ExecutionConfig, pad_multiple
from megatron_adadpo.platform.hardware import GPUS
from megatron_adadpo.resolve.kernels import fp8_recipe_error
from megatron_adadpo.resolve.layout import layout_errors
from tests.megatron_helpers import TINY

QUANTIZER_BLOCK = {"delayed": 1, "tensorwise": 1, "mxfp8": 32, "blockwise": 128}


def te_runs(seq: int, tp: int, cp: int, sp: bool, recipe: str, batch_sizes=(1, 2, 3)) -> bool:
    """Megatron's CP / SP splits, then TE's checks on each rank-local GEMM input."""
    if (cp > 1 and seq % (2 * cp)) or (sp and (seq // cp) % tp):
        return False
    local = seq // cp
    for b in batch_sizes:
        column_rows = (local // tp if sp else local) * b  # QKV / fc1 input, before the gather
        row_rows = local * b  # proj / fc2 input
        if column_rows % 8 or row_rows % 8:
            return False
        if sp and column_rows % QUANTIZER_BLOCK[recipe]:
            return False
    return True


CASES = [
    (tp, cp, sp, recipe)
    for tp, cp, sp, recipe in itertools.product((1, 2, 4, 8), (1, 2), (0, 1), QUANTIZER_BLOCK)
    if tp > 1 or not sp
]


@pytest.mark.parametrize("tp, cp, sp, recipe", CASES)
def test_fp8_multiple_per_recipe_runs_and_is_smallest(tp, cp, sp, recipe):
    m = pad_multiple(tp, cp, bool(sp), fp8=True, recipe=recipe)
    assert (
        m
        == ExecutionConfig(
            tp=tp, cp=cp, sequence_parallel=bool(sp), fp8="hybrid", fp8_recipe=recipe
        ).pad_multiple
    )
    assert all(te_runs(k * m, tp, cp, bool(sp), recipe) for k in range(1, 9))
    for smaller in range(1, m):
        assert not all(te_runs(k * smaller, tp, cp, bool(sp), recipe) for k in range(1, 2 * m))


def test_block_recipes_with_sp_need_more_rows_than_delayed():
    assert pad_multiple(8, 1, True, fp8=True, recipe="delayed") == 64
    assert pad_multiple(8, 1, True, fp8=True, recipe="mxfp8") == 256
    assert pad_multiple(8, 1, True, fp8=True, recipe="blockwise") == 1024
    assert pad_multiple(8, 1, False, fp8=True, recipe="blockwise") == 8  # no gather: no rule


def test_block_recipe_hidden_size_must_fit_the_block():
    model = dataclasses.replace(TINY, hidden_size=96)  # a multiple of 32, not of 128

    def errors(recipe, sp):
        return layout_errors(
            model,
            ExecutionConfig(tp=2, sequence_parallel=sp, fp8="hybrid", fp8_recipe=recipe),
            micro_batch_size=1,
            global_batch_size=8,
        )

    assert any(
        "needs model.hidden_size = 96 divisible by 128" in e for e in errors("blockwise", True)
    )
    assert not any("divisible by 32" in e for e in errors("mxfp8", True))  # 96 = 3 * 32
    assert not any("model.hidden_size = 96" in e for e in errors("blockwise", False))


@pytest.mark.parametrize(
    "capability, refused", [((8, 0), True), ((9, 0), True), ((10, 0), False), ((10, 3), False)]
)
def test_mxfp8_needs_compute_capability_10(capability, refused):
    error = fp8_recipe_error("mxfp8", capability, "GPU")
    assert (error is not None) == refused
    if refused:
        assert "compute capability >= 10.0" in error and "\n" not in error
    assert fp8_recipe_error("delayed", capability, "GPU") is None


def test_known_hopper_and_ampere_capabilities():
    """torch.cuda.get_device_capability() on these parts (CUDA compute capability table)."""
    assert GPUS["h100"].compute_capability == GPUS["h200"].compute_capability == (9, 0)
    assert GPUS["a100"].compute_capability == (8, 0)


def test_environment_check_refuses_mxfp8_on_this_hopper():
    """The resolver's kernel rules read the device's capability from the probed ``Machine``."""
    from megatron_adadpo.platform.hardware import Machine
    from megatron_adadpo.resolve.kernels import kernel_errors

    hopper = Machine(
        has_cuda=True, has_te=True, gpu_name="NVIDIA H100 80GB HBM3", compute_capability=(9, 0)
    )
    run = ExecutionConfig(fp8="hybrid", fp8_recipe="mxfp8")
    assert any("mxfp8 needs compute capability" in e for e in kernel_errors(run, hopper, "fixed"))
    run = ExecutionConfig(fp8="hybrid", fp8_recipe="tensorwise")
    assert not any("compute capability" in e for e in kernel_errors(run, hopper, "fixed"))
