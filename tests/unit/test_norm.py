"""The local spec's RMSNorm (``model/norm.py``) against HF Llama's, forward and backward."""

import pytest
import torch

from megatron_adadpo.model.norm import RMSNorm
from megatron_adadpo.platform.megatron import TransformerConfig


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_matches_hf_llama(dtype):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    config = TransformerConfig(num_layers=1, hidden_size=64, num_attention_heads=4)
    ours = RMSNorm(config, 64, eps=1e-6).to(dtype)
    hf = LlamaRMSNorm(64, eps=1e-6).to(dtype)
    g = torch.Generator().manual_seed(0)
    weight = 1 + 0.3 * torch.randn(64, generator=g)
    with torch.no_grad():
        ours.weight.copy_(weight)
        hf.weight.copy_(weight)
    x = (3 * torch.randn(5, 2, 64, generator=g)).to(dtype)
    grad = torch.randn(5, 2, 64, generator=g).to(dtype)
    outputs = []
    for module in (ours, hf):
        xi = x.clone().requires_grad_(True)
        y = module(xi)
        y.backward(grad)
        outputs.append((y.detach().float(), xi.grad.float(), module.weight.grad.float()))
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    for got, ref in zip(outputs[0], outputs[1], strict=True):
        assert (got - ref).abs().max() <= tol * ref.abs().max()
