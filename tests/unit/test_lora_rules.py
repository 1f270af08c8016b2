"""LoRA with Transformer Engine, context parallelism and FP8, by rule (TE cannot run here).

- the resolver accepts LoRA on the TE spec (and with it CP > 1, whose attention TE provides),
  refuses CP on the local spec with the CP rule's reason, and refuses FP8 with a reason;
- on the TE spec the targeted linears that fuse a norm (``linear_qkv`` / ``linear_fc1``) are
  built apart from it: the split spec has no fused module at a targeted linear, the norm in
  the layer's own slot, and Megatron's local-spec checkpoint key map (base checkpoints load).
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import pytest
from megatron.core.transformer.identity_op import IdentityOp

from megatron_adadpo.config import ConfigError, from_dict, read_yaml
from megatron_adadpo.model.lora_spec import split_norm_spec
from megatron_adadpo.platform.megatron import get_gpt_layer_local_spec
from megatron_adadpo.resolve import CPU, Machine, resolve, run_errors

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "examples/configs/quickstart.yaml"
TE = Machine(has_cuda=True, has_te=True)
LORA = ["lora.rank=8", "reference.mode=null", "execution.tp=1"]


def _config(*sets: str):
    return from_dict(read_yaml(QUICKSTART, [*LORA, *sets]))


def test_lora_runs_on_the_te_spec_with_its_fused_norm_linears_split():
    run = resolve(_config("execution.transformer_impl=auto"), 1, TE)
    assert run.kernels.transformer_engine
    assert run.kernels.split_norm_linears == ("linear_qkv", "linear_fc1")
    only_row = _config("lora.target_modules=[linear_proj,linear_fc2]")
    assert resolve(only_row, 1, TE).kernels.split_norm_linears == ()  # nothing fused targeted
    local = resolve(_config("execution.transformer_impl=local"), 1, TE)
    assert local.kernels.split_norm_linears == ()
    full = from_dict(read_yaml(QUICKSTART, ["execution.tp=1", "execution.transformer_impl=auto"]))
    assert resolve(full, 1, TE).kernels.split_norm_linears == ()  # no LoRA: TE's fused spec


def test_lora_with_context_parallelism_follows_the_attention_rule():
    """CP > 1 needs TE's attention: accepted with LoRA on the TE spec, refused (with the CP
    rule's reason, not a LoRA one) on the local spec or a machine without TE."""
    cp2 = _config("execution.cp=2", "execution.transformer_impl=auto")
    run = resolve(cp2, 2, TE)
    assert run.parallel.cp == 2 and run.kernels.attention == "transformer_engine"
    reasons = run_errors(cp2, 2, CPU)
    assert len(reasons) == 1 and "execution.cp > 1 needs Transformer Engine" in reasons[0]
    with pytest.raises(ConfigError, match="execution.cp > 1 needs Transformer Engine attention"):
        _config("execution.cp=2", "execution.transformer_impl=local")  # refused on any machine


def test_lora_with_fp8_is_refused_with_its_reason():
    sets = ["execution.transformer_impl=transformer_engine", "execution.fp8=hybrid"]
    with pytest.raises(ConfigError, match="lora: with execution.fp8='hybrid'.*execution.fp8=null"):
        resolve(_config(*sets, "execution.bf16=true"), 1, TE)


class FusedNormLinear:
    """Stand-in for ``TELayerNormColumnParallelLinear`` (the spec is only built, not run)."""


class NormStandIn:
    """Stand-in for ``TENorm``."""


class ColumnStandIn:
    """Stand-in for ``TEColumnParallelLinear``."""


class Backend:
    """The three ``TESpecProvider`` methods the split reads, returning stand-ins."""

    def column_parallel_layer_norm_linear(self):
        return FusedNormLinear

    def column_parallel_linear(self):
        return ColumnStandIn

    def layer_norm(self):
        return NormStandIn


def _replaced(owner, **modules):
    """``owner`` (a ``ModuleSpec``, or on megatron-core 0.19 the MLP's ``functools.partial``
    with ``submodules=``) with the given submodules replaced."""
    subs = dataclasses.replace(_subs(owner), **modules)
    if isinstance(owner, functools.partial):
        return functools.partial(owner.func, **{**owner.keywords, "submodules": subs})
    return dataclasses.replace(owner, submodules=subs)


def _subs(owner):
    partial = isinstance(owner, functools.partial)
    return owner.keywords["submodules"] if partial else owner.submodules


def te_shaped_spec():
    """Megatron's layer spec with TE's fusion: ``linear_qkv`` / ``linear_fc1`` the fused norm +
    linear, the layer's norms ``IdentityOp`` (0.16.1 ``gpt_layer_specs.py`` lines 279, 291,
    496), and the TE spec's own key map (its op-fuser names, not the local spec's)."""
    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    layer = dataclasses.replace(
        spec.submodules,
        input_layernorm=IdentityOp,
        pre_mlp_layernorm=IdentityOp,
        self_attention=_replaced(spec.submodules.self_attention, linear_qkv=FusedNormLinear),
        mlp=_replaced(spec.submodules.mlp, linear_fc1=FusedNormLinear),
        sharded_state_dict_keys_map={"mlp.0.weight": "mlp.linear_fc1.layer_norm_weight"},
    )
    return dataclasses.replace(spec, submodules=layer)


def test_split_spec_has_no_fused_module_at_a_targeted_linear():
    local_keys = get_gpt_layer_local_spec().submodules.sharded_state_dict_keys_map
    te = te_shaped_spec()
    split = split_norm_spec(te, ("linear_qkv", "linear_fc1"), Backend()).submodules
    assert split.self_attention.submodules.linear_qkv is ColumnStandIn
    assert _subs(split.mlp).linear_fc1 is ColumnStandIn
    assert split.input_layernorm is NormStandIn and split.pre_mlp_layernorm is NormStandIn
    # the split norms save under the fused module's keys: Megatron's local-spec map, kept
    # with the TE spec's own entries
    assert local_keys.items() <= split.sharded_state_dict_keys_map.items()
    assert split.sharded_state_dict_keys_map["mlp.0.weight"] == "mlp.linear_fc1.layer_norm_weight"
    assert te.submodules.self_attention.submodules.linear_qkv is FusedNormLinear  # a copy
    only_qkv = split_norm_spec(te, ("linear_qkv",), Backend()).submodules
    assert _subs(only_qkv.mlp).linear_fc1 is FusedNormLinear  # untargeted: stays fused
    assert only_qkv.pre_mlp_layernorm is te.submodules.pre_mlp_layernorm
    assert "pre_mlp_layernorm." not in only_qkv.sharded_state_dict_keys_map
