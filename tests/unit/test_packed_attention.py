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

from megatron_adadpo.config import _packed_attention_errors
from megatron_adadpo.layout import ExecutionConfig
from megatron_adadpo.platform import environment
from megatron_adadpo.run.packing import packs_as_thd


@pytest.fixture
def te_machine(monkeypatch):
    """A CUDA machine with Transformer Engine, as ``platform.environment`` probes it."""
    monkeypatch.setattr(environment, "cuda_available", lambda: True)
    monkeypatch.setattr(environment, "te_available", lambda: True)


@pytest.mark.parametrize(
    "attention, thd",
    [("auto", True), ("transformer_engine", True), ("sdpa", False)] + [("megatron_local", False)],
)
def test_thd_params_only_for_te_attention_on_a_te_machine(te_machine, attention, thd):
    execution = ExecutionConfig(transformer_impl="auto", attention=attention, bf16=True)
    assert packs_as_thd(execution) is thd


def test_no_thd_without_te():
    assert not packs_as_thd(ExecutionConfig(transformer_impl="local"))


def test_packed_te_attention_in_fp32_is_refused_naming_bf16():
    (error,) = _packed_attention_errors(ExecutionConfig(bf16=False), "transformer_engine")
    assert "execution.bf16=true" in error
    assert _packed_attention_errors(ExecutionConfig(bf16=True), "transformer_engine") == []
    assert _packed_attention_errors(ExecutionConfig(bf16=False), "sdpa") == []


def test_packed_context_parallel_needs_te_attention():
    (error,) = _packed_attention_errors(ExecutionConfig(cp=2), "sdpa")
    assert "data.batching=token_budget" in error
