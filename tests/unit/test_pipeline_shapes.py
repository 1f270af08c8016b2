"""Packed rows under a pipeline have one shape: no shape exchange before each p2p send.

Upstream rules (megatron-core 0.16.1 and 0.19.2, ``pipeline_parallel/``):

- ``p2p_communication.py`` ``_communicate`` (0.16.1 line 301, 0.19.2 line 322): with
  ``config.variable_seq_lengths`` every send is preceded by ``_communicate_shapes``, a blocking
  exchange that ends in ``torch.cuda.synchronize()`` (0.16.1 line 242); without it the receive
  buffers take the schedule's ``tensor_shape``;
- ``schedules.py`` ``get_tensor_shapes`` (0.16.1 line 1946, 0.19.2 line 2093): that shape is
  ``(seq_length / CP (/ TP with SP), micro_batch_size, hidden)``, from the arguments of
  ``forward_backward_func``; the schedule reads the config of ``model[0]``
  (``get_model_config``), i.e. the ``TransformerConfig`` built here.

So the pipeline may drop the exchange exactly when every micro-batch of a schedule call has the
shape the schedule is told: packed rows of a step all padded to the step's longest row
(``BatchingPolicy.step_row_tokens``, at most the token budget; ``run_schedule`` passes the first
micro-batch's length as ``seq_length``).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from megatron_adadpo.data.batching import plan_global_batch
from megatron_adadpo.data.packing import collate_packed
from megatron_adadpo.layout import ExecutionConfig
from megatron_adadpo.model.build import transformer_config
from megatron_adadpo.resolve.batching import batching_policy
from tests.megatron_helpers import TINY

BUDGET = 96


class _Group:
    """A stand-in process group: ``get_tensor_shapes`` reads ``size()`` only."""

    def __init__(self, size: int):
        self._size = size

    def size(self) -> int:
        return self._size


def _pair(chosen: int, rejected: int) -> dict:
    return {
        "chosen_ids": np.arange(3, 3 + chosen),
        "rejected_ids": np.arange(4, 4 + rejected),
        "prompt_length": 2,
        "pair_id": chosen * 100 + rejected,
    }


@pytest.mark.parametrize("packed", [True, False])
def test_the_schedule_sees_fixed_shapes_exactly_for_packed_pipelines(packed):
    config = transformer_config(TINY, ExecutionConfig(pp=2), packed_sequences=packed)
    assert config.variable_seq_lengths is (not packed)
    one_stage = transformer_config(TINY, ExecutionConfig(), packed_sequences=packed)
    assert one_stage.variable_seq_lengths is False  # no pipeline: nothing is sent


def _step(execution: ExecutionConfig, seed: int = 0):
    """A packed step of 24 random pairs under ``execution``: policy, lengths, pairs, plan."""
    policy = batching_policy("packed", BUDGET, execution, micro_batch_size=1)
    rng = np.random.default_rng(seed)
    pairs = [_pair(*rng.integers(4, 40, 2)) for _ in range(24)]
    lengths = np.array([[len(p["chosen_ids"]), len(p["rejected_ids"])] for p in pairs])
    (micro,) = plan_global_batch(policy, lengths, dp_size=1)
    return policy, lengths, pairs, micro


@pytest.mark.parametrize("layout", [dict(pp=2), dict(pp=2, cp=2), dict(pp=2, tp=2, vpp=2)])
def test_every_packed_row_of_a_step_has_the_shape_the_schedule_allocates(layout):
    from megatron.core.pipeline_parallel.schedules import get_tensor_shapes

    sp = layout.get("tp", 1) > 1
    execution = ExecutionConfig(**layout, sequence_parallel=sp)
    policy, lengths, pairs, micro = _step(execution)
    assert policy.fixed_rows and len(micro) > 1 and len(micro) % policy.microbatch_multiple == 0
    assert sorted(p for m in micro for p in m) == list(range(len(pairs)))  # every pair once
    row = policy.step_row_tokens(lengths, micro)
    rows = [collate_packed([pairs[i] for i in m], 0, row, policy.segment_multiple) for m in micro]
    assert {r["tokens"].shape for r in rows} == {(1, row)}
    assert row <= BUDGET and row % execution.pad_multiple == 0
    config = transformer_config(TINY, execution, packed_sequences=True)
    shapes = get_tensor_shapes(
        seq_length=rows[0]["tokens"].shape[1],  # what run_schedule passes (CP = 1 here)
        micro_batch_size=1,
        decoder_seq_length=None,
        config=config,
        tp_group=_Group(execution.tp),
        cp_group=_Group(execution.cp),
    )
    local = row // execution.cp // (execution.tp if sp else 1)
    assert shapes == [(local, 1, TINY.hidden_size)]  # the hidden states each stage sends


@pytest.mark.parametrize("seed", range(5))
def test_fixed_rows_cost_no_more_than_first_fit_rows_padded_to_the_budget(seed):
    """The step's rows are rebalanced before they are padded to the longest: never more
    tokens than the first-fit rows padded to the budget, and never more rows than twice."""
    execution = ExecutionConfig(pp=2)
    policy, lengths, _, micro = _step(execution, seed)
    free = dataclasses.replace(policy, fixed_rows=False)
    (first_fit,) = plan_global_batch(free, lengths, dp_size=1)
    processed = len(micro) * policy.step_row_tokens(lengths, micro)
    assert processed <= len(first_fit) * BUDGET
    assert len(first_fit) <= len(micro) <= 2 * len(first_fit)
    assert all(policy.padded_tokens(lengths, m) <= BUDGET for m in micro)


def test_without_a_pipeline_packed_rows_keep_their_own_length():
    policy = batching_policy("packed", BUDGET, ExecutionConfig(), micro_batch_size=1)
    assert not policy.fixed_rows
    assert policy.step_row_tokens(np.array([[5, 7]]), [(0,)]) is None
    assert policy.padded_tokens(np.array([[5, 7]]), (0,)) == 12
