"""The loss library on CUDA: no host synchronisation, same values as CPU. Skipped without CUDA.

Runnable without pytest as well: ``python tests/unit/test_losses_cuda.py``.
"""

from __future__ import annotations

import itertools
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from megatron_adadpo.losses import LOSSES, LossConfig, preference_loss  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]
MODES = list(
    itertools.product(
        sorted(LOSSES),
        ("reference", "policy"),
        ("token_mean", "sequence"),
        ("chosen", "rejected", "split"),
    )
)


def inputs(device, dtype, b=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    n_w, n_l = torch.randint(0, 2048, (b,), generator=g), torch.randint(0, 2048, (b,), generator=g)
    logps = lambda n: (-12.0 + torch.randn(b, generator=g)) * n  # noqa: E731
    vals = [logps(n_w), logps(n_l), logps(n_w), logps(n_l), torch.rand(b, generator=g) + 1]
    vals = [v.to(device=device, dtype=dtype) for v in vals]
    vals[0].requires_grad_()
    vals[1].requires_grad_()
    return vals[:2] + [n_w.to(device), n_l.to(device)] + vals[2:]


def run_mode(mode, device, dtype, args=None):
    name, space, normalize, placement = mode
    cfg = LossConfig(
        name=name,
        adaptive=LOSSES[name].adaptive_form,  # refused (with the reason) where there is none
        balance_space=space,
        normalize=normalize,
        placement=placement,
        label_smoothing=1e-3 if name == "exo_pair" else 0.0,  # EXO's eps must be > 0
    )
    args = args if args is not None else inputs(device, dtype)
    losses, metrics = preference_loss(cfg, *args[:6], chosen_nll=args[6])
    losses.sum().backward()
    return losses, metrics, args[0].grad, args[1].grad


def test_no_host_sync_and_finite_bf16():
    prepared = [inputs("cuda", torch.bfloat16) for _ in MODES]  # H2D copies happen here
    LossConfig()  # warm the imports / registry
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        outs = [run_mode(m, "cuda", None, a) for m, a in zip(MODES, prepared, strict=True)]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for mode, (losses, metrics, g_w, g_l) in zip(MODES, outs, strict=True):
        assert torch.isfinite(losses).all() and torch.isfinite(g_w).all(), mode
        assert torch.isfinite(g_l).all() if mode[0] != "sft" else g_l is None, mode  # no l_l
        undefined = ("ada/grad_balance", "ada/log_prob_balance")  # NaN: sft, aot (no pair term)
        no_balance = mode[0] in ("sft", "aot", "aot_unpaired")
        assert all(
            torch.isfinite(v).all()
            for k, v in metrics.items()
            if not k.endswith(("_min", "_max")) and not (no_balance and k in undefined)
        ), mode


def test_cuda_matches_cpu_fp64():
    for mode in MODES:
        cpu = run_mode(mode, "cpu", torch.float64)
        gpu = run_mode(mode, "cuda", torch.float64)
        for a, b in zip(cpu[0:1] + cpu[2:], gpu[0:1] + gpu[2:], strict=True):
            if a is None:  # sft: the rejected answer carries no loss
                assert b is None
                continue
            torch.testing.assert_close(b.cpu(), a, rtol=1e-9, atol=1e-9, msg=str(mode))
        for k in cpu[1]:
            torch.testing.assert_close(
                gpu[1][k].cpu(),
                cpu[1][k],
                rtol=1e-9,
                atol=1e-9,
                equal_nan=True,  # the undefined balance of sft / aot
                msg=f"{mode} {k}",
            )


if __name__ == "__main__":
    test_no_host_sync_and_finite_bf16()
    test_cuda_matches_cpu_fp64()
    print(f"OK: {len(MODES)} modes, no host sync, CUDA == CPU")
