"""GPU-only model options, tested by the rules upstream enforces (no GPU here):

- fusions: Megatron-LM turns every fusion on by default (``megatron/training/arguments.py``,
  ``--no-bias-swiglu-fusion`` etc.); Megatron-Core 0.16.1 / 0.19 raise for the RoPE fusion
  without Transformer Engine (``transformer_config.py``: "apply_rope_fusion is not available")
  and for gradient-accumulation fusion without apex's ``fused_weight_gradient_mlp_cuda``
  (``tensor_parallel/layers.py``), and route the others through ``torch.compile`` on CPU;
- FP8 delayed scaling: Megatron-LM's Llama-3 FP8 example
  (``examples/llama/train_llama3_8b_h100_fp8.sh``: ``--fp8-amax-history-len 1024
  --fp8-amax-compute-algo max``), where Megatron-Core's own defaults are 1 / ``most_recent``;
- the planner's activation model follows the SwiGLU fusion (``fusions/fused_bias_swiglu.py``
  ``SwiGLUFunction`` saves only its input; unfused, autograd also keeps ``silu(gate)``);
- megatron-core 0.19's undeclared ``triton`` import fails with the fix named.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from megatron_adadpo.layout import ExecutionConfig
from megatron_adadpo.model import build
from megatron_adadpo.model.build import transformer_config
from megatron_adadpo.planner.inputs import PlanInput
from megatron_adadpo.planner.memory import elem_bytes, layer_activation_bytes
from megatron_adadpo.platform.environment import megatron_import_error
from megatron_adadpo.platform.megatron import TransformerConfig
from megatron_adadpo.resolve import CPU, Machine
from megatron_adadpo.resolve.kernels import resolve_kernels
from tests.megatron_helpers import TINY

FUSIONS = (
    "bias_activation_fusion",
    "bias_dropout_fusion",
    "apply_rope_fusion",
    "masked_softmax_fusion",
    "gradient_accumulation_fusion",
)


def _fusions(config: TransformerConfig) -> dict:
    return {name: getattr(config, name) for name in FUSIONS}


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CPU machine's rule")
def test_no_fusion_on_cpu():
    assert not any(_fusions(transformer_config(TINY, ExecutionConfig())).values())


def test_gpu_without_te_or_apex_fuses_what_megatron_accepts():
    """A CUDA machine without TE / apex: SwiGLU and bias-dropout-add fused, the TE RoPE
    kernel and the apex weight-gradient GEMM not (Megatron would raise); Megatron's own
    ``TransformerConfig`` validation accepts the combination."""
    gpu = Machine(has_cuda=True)
    local = ExecutionConfig(transformer_impl="local", bf16=True)
    assert _fusions(transformer_config(TINY, local, resolve_kernels(local, gpu))) == {
        "bias_activation_fusion": True,
        "bias_dropout_fusion": True,
        "apply_rope_fusion": False,
        "masked_softmax_fusion": False,
        "gradient_accumulation_fusion": False,
    }
    off = dataclasses.replace(local, fusions=False)
    assert not any(_fusions(transformer_config(TINY, off, resolve_kernels(off, gpu))).values())
    te_gpu = Machine(has_cuda=True, has_te=True)  # TE resolved, though not installed here
    auto = dataclasses.replace(local, transformer_impl="auto")
    with pytest.raises(ValueError, match="apply_rope_fusion is not available"):
        transformer_config(TINY, local, resolve_kernels(auto, te_gpu))  # Megatron's rule


def test_gpu_with_te_and_apex_fuses_everything():
    gpu = Machine(has_cuda=True, has_te=True, fused_softmax=True, fused_weight_grad=True)
    fused = build.kernel_fusions(resolve_kernels(ExecutionConfig(), gpu))
    assert all(fused[n] for n in FUSIONS)
    assert not any(build.kernel_fusions(resolve_kernels(ExecutionConfig(), CPU)).values())


def test_fp8_delayed_scaling_uses_megatron_lm_llama3_settings():
    run = ExecutionConfig(fp8="hybrid", transformer_impl="transformer_engine", bf16=True)
    config = transformer_config(TINY, run)
    assert (config.fp8, config.fp8_recipe) == ("hybrid", "delayed")
    assert (config.fp8_amax_history_len, config.fp8_amax_compute_algo) == (1024, "max")
    assert config.fp8_margin == 0
    custom = dataclasses.replace(run, fp8_amax_history_len=16, fp8_amax_compute_algo="most_recent")
    config = transformer_config(TINY, custom)
    assert (config.fp8_amax_history_len, config.fp8_amax_compute_algo) == (16, "most_recent")
    assert transformer_config(TINY, ExecutionConfig()).fp8 is None


def test_planner_counts_the_unfused_swiglu_tensor():
    """Unfused SwiGLU keeps ``silu(gate)`` too: ``e * s * b * ffn / tp`` more bytes per layer."""
    p = PlanInput(model=TINY, execution=ExecutionConfig(tp=2, bf16=True), seq_length=512)
    unfused = p.with_execution(fusions=False)
    s, b, f, t = 512, 2 * p.micro_batch_size, TINY.ffn_hidden_size, 2
    extra = elem_bytes(p) * s * b * f / t
    assert layer_activation_bytes(unfused) - layer_activation_bytes(p) == pytest.approx(extra)
    full = p.with_execution(recompute="full")  # only the layer input is kept: no difference
    assert layer_activation_bytes(full) == layer_activation_bytes(
        full.with_execution(fusions=False)
    )


def test_missing_triton_names_the_fix():
    """megatron-core 0.19.2: ``megatron/core/__init__`` -> ... -> ``transformer/moe/ops/
    paged_stash.py`` ``import triton`` (checked on its wheel with CPU torch)."""
    message = megatron_import_error(ModuleNotFoundError("No module named 'triton'", name="triton"))
    assert "needs the triton package" in message and "megatron-core==0.16.1" in message
    other = megatron_import_error(
        ModuleNotFoundError("No module named 'megatron'", name="megatron")
    )
    assert "pip install 'megatron-core>=0.16.1,<0.20'" in other
