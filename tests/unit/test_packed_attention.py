"""How packed rows reach attention, decided from the resolved attention (rules of Megatron-Core
and Transformer Engine that only a GPU with TE runs, encoded here):

- THD ``PackedSeqParams`` only for Transformer Engine's attention: Megatron's own
  ``DotProductAttention`` asserts ``packed_seq_params is None`` (megatron-core 0.16.1
  ``transformer/dot_product_attention.py`` line 153), so ``sdpa`` / ``megatron_local`` beside the
  TE layer spec get the block-diagonal mask instead;
- TE's THD attention has no fp32 backend (TE <= 2.10): packed + TE attention + fp32 is refused
  before any allocation, naming ``execution.bf16``;
- packed + CP needs TE's THD attention."""

from __future__ import annotations

import pytest

from megatron_adadpo.layout import ExecutionConfig
from megatron_adadpo.resolve import CPU, Machine
from megatron_adadpo.resolve.batching import packing_format
from megatron_adadpo.resolve.kernels import kernel_errors, resolve_kernels

TE_MACHINE = Machine(has_cuda=True, has_te=True)  # a CUDA machine with Transformer Engine


def packs_as_thd(execution: ExecutionConfig, machine: Machine) -> bool:
    """The resolved packing format of packed rows is THD."""
    attention = resolve_kernels(execution, machine).attention
    return packing_format("packed", attention) == "thd"


@pytest.mark.parametrize(
    "attention, thd",
    [("auto", True), ("transformer_engine", True), ("sdpa", False)] + [("megatron_local", False)],
)
def test_thd_params_only_for_te_attention_on_a_te_machine(attention, thd):
    execution = ExecutionConfig(transformer_impl="auto", attention=attention, bf16=True)
    assert packs_as_thd(execution, TE_MACHINE) is thd


def test_no_thd_without_te():
    assert not packs_as_thd(ExecutionConfig(transformer_impl="local"), TE_MACHINE)
    assert not packs_as_thd(ExecutionConfig(), CPU)


def test_packed_te_attention_in_fp32_is_refused_naming_bf16():
    (error,) = kernel_errors(ExecutionConfig(bf16=False), TE_MACHINE, "packed")
    assert "execution.bf16=true" in error
    assert kernel_errors(ExecutionConfig(bf16=True), TE_MACHINE, "packed") == []
    assert kernel_errors(ExecutionConfig(bf16=False, attention="sdpa"), TE_MACHINE, "packed") == []


def test_packed_context_parallel_needs_te_attention():
    (error,) = kernel_errors(ExecutionConfig(cp=2, attention="sdpa"), TE_MACHINE, "packed")
    assert "data.batching=token_budget" in error
