"""The trainer's typed run state (``run/state/resume.py`` ``RunState``) and where a launch starts
(``run/opening.py`` ``StartPoint``): the checkpoint's ``run`` entry keeps its keys, and a run
is finished exactly when its latest checkpoint is at or past the last step with no evaluation
pending (the rules ``Trainer`` applied before it had a typed state)."""

from __future__ import annotations

from pathlib import Path

import pytest

from megatron_adadpo.config import from_dict, read_yaml
from megatron_adadpo.resolve import CPU, resolve
from megatron_adadpo.run.opening import StartPoint
from megatron_adadpo.run.state.resume import RunState, optimizer_layout, reference_source

QUICKSTART = Path(__file__).resolve().parents[2] / "examples/configs/quickstart.yaml"


def _config(*sets: str):
    return from_dict(read_yaml(QUICKSTART, ["train.seed=7", *sets]))


def test_fresh_state_is_the_checkpoint_entry_of_step_zero():
    config = _config()
    run = resolve(config, 2, CPU)
    saved = RunState.fresh(config, run, "abc").to_dict()
    assert saved == {  # written out: the keys every checkpoint's ``run`` entry has had
        "step": 0,
        "consumed_samples": 0,
        "dataset_identity": "abc",
        "seed": 7,
        "optimizer_layout": optimizer_layout(config, run),
        "reference_sync": None,  # TR-DPO off
        "reference_source": reference_source(config),
        "adapter_base": None,  # full-parameter training
    }


def test_resumed_state_keeps_position_and_data_takes_this_configs_seed_and_layout():
    config = _config("optimizer.use_distributed_optimizer=false")
    saved = {"step": 12, "consumed_samples": 96, "dataset_identity": "abc", "seed": 3}
    run = resolve(config, 2, CPU)
    state = RunState.resumed({**saved, "eval_pending": True}, config, run)
    assert (state.step, state.consumed_samples, state.dataset_identity) == (12, 96, "abc")
    assert state.seed == 7 and state.optimizer_layout == optimizer_layout(config, run)
    assert state.eval_pending and state.to_dict()["eval_pending"] is True
    state.eval_pending = False
    assert "eval_pending" not in state.to_dict()
    assert not RunState.resumed(saved, config, run).eval_pending  # older checkpoints: no key


@pytest.mark.parametrize(
    "step, pending, evaluates, finished, eval_at_end",
    [
        (None, False, True, False, False),  # fresh
        (5, False, True, False, False),  # steps left
        (10, False, True, True, False),  # at the last step
        (12, False, False, True, False),  # past it (train_iters lowered)
        (10, True, True, False, True),  # SIGTERM in the last step's evaluation: do it
        (10, True, False, True, False),  # ... but the run no longer evaluates
        (5, True, True, False, False),  # pending mid-run: the loop evaluates first
    ],
)
def test_start_point_finished_and_pending_evaluation(
    step, pending, evaluates, finished, eval_at_end
):
    where = None if step is None else Path(f"/run/checkpoints/iter_{step:07d}")
    saved = None if step is None else {"step": step, "eval_pending": pending}
    start = StartPoint(where, saved, None, total_steps=10, evaluates=evaluates)
    assert start.step == (step or 0)
    assert start.finished == finished and start.eval_pending_at_end == eval_at_end
