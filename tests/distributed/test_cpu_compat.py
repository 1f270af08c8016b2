"""The CPU compatibility layer: real Megatron code on CPU, every redirect known and counted."""

import pytest
import torch

from megatron_adadpo.layout import ExecutionConfig
from megatron_adadpo.logprobs import sequence_logprobs, token_logprobs
from megatron_adadpo.losses import LossConfig, preference_loss
from megatron_adadpo.model.initialization import global_param_names
from megatron_adadpo.platform import cpu
from megatron_adadpo.platform.megatron import parallel_state
from tests.launcher import run_ranks
from tests.megatron_helpers import TINY, tiny_model

pytestmark = pytest.mark.distributed


def _adadpo_through_gpt(rank, world, tp):
    """GPTModel fwd+bwd -> vocab-parallel logits -> our log-probs -> AdaDPO loss."""
    [model] = tiny_model(ExecutionConfig(tp=tp))
    g = torch.Generator().manual_seed(11)
    tokens = torch.randint(0, TINY.vocab_size, (4, 24), generator=g)  # [c0, r0, c1, r1]
    labels = torch.roll(tokens, -1, dims=1)
    mask = torch.zeros(4, 24)
    mask[:, 8:20] = 1.0
    mask[1, 17:] = 0.0
    position_ids = torch.arange(24).expand(4, 24)
    logits = model(tokens, position_ids, None)  # [b, s, v/tp]
    tp_group = parallel_state.get_tensor_model_parallel_group()
    logps = token_logprobs(logits.transpose(0, 1), labels, tp_group)
    sums, counts = sequence_logprobs(logps, mask)
    ref = sums.detach() + torch.tensor([0.3, -0.2, -0.5, 0.4])
    losses, _ = preference_loss(
        LossConfig(), sums[0::2], sums[1::2], counts[0::2], counts[1::2], ref[0::2], ref[1::2]
    )
    loss = losses.mean()
    loss.backward()
    grads = {}
    group = parallel_state.get_tensor_model_parallel_group()
    for name, p in global_param_names(model).items():
        grad = p.grad
        if getattr(p, "tensor_model_parallel", False) and tp > 1:
            parts = [torch.empty_like(grad) for _ in range(tp)]
            torch.distributed.all_gather(parts, grad.contiguous(), group=group)
            if "linear_fc1" in name:
                halves = [x.chunk(2, p.partition_dim) for x in parts]
                parts = [h[0] for h in halves] + [h[1] for h in halves]
            grad = torch.cat(parts, p.partition_dim)
        if "word_embeddings" in name or "output_layer" in name:
            grad = grad[: TINY.vocab_size]
        grads[name] = grad
    return loss.detach(), grads, cpu.redirect_counts()


def test_tp2_gpt_adadpo_matches_tp1():
    loss1, grads1, _ = run_ranks(_adadpo_through_gpt, 1, 1)[0]
    loss2, grads2, counts = run_ranks(_adadpo_through_gpt, 2, 2)[0]
    assert loss1 > 0
    torch.testing.assert_close(loss2, loss1, rtol=1e-6, atol=1e-7)
    assert set(grads1) == set(grads2)
    for name, g in grads1.items():
        assert g.norm() > 0, name
        err = (grads2[name] - g).norm() / g.norm()
        assert err < 1e-5, f"{name}: {err:.2e}"
    kinds = {kind for kind, _ in counts}
    assert kinds <= cpu.KNOWN_REDIRECTS
    assert "torch.cuda.current_device" in kinds  # Megatron really needed the layer
    assert all(site.startswith("megatron/core/") for _, site in counts), counts


def _redirect_rank(rank, world):
    cpu.reset_counts()
    x = torch.zeros(3, device="cuda")
    y = torch.ones(2).cuda()
    assert x.device.type == "cpu" and y.device.type == "cpu"
    # CUDA types stay types: transformers 5 evaluates ``torch.cuda.Stream | None`` at import.
    assert isinstance(torch.cuda.Stream(), torch.cuda.Stream)
    assert (torch.cuda.Stream | None) is not None and isinstance(torch.cuda.Event, type)
    with pytest.raises(RuntimeError, match="unknown CUDA feature 'torch.cuda.new_feature'"):
        cpu._record("torch.cuda.new_feature")
    return cpu.redirect_counts()


def test_redirects_are_counted_per_call_site_and_unknown_ones_fail():
    counts = run_ranks(_redirect_rank, 1)[0]
    sites = {kind: site for kind, site in counts}
    assert "test_cpu_compat.py" in sites["device=cuda"]
    assert "test_cpu_compat.py" in sites["Tensor.cuda"]
    assert "test_cpu_compat.py" in sites["torch.cuda.Stream"]


def test_inactive_when_cuda_is_present(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(cpu, "_active", False)
    assert cpu.activate() is False
