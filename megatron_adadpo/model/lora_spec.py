"""Transformer Engine's layer spec for LoRA: a targeted linear that fuses its norm, split apart.

TE's spec fuses the input norm into ``linear_qkv`` and the pre-MLP norm into ``linear_fc1``
(``TELayerNormColumnParallelLinear``: ``norm(x) W^T`` in one module; megatron-core 0.16.1
``models/gpt/gpt_layer_specs.py`` lines 279 and 496, 0.19.2 lines 324 and 543), with the layer's
own ``input_layernorm`` / ``pre_mlp_layernorm`` an ``IdentityOp``. An adapter beside the fused
module would read ``x``, not ``norm(x)``. For each such linear that LoRA targets
(``resolve/lora.split_norm_linears``) the spec here takes Megatron's own unfused TE pattern:
the norm is the backend's ``layer_norm()`` (``TENorm``) in the layer's norm slot and the linear
its ``column_parallel_linear()`` (``TEColumnParallelLinear``), as the same function builds its
MLA and MoE layers (0.16.1 lines 248 / 265, 0.19.2 lines 296 / 313). The split norm saves under
the fused module's checkpoint keys (the local spec's key map, 0.16.1 lines 417-420, 0.19.2 lines
459-462), so base checkpoints of either spec load into it.

NeMo / Megatron-Bridge keep the fused module and ask it for its norm output instead
(``return_layernorm_output``, the adapter reading ``layernorm_output``; with sequence
parallelism ``return_layernorm_output_gathered``, an ``[s, b, h]`` input unlike the linear's
``[s/tp, b, h]``). The split spec keeps one adapter contract for every spec (``model/lora.py``),
at the cost of one unfused norm per split linear.
"""

from __future__ import annotations

import dataclasses
import functools

from megatron_adadpo.resolve.lora import FUSED_NORM_LINEARS

OWNERS = {"linear_qkv": "self_attention", "linear_fc1": "mlp"}  # the submodule holding each


def split_norm_spec(layer_spec, linears: tuple[str, ...], backend):
    """A copy of a transformer-layer ``ModuleSpec`` where each of ``linears`` that is the
    backend's fused norm + linear becomes ``backend.column_parallel_linear()`` after its own
    ``backend.layer_norm()`` (see the module doc); other linears unchanged.

    ``backend``: Megatron's ``BackendSpecProvider`` of the spec (``TESpecProvider``).
    """
    fused = backend.column_parallel_layer_norm_linear()
    layer = layer_spec.submodules
    changes, keys = {}, dict(layer.sharded_state_dict_keys_map or {})
    for linear in linears:
        owner_name, norm = OWNERS[linear], FUSED_NORM_LINEARS[linear]
        owner = getattr(layer, owner_name)
        if getattr(submodules_of(owner), linear) is not fused:
            continue
        changes[owner_name] = _with_submodule(owner, linear, backend.column_parallel_linear())
        changes[norm] = backend.layer_norm()
        keys[f"{norm}."] = f"{owner_name}.{linear}.layer_norm_"
    layer = dataclasses.replace(layer, **changes, sharded_state_dict_keys_map=keys)
    return dataclasses.replace(layer_spec, submodules=layer)


def submodules_of(owner):
    """The submodules of a layer's ``self_attention`` / ``mlp`` entry: a ``ModuleSpec``'s, or
    on megatron-core 0.19 the MLP's ``functools.partial(MLP.as_mlp_submodule,
    submodules=MLPSubmodules(...))`` (0.19.2 ``gpt_layer_specs.py`` line 547)."""
    if isinstance(owner, functools.partial):
        return owner.keywords["submodules"]
    return owner.submodules


def _with_submodule(owner, name: str, module):
    """A copy of ``owner`` (see ``submodules_of``) with its submodule ``name`` set to
    ``module``."""
    subs = dataclasses.replace(submodules_of(owner), **{name: module})
    if isinstance(owner, functools.partial):
        return functools.partial(owner.func, *owner.args, **{**owner.keywords, "submodules": subs})
    return dataclasses.replace(owner, submodules=subs)
