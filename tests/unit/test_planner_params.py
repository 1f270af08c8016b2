"""The planner's parameters per rank equal what megatron-core builds for the same config."""

from __future__ import annotations

import dataclasses

import pytest

from megatron_adadpo.layout import ExecutionConfig
from megatron_adadpo.model.build import build_model, transformer_config
from megatron_adadpo.model.config import ModelConfig
from megatron_adadpo.model.norm import RMSNorm
from megatron_adadpo.planner import layer_params, stage_params, total_params
from megatron_adadpo.platform.distributed import init_model_parallel
from megatron_adadpo.platform.megatron import parallel_state
from tests.launcher import run_ranks

TINY = ModelConfig(
    num_layers=4,
    hidden_size=64,
    ffn_hidden_size=96,
    num_attention_heads=4,
    num_query_groups=2,
    vocab_size=200,  # padded to 256 (TP1/TP2 with make_vocab_size_divisible_by=128)
    make_vocab_size_divisible_by=128,
)
LLAMA3_70B = ModelConfig(
    num_layers=80,
    hidden_size=8192,
    ffn_hidden_size=28672,
    num_attention_heads=64,
    num_query_groups=8,
    vocab_size=128256,
    rotary_base=500000.0,
)


def _count_built(rank, world_size, model, tp, pp, vpp):
    execution = ExecutionConfig(tp=tp, pp=pp, vpp=vpp)
    init_model_parallel(execution)
    chunks = build_model(model, execution)
    n = sum(p.numel() for c in chunks for p in c.parameters())
    return parallel_state.get_pipeline_model_parallel_rank(), n


@pytest.mark.distributed
@pytest.mark.parametrize(
    "tp,pp,vpp,tied",
    [
        (1, 1, None, False),
        (2, 1, None, False),
        (1, 2, None, False),
        (2, 2, None, False),
        (1, 2, 2, False),
        (1, 2, None, True),
        (2, 1, None, True),
    ],
)
def test_params_per_rank_match_megatron(tp, pp, vpp, tied):
    model = dataclasses.replace(TINY, tie_word_embeddings=tied)
    built = run_ranks(_count_built, tp * pp, model, tp, pp, vpp)
    for pp_rank, n in built:
        assert n == stage_params(model, tp, pp, pp_rank, vpp).total, (pp_rank, n)


class _FakeGroup:
    """A process group that only answers size() and rank(): TP rank 0 of ``size``."""

    def __init__(self, size: int):
        self._size = size

    def size(self) -> int:
        return self._size

    def rank(self) -> int:
        return 0


def _build_70b_shards(rank, world_size, tp):
    import torch.distributed as dist
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.tensor_parallel import ColumnParallelLinear, VocabParallelEmbedding
    from megatron.core.transformer.spec_utils import build_module

    model = LLAMA3_70B
    cfg = transformer_config(model, ExecutionConfig(tp=tp, bf16=True, sequence_parallel=True))
    cfg = dataclasses.replace(cfg, perform_initialization=False, use_cpu_initialization=True)
    world, fake = dist.group.WORLD, _FakeGroup(tp)
    pg = ProcessGroupCollection()
    pg.tp, pg.tp_cp, pg.pp, pg.cp, pg.dp, pg.dp_cp = fake, fake, world, world, world, world
    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    spec.submodules = dataclasses.replace(
        spec.submodules, input_layernorm=RMSNorm, pre_mlp_layernorm=RMSNorm
    )
    layer = build_module(spec, config=cfg, layer_number=1, pg_collection=pg)
    vocab = model.padded_vocab_size(tp)
    emb = VocabParallelEmbedding(
        vocab, model.hidden_size, init_method=cfg.init_method, config=cfg, tp_group=fake
    )
    out = ColumnParallelLinear(
        model.hidden_size,
        vocab,
        config=cfg,
        init_method=cfg.init_method,
        bias=False,
        gather_output=False,
        tp_group=fake,
    )
    shapes = {n: tuple(p.shape) for n, p in layer.named_parameters()}
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    return count(layer), count(emb), count(out), shapes


@pytest.mark.distributed
def test_llama3_70b_layer_as_tp_rank0_of_8_matches_planner():
    layer, emb, out, shapes = run_ranks(_build_70b_shards, 1, 8)[0]
    assert shapes["self_attention.linear_qkv.weight"] == (1280, 8192)  # (64 + 2*8)*128 / 8
    assert shapes["mlp.linear_fc1.weight"] == (7168, 8192)  # 2 * 28672 / 8
    assert layer == layer_params(LLAMA3_70B, tp=8) == 106_971_136
    s0 = stage_params(LLAMA3_70B, tp=8, pp=4, pp_rank=0, vpp=5)
    s3 = stage_params(LLAMA3_70B, tp=8, pp=4, pp_rank=3, vpp=5)
    assert s0.embedding == emb and s3.output_layer == out == 129024 // 8 * 8192
    assert s0.layers == 20 * layer and s3.final_norm == 8192
    # Whole model: the HF count (70.55 B) plus vocab padding rows (129024 - 128256) x 2 x h.
    padding = (129024 - 128256) * 2 * 8192
    assert total_params(LLAMA3_70B, tp=8) == LLAMA3_70B.num_parameters() + padding


def test_total_params_of_known_models():
    llama3_8b = dataclasses.replace(
        LLAMA3_70B, num_layers=32, hidden_size=4096, ffn_hidden_size=14336, num_attention_heads=32
    )
    assert llama3_8b.num_parameters() == 8_030_261_248  # HF Meta-Llama-3-8B
    assert LLAMA3_70B.num_parameters() == 70_553_706_496  # HF Meta-Llama-3-70B
    assert total_params(llama3_8b, tp=2) == llama3_8b.num_parameters()  # 128256 % 256 == 0
