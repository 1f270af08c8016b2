"""Resume with torch's Adam: each ``step`` sits where torch's own rule puts it.

Reference: torch 2.13 ``torch/optim/optimizer.py`` ``_process_value_according_to_param_policy``
(lines 794-798): on ``load_state_dict``, ``step`` goes to the parameter's device as fp32 when
its group is ``fused`` or ``capturable``, and stays as given otherwise (``adam.py`` 165-175:
"special device hosting for step"). A CPU ``step`` beside a CUDA parameter in a fused group
is what the fused CUDA kernel cannot read (issue 22: resume on a CUDA host without TE/apex).
A ``meta`` device stands in for CUDA, so the test sees a device change on a CPU-only host.
"""

from types import SimpleNamespace

import torch

from megatron_adadpo.platform.megatron_optimizer import init_optimizer_state, restore_adam_steps


def _adam(capturable: bool) -> torch.optim.AdamW:
    params = [torch.nn.Parameter(torch.zeros(3, device="meta")) for _ in range(2)]
    return torch.optim.AdamW(params, lr=1e-3, capturable=capturable, foreach=False)


def _torch_placement(adam: torch.optim.AdamW, param, step: torch.Tensor) -> tuple:
    """Where torch's load rule puts ``step`` for ``param`` (the reference)."""
    groups = adam.state_dict()["param_groups"]
    index = [id(p) for g in adam.param_groups for p in g["params"]].index(id(param))
    placed = torch.optim.Optimizer._process_value_according_to_param_policy(
        param, step, index, groups, "step"
    )
    return placed.device, placed.dtype


def test_restored_steps_follow_torchs_rule_per_group():
    for capturable in (True, False):
        adam = _adam(capturable)
        wrapper = SimpleNamespace(optimizer=adam)
        init_optimizer_state(wrapper)
        shared = torch.tensor(7.0)  # DistributedOptimizer.load_state_dict (0.16.1): one CPU step
        for group in adam.param_groups:
            group["step"] = 7
            for p in group["params"]:
                adam.state[p]["step"] = shared
        restore_adam_steps(wrapper)
        steps = [adam.state[p]["step"] for p in adam.param_groups[0]["params"]]
        for p, step in zip(adam.param_groups[0]["params"], steps, strict=True):
            assert (step.device, step.dtype) == _torch_placement(adam, p, shared), capturable
            assert step.device.type == ("meta" if capturable else "cpu")
        assert steps[0] is not steps[1]  # one tensor per parameter
        if not capturable:
            assert [float(s) for s in steps] == [7.0, 7.0]


def test_initial_state_is_placed_like_torchs_lazy_init():
    """``init_optimizer_state`` mirrors ``adam.py`` ``_init_group`` (2.13, lines 165-175)."""
    for capturable in (True, False):
        adam = _adam(capturable)
        init_optimizer_state(SimpleNamespace(optimizer=adam))
        for p in adam.param_groups[0]["params"]:
            step = adam.state[p]["step"]
            assert (step.device, step.dtype) == _torch_placement(adam, p, torch.tensor(0.0))
