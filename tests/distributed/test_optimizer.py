"""Torch's fused AdamW behind Megatron's optimizer fallback (``platform/megatron.py``).

Megatron-Core 0.16.1 / 0.19 ``optimizer/__init__.py`` builds ``torch.optim.AdamW`` with torch's
defaults when neither Transformer Engine nor apex is installed; the seam switches it to
``fused=True``. Reference: the same model and batches through the plain AdamW (torch's
per-tensor loop, what Megatron ran before), with and without the distributed optimizer.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch

from megatron_adadpo.config import OptimizerSection
from megatron_adadpo.layout import ExecutionConfig
from tests.launcher import run_ranks
from tests.megatron_helpers import schedule_batches, tiny_model, weighted_logprob_step

pytestmark = pytest.mark.distributed


def _train(chunks, section: OptimizerSection, plain: bool, steps: int = 3):
    from megatron_adadpo.platform.megatron_optimizer import torch_optimizers
    from megatron_adadpo.run.optimizer import build_optimizer, wrap_ddp
    from megatron_adadpo.run.step import run_schedule

    policy = wrap_ddp(chunks, section)
    optimizer = build_optimizer(policy, section, bf16=False)
    inner = torch_optimizers(optimizer)
    flags = [(g["fused"], g["foreach"]) for o in inner for g in o.param_groups]
    if plain:
        for group in (g for o in inner for g in o.param_groups):
            group["fused"] = group["foreach"] = False
    for _ in range(steps):
        for chunk in policy:
            chunk.zero_grad_buffer()
        optimizer.zero_grad()
        run_schedule(policy, schedule_batches(), partial(weighted_logprob_step, []), False)
        optimizer.step()
    params = {n: p.detach().clone() for c in chunks for n, p in c.named_parameters()}
    return params, flags, optimizer


def _compare(rank, world, distributed: bool):
    section = OptimizerSection(
        lr=1e-2, weight_decay=0.1, clip_grad=0.5, use_distributed_optimizer=distributed
    )
    plain, _, _ = _train(tiny_model(ExecutionConfig()), section, plain=True)
    fused, flags, optimizer = _train(tiny_model(ExecutionConfig()), section, plain=False)
    initial = {
        n: p.detach().clone()
        for c in tiny_model(ExecutionConfig())
        for n, p in c.named_parameters()
    }
    return plain, fused, initial, flags, _reload(optimizer)


def _reload(optimizer):
    """Flags and ``step`` tensors after a state-dict round trip of a plain-flagged state."""
    from megatron_adadpo.platform.megatron_optimizer import torch_optimizers

    inner = torch_optimizers(optimizer)[0]
    state = inner.state_dict()
    for group in state["param_groups"]:
        group["fused"], group["foreach"] = None, None  # a checkpoint of the old implementation
    inner.load_state_dict(state)
    steps = [inner.state[p]["step"] for g in inner.param_groups for p in g["params"]]
    return [(g["fused"], g["foreach"]) for g in inner.param_groups], steps


@pytest.mark.parametrize("distributed", [False, True], ids=["adamw", "distributed_optimizer"])
def test_fused_adamw_matches_plain_adamw(distributed):
    plain, fused, initial, flags, (reloaded_flags, steps) = run_ranks(_compare, 1, distributed)[0]
    assert flags and all(f == (True, False) for f in flags)
    assert plain.keys() == fused.keys()
    moved = 0
    for name, ref in plain.items():
        assert (fused[name] - ref).abs().max() <= 1e-6, name
        moved += int(not torch.equal(ref, initial[name]))
    assert moved == len(plain)  # every parameter was updated
    assert all(f == (True, False) for f in reloaded_flags)
    assert all(s.dtype == torch.float32 and float(s) == 3.0 for s in steps)
    assert len({id(s) for s in steps}) == len(steps)  # one step tensor per parameter
