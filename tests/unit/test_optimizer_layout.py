"""The distributed optimizer's saved state loads only into the bucket layout it was saved with:
``optimizer.ddp_bucket_size`` is part of it (checkpoints from before the option had
Megatron's default), and so is the resolved layer spec (Transformer Engine's or the local one:
their parameters differ in number and order, and the state is loaded by position)."""

from pathlib import Path

import pytest

from megatron_adadpo.config import ConfigError, load_config
from megatron_adadpo.platform.machine import probe_machine
from megatron_adadpo.resolve import Machine, resolve
from megatron_adadpo.run.state.resume import _check_optimizer_layout, optimizer_layout

QUICKSTART = Path(__file__).resolve().parents[2] / "examples" / "configs" / "quickstart.yaml"

WHERE = Path("runs/x/checkpoints/iter_0000004")
LAYOUT = {"distributed_optimizer": True, "tp": 1, "pp": 1, "vpp": None}
LAYOUT |= {"overlap_grad_reduce": True, "ddp_bucket_size": None, "layer_spec": "local"}


def test_checkpoint_from_before_the_option_loads_with_the_default():
    old = {k: v for k, v in LAYOUT.items() if k not in ("ddp_bucket_size", "layer_spec")}
    _check_optimizer_layout(old, LAYOUT, WHERE)


def test_another_bucket_size_is_refused_naming_it():
    with pytest.raises(ConfigError, match="optimizer.ddp_bucket_size=None"):
        _check_optimizer_layout(LAYOUT, {**LAYOUT, "ddp_bucket_size": 20000}, WHERE)
    plain = {**LAYOUT, "distributed_optimizer": False}
    _check_optimizer_layout(plain, {**plain, "ddp_bucket_size": 20000}, WHERE)  # reshards


def test_another_resolved_layer_spec_is_refused_naming_the_field():
    te = {**LAYOUT, "layer_spec": "transformer_engine"}
    with pytest.raises(ConfigError, match="execution.transformer_impl=transformer_engine"):
        _check_optimizer_layout(te, LAYOUT, WHERE)
    plain = {**LAYOUT, "distributed_optimizer": False}
    _check_optimizer_layout({**plain, "layer_spec": "transformer_engine"}, plain, WHERE)


def test_the_layout_records_the_spec_auto_resolves_to():
    """``transformer_impl: auto`` is recorded as what it resolved to on the machine."""
    config = load_config(QUICKSTART, ["execution.transformer_impl=auto"])
    here = resolve(config, 2, probe_machine())
    assert optimizer_layout(config, here)["layer_spec"] == "local"  # no CUDA / TE here
    te_gpu = Machine(has_cuda=True, has_te=True)
    assert (
        optimizer_layout(config, resolve(config, 2, te_gpu))["layer_spec"] == "transformer_engine"
    )
