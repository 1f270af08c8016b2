"""The distributed optimizer's saved state loads only into the bucket layout it was saved with:
``optimizer.ddp_bucket_size`` is part of it (checkpoints from before the option had
Megatron's default)."""

from pathlib import Path

import pytest

from megatron_adadpo.config import ConfigError
from megatron_adadpo.run.resume import _check_optimizer_layout

WHERE = Path("runs/x/checkpoints/iter_0000004")
LAYOUT = {"distributed_optimizer": True, "tp": 1, "pp": 1, "vpp": None}
LAYOUT |= {"overlap_grad_reduce": True, "ddp_bucket_size": None}


def test_checkpoint_from_before_the_option_loads_with_the_default():
    old = {k: v for k, v in LAYOUT.items() if k != "ddp_bucket_size"}
    _check_optimizer_layout(old, LAYOUT, WHERE)


def test_another_bucket_size_is_refused_naming_it():
    with pytest.raises(ConfigError, match="ddp_bucket_size=None"):
        _check_optimizer_layout(LAYOUT, {**LAYOUT, "ddp_bucket_size": 20000}, WHERE)
    plain = {**LAYOUT, "distributed_optimizer": False}
    _check_optimizer_layout(plain, {**plain, "ddp_bucket_size": 20000}, WHERE)  # reshards
