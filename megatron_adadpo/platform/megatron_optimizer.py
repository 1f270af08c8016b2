"""Megatron-Core's optimizer, as the plugin runs it: the second file of the Megatron seam.

``get_megatron_optimizer`` with torch's fused Adam where Megatron falls back to torch's;
the distributed optimizer's sharded state in the ``dp_reshardable`` format; torch-Adam state
made loadable before a load (``init_optimizer_state``) and one ``step`` per parameter after it
(``restore_adam_steps``); the parameter all-gather forced before a save (``force_param_sync``).
Version notes are in each docstring (megatron-core 0.16.1 and 0.19.x; ``platform/megatron.py``
holds the rest of the seam).
"""

from __future__ import annotations

import torch
from megatron.core.optimizer import OptimizerConfig
from megatron.core.optimizer import get_megatron_optimizer as _get_megatron_optimizer
from megatron.core.optimizer.optimizer import param_group_identifier_keys as OPTIMIZER_GROUP_KEYS

__all__ = [
    "OPTIMIZER_GROUP_KEYS",
    "OPTIMIZER_SHARDING",
    "OptimizerConfig",
    "force_param_sync",
    "get_megatron_optimizer",
    "init_optimizer_state",
    "optimizer_sharded_state_dict",
    "restore_adam_steps",
    "torch_optimizers",
]


def get_megatron_optimizer(config: OptimizerConfig, model_chunks: list, **kwargs):
    """Megatron's ``get_megatron_optimizer``; where it fell back to ``torch.optim.AdamW`` / ``Adam``
    (no Transformer Engine or apex), the inner optimizers run torch's fused kernel.

    Megatron constructs the fallback with torch's defaults and takes no implementation
    argument (0.16.1 and 0.19 ``optimizer/__init__.py``). Torch's default is the per-tensor
    for-loop on CPU (~20x slower than ``fused=True`` at 100M parameters) and ``foreach`` on CUDA;
    torch's fused AdamW (CPU and CUDA, torch >= 2.4) computes the same update. A
    ``load_state_dict`` post-hook keeps it after a checkpoint load, whose saved param groups
    would otherwise bring back the saved implementation flags.
    """
    optimizer = _get_megatron_optimizer(config, model_chunks, **kwargs)
    for inner in torch_optimizers(optimizer):
        if type(inner) in (torch.optim.AdamW, torch.optim.Adam):
            use_fast_adam(inner)
            inner.register_load_state_dict_post_hook(use_fast_adam)
    return optimizer


def torch_optimizers(optimizer) -> list[torch.optim.Optimizer]:
    """The torch optimizers inside a Megatron optimizer (chained or not; none on a stub)."""
    parts = getattr(optimizer, "chained_optimizers", [optimizer])
    return [
        p.optimizer
        for p in parts
        if isinstance(getattr(p, "optimizer", None), torch.optim.Optimizer)
    ]


FUSED_ADAM_DEVICES = ("cpu", "cuda")  # torch >= 2.4


def use_fast_adam(optimizer: torch.optim.Optimizer) -> None:
    """Switch a torch Adam(W) to its fused kernel (``foreach`` on other devices), in place.

    Each existing ``step`` moves to its parameter's device as fp32, one tensor per parameter,
    as torch keeps it for the fused kernel (Megatron's distributed optimizer restores one
    shared CPU ``step`` tensor for all parameters).
    """
    for group in optimizer.param_groups:
        fused = all(p.device.type in FUSED_ADAM_DEVICES for p in group["params"])
        group["fused"], group["foreach"] = fused, not fused
        for p in group["params"]:
            state = optimizer.state.get(p)
            if state and "step" in state:
                state["step"] = adam_step_tensor(group, p, float(state["step"]))


def adam_step_tensor(group: dict, param: torch.Tensor, step: float) -> torch.Tensor:
    """A torch-Adam ``step`` placed as torch places it: fp32 on the parameter's device when the
    group is ``fused`` or ``capturable``, else an fp32 scalar on the CPU.

    torch 2.13 ``torch/optim/optimizer.py`` ``_process_value_according_to_param_policy``
    (lines 794-798, the rule ``load_state_dict`` applies) and ``torch/optim/adam.py``
    ``_init_group`` (lines 165-175, note "special device hosting for step"); the fused CUDA
    kernel and the capturable path (``adam.py`` 404-410) need ``step`` beside the parameter.
    """
    on_device = group.get("fused") or group.get("capturable")
    device = param.device if on_device else "cpu"
    return torch.tensor(float(step), dtype=torch.float32, device=device)


# Megatron-LM's choice for the distributed optimizer (``megatron/training/checkpointing.py``
# ``_build_sharded_state_dict_metadata``, 0.16.1): the default ``fully_sharded_model_space``
# fails at save with ``ShardedTensor.flattened_range is not supported`` on 0.16.1.
OPTIMIZER_SHARDING = {"distrib_optim_sharding_type": "dp_reshardable"}


def optimizer_sharded_state_dict(
    optimizer, model_sharded_state_dict: dict, is_loading: bool = False
) -> dict:
    """The optimizer's sharded state dict in the ``dp_reshardable`` format
    (``DistributedOptimizer.sharded_state_dict``'s ``metadata['distrib_optim_sharding_type']``;
    other Megatron optimizers ignore it). ``dp_reshardable`` loads at any data-parallel size but
    only at the TP / PP layout it was saved with."""
    return optimizer.sharded_state_dict(
        model_sharded_state_dict, is_loading=is_loading, metadata=dict(OPTIMIZER_SHARDING)
    )


def _torch_adams(optimizer) -> list:
    """The torch ``Adam`` / ``AdamW`` instances inside a Megatron optimizer (chained or not):
    megatron-core's fallback when neither Transformer Engine nor apex provides a fused Adam."""
    inner = [getattr(o, "optimizer", None) for o in getattr(optimizer, "chained_optimizers", [])]
    inner = inner or [getattr(optimizer, "optimizer", None)]
    return [o for o in inner if isinstance(o, (torch.optim.Adam, torch.optim.AdamW))]


def init_optimizer_state(optimizer) -> None:
    """Give an unstepped torch Adam its state (``step`` 0, zero moments) before a load.

    ``DistributedOptimizer.sharded_state_dict(is_loading=True)`` first calls
    ``self.load_state_dict(self.state_dict())``, whose torch-Adam branch reads every
    parameter's ``state["step"]`` (``distrib_optimizer.py`` 0.16.1 ``state_dict``): on a fresh
    optimizer that is a bare ``AssertionError``. Fused Adams (TE / apex) keep ``step`` in the
    param groups and need nothing. The values are overwritten by the load.
    """
    for adam in _torch_adams(optimizer):
        for group in adam.param_groups:
            for param in group["params"]:
                if not adam.state[param]:
                    adam.state[param] = {
                        "step": adam_step_tensor(group, param, 0.0),
                        "exp_avg": torch.zeros_like(param),
                        "exp_avg_sq": torch.zeros_like(param),
                    }


def restore_adam_steps(optimizer) -> None:
    """After a load, give each torch-Adam parameter its own ``step`` tensor from its group.

    ``DistributedOptimizer.load_state_dict`` (0.16.1) assigns ONE step tensor to every
    parameter's state; torch's foreach Adam then increments it once per parameter per step, so
    bias correction after a resume would use a step count ``num_params`` times too large.
    Each step is placed as torch places it (``adam_step_tensor``): on the parameter's device
    for fused / capturable groups, whose CUDA kernels cannot read a CPU ``step``.
    """
    for adam in _torch_adams(optimizer):
        for group in adam.param_groups:
            if "step" not in group:
                continue
            for param in group["params"]:
                state = adam.state.get(param)
                if state and "step" in state:
                    state["step"] = adam_step_tensor(group, param, group["step"])


def force_param_sync(chunks: list, optimizer) -> None:
    """Make every rank's parameters current before a checkpoint save.

    With the distributed optimizer and ``overlap_param_gather`` the updated parameters are
    all-gathered by the NEXT forward's pre-hooks, so right after ``optimizer.step()`` a rank
    holds last step's values for the shards other ranks own. Megatron-LM forces the gather
    before every save (``megatron/training/training.py`` ``save_checkpoint_and_time`` ->
    ``force_param_sync``: 0.16.1 calls ``start_param_sync(force_sync=True)`` on each DDP chunk;
    0.19 first calls ``optimizer.prepare_model_params_for_param_sync()``). Without overlapped
    param gathering this is a no-op.
    """
    if not any(c.ddp_config.overlap_param_gather for c in chunks):
        return
    prepare = getattr(optimizer, "prepare_model_params_for_param_sync", None)
    if prepare is not None:
        prepare()
    for chunk in chunks:
        chunk.start_param_sync(force_sync=True)
