"""SDPA core attention (``model/attention.py``) vs Megatron's ``DotProductAttention``.

The module alone against an fp64 formula (causal fast path, a given mask combined with
causality, GQA, scale, dropout), then whole GPT models with GQA and Llama-3 RoPE scaling through
Megatron's schedule at TP1, TP2, TP2 + SP and PP2: logits, per-token log-probs and gradients of
the SDPA model equal those of the current local path (same layout, same weights) to 1e-5, with
the causal fast path and with a block-diagonal mask given through ``GPTModel``'s
``attention_mask`` (packed rows).
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from megatron_adadpo.layout import ExecutionConfig
from megatron_adadpo.model.config import RopeScaling
from tests.launcher import run_ranks
from tests.megatron_helpers import (
    TINY,
    attention_inputs,
    attention_reference,
    core_attention_module,
    packed_rows_mask,
    schedule_batches,
    weighted_logprob_step,
)

pytestmark = pytest.mark.distributed

TOL = 1e-5
LLAMA3_TINY = dataclasses.replace(
    TINY,
    rotary_base=500000.0,
    rope_scaling=RopeScaling(
        factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=16
    ),
)


def _module_cases(rank, world):
    from megatron_adadpo.model.attention import SDPAttention
    from megatron_adadpo.platform import distributed as parallel

    parallel.init_model_parallel(ExecutionConfig())
    q, k, v, causal_out = attention_inputs(10, 3, heads=4, groups=2, head_dim=8)
    # two packed sequences per row (lengths 4 + 6, 7 + 3, 10): block-diagonal, True = masked
    packed = packed_rows_mask(10, [4, 7, 10])
    attn = core_attention_module(SDPAttention)
    out = {
        "causal": (attn(q, k, v, None), attention_reference(q, k, v, causal_out, 8**-0.5)),
        # the given mask alone is not causal: the module adds causality
        "packed": (
            attn(q, k, v, packed),
            attention_reference(q, k, v, packed | causal_out, 8**-0.5),
        ),
    }
    scaled = core_attention_module(SDPAttention, softmax_scale=0.3)
    out["scale"] = (scaled(q, k, v, None), attention_reference(q, k, v, causal_out, 0.3))
    try:
        attn(q, k, v, packed.float())
        out["float_mask"] = "accepted"
    except TypeError as err:
        out["float_mask"] = str(err)
    out["dropout"] = _dropout_case(q, k, v)
    return out


def _dropout_case(q, k, v):
    from megatron_adadpo.model.attention import SDPAttention
    from megatron_adadpo.platform.megatron import tensor_parallel

    attn = core_attention_module(SDPAttention, dropout=0.5)
    attn.eval()
    evaluated = attn(q, k, v, None)
    attn.train()
    runs = []
    for _ in range(2):
        tensor_parallel.model_parallel_cuda_manual_seed(11)
        torch.manual_seed(5)  # the default generator differs from the tracker's
        runs.append(attn(q, k, v, None))
    return evaluated, runs


def test_module_matches_fp64_formula():
    out = run_ranks(_module_cases, 1)[0]
    for case in ("causal", "packed", "scale"):
        got, ref = out[case]
        assert (got.double() - ref).abs().max() <= 1e-6, case
    assert "bool tensor with True = masked out" in out["float_mask"]
    evaluated, (first, second) = out["dropout"]
    assert (evaluated.double() - out["causal"][1]).abs().max() <= 1e-6  # no dropout in eval
    assert torch.equal(first, second)  # drawn from Megatron's model-parallel RNG tracker
    assert not torch.allclose(first, evaluated)


def test_gqa_without_copies_except_masked_on_cuda():
    """torch's ``sdp_utils.cpp`` (CUDA): flash takes GQA but no mask; the memory-efficient
    kernel takes a mask but GQA only in recent releases (never on ROCm), so masked CUDA
    attention repeats K/V rather than fall back to the math kernel."""
    from megatron_adadpo.model.attention import native_gqa_allowed

    assert native_gqa_allowed(masked=False, device_type="cuda")
    assert native_gqa_allowed(masked=False, device_type="cpu")
    assert native_gqa_allowed(masked=True, device_type="cpu")
    assert not native_gqa_allowed(masked=True, device_type="cuda")


def test_unknown_attention_choice_is_refused():
    from megatron_adadpo.resolve.layout import layout_errors

    errors = layout_errors(
        TINY, ExecutionConfig(attention="flash"), micro_batch_size=1, global_batch_size=1
    )
    assert errors == ["execution.attention='flash'; accepted: auto, sdpa, megatron_local"]
    errors = layout_errors(
        TINY, ExecutionConfig(cp=2, attention="sdpa"), micro_batch_size=1, global_batch_size=1
    )
    assert any("execution.attention=auto" in e for e in errors)


def _model_outputs(rank, world, layout: dict):
    """Logits, log-probs (last stage) and this rank's gradient shards, per attention impl."""
    from functools import partial

    from megatron_adadpo.model.build import build_model
    from megatron_adadpo.model.initialization import init_layout_invariant
    from megatron_adadpo.platform import distributed as parallel
    from megatron_adadpo.run.step import run_schedule

    parallel.init_model_parallel(ExecutionConfig(**layout))
    out = {}
    for attention in ("megatron_local", "sdpa"):
        chunks = build_model(LLAMA3_TINY, ExecutionConfig(**layout, attention=attention))
        init_layout_invariant(chunks, seed=7, vocab_size=TINY.vocab_size)
        records = []
        run_schedule(chunks, schedule_batches(), partial(weighted_logprob_step, records), False)
        grads = {n: p.grad.clone() for c in chunks for n, p in c.named_parameters()}
        kinds = {type(layer.self_attention.core_attention).__name__ for layer in _layers(chunks)}
        out[attention] = records, grads, kinds
    return out


def _layers(chunks):
    return [layer for chunk in chunks for layer in chunk.decoder.layers]


@pytest.mark.parametrize(
    "layout",
    [
        dict(),
        dict(tp=2),
        dict(tp=2, sequence_parallel=True),
        dict(pp=2),
    ],
    ids=["tp1", "tp2", "tp2_sp", "pp2"],
)
def test_sdpa_model_equals_local_path(layout):
    world = layout.get("tp", 1) * layout.get("pp", 1)
    for rank_out in run_ranks(_model_outputs, world, layout, timeout=240):
        (local_records, local_grads, local_kind) = rank_out["megatron_local"]
        (sdpa_records, sdpa_grads, sdpa_kind) = rank_out["sdpa"]
        assert local_kind == {"DotProductAttention"} and sdpa_kind == {"SDPAttention"}
        assert len(sdpa_records) == len(local_records)
        for (kind, got), (_, ref) in zip(sdpa_records, local_records, strict=True):
            assert (got - ref).abs().max() <= TOL * max(1.0, ref.abs().max()), kind
        assert sdpa_grads.keys() == local_grads.keys() and local_grads
        for name, ref in local_grads.items():
            err = (sdpa_grads[name] - ref).norm() / ref.norm().clamp(min=1e-30)
            assert err <= TOL, f"{name}: {err:.2e}"
        assert not math.isnan(sum(float(g.norm()) for g in sdpa_grads.values()))


def _default_attention_kinds(rank, world):
    from megatron_adadpo.model.build import build_model
    from megatron_adadpo.platform import distributed as parallel

    parallel.init_model_parallel(ExecutionConfig())
    chunks = build_model(TINY, ExecutionConfig())  # execution.attention: auto
    return {type(layer.self_attention.core_attention).__name__ for layer in _layers(chunks)}


def test_auto_attention_is_sdpa_without_transformer_engine():
    """``execution.attention: auto`` on a machine without TE (this one): the local spec with
    torch SDPA in every layer, not Megatron's ``DotProductAttention``."""
    from megatron_adadpo.platform.environment import te_available

    if te_available():
        pytest.skip("Transformer Engine installed: auto is TE's attention")
    (kinds,) = run_ranks(_default_attention_kinds, 1, timeout=120)
    assert kinds == {"SDPAttention"}
