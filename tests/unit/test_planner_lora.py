"""The planner's LoRA memory: adapter parameters counted as Megatron holds them (built
models with adapters at TP1 / TP2 / PP2), and only they have gradients and optimizer state."""

import pytest

from megatron_adadpo.layout import ExecutionConfig
from megatron_adadpo.model.lora_config import LoraSection
from megatron_adadpo.planner.inputs import PlanInput
from megatron_adadpo.planner.memory import stage_memory
from megatron_adadpo.planner.params import adapter_params, stage_params
from tests.launcher import run_ranks
from tests.megatron_helpers import TINY

LORA = LoraSection(rank=4, target_modules=["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"])
WITH_HEAD = LoraSection(rank=4, target_modules=["linear_fc1", "linear_proj", "output_layer"])


def _count_adapters(rank, world, tp, pp, lora):
    from megatron_adadpo.model.lora import add_adapters
    from megatron_adadpo.platform.megatron import parallel_state
    from tests.megatron_helpers import tiny_model

    run = ExecutionConfig(tp=tp, pp=pp, transformer_impl="local")
    chunks = tiny_model(run)
    add_adapters(chunks, lora, seed=0)
    count = sum(p.numel() for c in chunks for p in c.parameters() if p.requires_grad)
    return parallel_state.get_pipeline_model_parallel_rank(), count


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (1, 2)])
@pytest.mark.parametrize("lora", [LORA, WITH_HEAD], ids=["layers", "with_head"])
def test_adapter_params_match_built_model(tp, pp, lora):
    for pp_rank, count in run_ranks(_count_adapters, tp * pp, tp, pp, lora):
        assert count == adapter_params(TINY, lora, tp, pp, pp_rank) > 0


def test_lora_memory_has_no_base_gradients_optimizer_or_reference():
    run = ExecutionConfig(tp=2, bf16=True)
    full = PlanInput(model=TINY, execution=run, reference="resident")
    lora = full.replace(lora=LORA, reference="adapters_off")
    a = stage_memory(full, dp=2, num_micro=4, pp_rank=0, chunk=0)  # unchunked log-probs
    b = stage_memory(lora, 2, 4, 0, 0)
    n, n_a = stage_params(TINY, tp=2).total, adapter_params(TINY, LORA, tp=2)
    assert b.params == n + n_a and b.weights == 2 * (n + n_a)
    assert b.gradients == 4 * n_a and a.gradients == 4 * n
    assert b.optimizer == 12 * n_a / 2  # fp32 master + Adam m, v, distributed over DP 2
    assert b.reference == 0 and a.reference == 2 * n
    assert b.activations == a.activations
