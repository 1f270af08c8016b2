"""``SDPAttention`` on a CUDA GPU in bf16 (torch's flash / memory-efficient kernels): the causal
fast path (``enable_gqa``) and a packed-rows mask (K/V repeated for the memory-efficient kernel)
against an fp64 formula; skipped without CUDA."""

import pytest

from tests.megatron_helpers import (
    attention_inputs,
    attention_reference,
    core_attention_module,
    packed_rows_mask,
)

pytestmark = pytest.mark.gpu


def test_sdpa_bf16_on_cuda_matches_fp64():
    from megatron_adadpo.layout import ExecutionConfig
    from megatron_adadpo.model.attention import SDPAttention
    from megatron_adadpo.platform import distributed

    distributed.init_distributed()
    distributed.init_model_parallel(ExecutionConfig())
    q, k, v, causal = attention_inputs(256, 2, heads=8, groups=2, head_dim=64)
    packed = packed_rows_mask(256, [100, 180])
    attn = core_attention_module(SDPAttention, heads=8, groups=2, head_dim=64).cuda()
    cuda = [t.cuda().bfloat16() for t in (q, k, v)]
    for mask, masked_out in ((None, causal), (packed, packed | causal)):
        got = attn(*cuda, None if mask is None else mask.cuda()).double().cpu()
        ref = attention_reference(q, k, v, masked_out, 64**-0.5)
        assert (got - ref).abs().max() <= 3e-2 * ref.abs().max()
    distributed.destroy()
