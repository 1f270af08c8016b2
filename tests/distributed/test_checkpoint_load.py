"""Loading weights into a model that asks for more than a checkpoint holds.

Transformer Engine modules carry ``_extra_state`` (FP8 metadata), which a TE model requests at
load as a ``ShardedObject`` (megatron-core 0.16.1 / 0.19 ``megatron/core/transformer/utils.py``:
``sharded_state_dict_default`` -> ``make_sharded_tensors_for_checkpoint`` ->
``make_sharded_object_for_checkpoint`` for keys ending in ``_extra_state``); the HF converter
writes the local-spec template, which has none. TE cannot run here, so the rule is encoded with
a local-spec model whose final norm carries ``_extra_state`` the way TE's does: it must load
(and say what it skipped), while a checkpoint lacking a real tensor must still fail, naming it.
"""

from __future__ import annotations

import io
import logging

import pytest
import torch

from megatron_adadpo.layout import ExecutionConfig
from megatron_adadpo.run.state import checkpoints
from tests.launcher import run_ranks
from tests.megatron_helpers import TINY, tiny_model

pytestmark = pytest.mark.distributed


def _te_style(module: torch.nn.Module) -> None:
    """Give ``module`` TE's extra-state protocol (``get_extra_state`` / ``set_extra_state``)."""

    def get_extra_state(self):
        return io.BytesIO(b"fp8 meta")  # TE serialises its FP8 metadata like this

    def set_extra_state(self, state):
        self.loaded_extra_state = state

    name = f"TEStyle{type(module).__name__}"
    attrs = {"get_extra_state": get_extra_state, "set_extra_state": set_extra_state}
    module.__class__ = type(name, (type(module),), attrs)


def _keys(sharded: dict) -> list[str]:
    out = []
    for value in sharded.values():
        out += _keys(value) if isinstance(value, dict) else [value.key]
    return out


def _load_cases(rank, world, directory):
    run = ExecutionConfig()
    saved = tiny_model(run, seed=1)
    checkpoints.save_model(saved, directory, TINY)
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("megatron_adadpo.run.state.checkpoints").addHandler(handler)
    logging.getLogger("megatron_adadpo.run.state.checkpoints").setLevel(logging.INFO)

    te_like = tiny_model(run, seed=2)
    _te_style(te_like[0].decoder.final_layernorm)
    requested = _keys(checkpoints.model_sharded_state_dict(te_like))
    checkpoints.load_model(te_like, directory, TINY)
    loaded = te_like[0].state_dict()
    same = all(torch.equal(v, loaded[k]) for k, v in saved[0].state_dict().items() if v is not None)

    with_bias = tiny_model(run, seed=3)
    norm = with_bias[0].decoder.final_layernorm
    norm.register_parameter("bias", torch.nn.Parameter(torch.zeros_like(norm.weight)))
    try:
        checkpoints.load_model(with_bias, directory, TINY)
        missing_error = None
    except checkpoints.CheckpointError as err:
        missing_error = str(err)
    return requested, same, [r.getMessage() for r in records], missing_error


def test_extra_state_absent_from_checkpoint_is_skipped_real_tensor_is_not(tmp_path):
    requested, same, logged, missing_error = run_ranks(_load_cases, 1, tmp_path / "ckpt")[0]
    assert "decoder.final_layernorm._extra_state" in requested  # the TE-style request
    assert same, "weights differ after loading into the TE-style model"
    assert any("decoder.final_layernorm._extra_state" in m for m in logged), logged
    assert missing_error is not None and "decoder.final_layernorm.bias" in missing_error
    assert "lacks 1 tensor(s)" in missing_error
