"""SFT through the real trainer: the per-token normaliser reaches Megatron's gradient scaling.

TP1: the step-1 gradients equal ``d/dtheta [-sum(chosen token log-probs) / chosen tokens]`` of
the whole global batch, computed here with a full-vocab fp64 log-softmax over the same model's
logits and plain autograd (independent of the loss library, ``loss_func`` and Megatron's
``finalize_model_grads``). TP2, PP2 and DP2 (where the token count must be summed over
micro-batches and all-reduced over data-parallel ranks) give the same gradients as TP1.
"""

import pytest
import torch

from megatron_adadpo.model.initialization import global_param_names
from megatron_adadpo.platform.megatron import unwrap_model
from tests.distributed.train_harness import REPO, first_step_gradients, overrides
from tests.launcher import run_ranks

pytestmark = pytest.mark.distributed

CONFIG = str(REPO / "examples/configs/quickstart.yaml")
SFT = ["loss.name=sft", "loss.adaptive=false", "train.train_iters=1"]
LAYOUTS = {"tp2": ["execution.tp=2"], "pp2": ["execution.pp=2"], "dp2": []}


def _argv(tmp_path, cache_dir, extra):
    argv = ["--config", CONFIG]
    for item in overrides(tmp_path, cache_dir, [*SFT, *extra]):
        argv += ["--set", item]
    return argv


def reference_gradients(rank: int, world: int, argv: list[str]) -> dict:
    """Rank body (world of one): autograd of the per-token mean NLL of step 1's chosen rows."""
    from megatron_adadpo import train
    from megatron_adadpo.config import load_config
    from megatron_adadpo.run.trainer import Trainer

    args = train.parse_args(argv)
    trainer = Trainer(load_config(args.config, args.set))
    model = unwrap_model(trainer.policy[0])
    params = global_param_names(model)
    batches = trainer.batches.next_step()
    tokens = sum(b.loss_mask[0::2].sum() for b in batches)
    total = 0.0
    for b in batches:
        logits = model(b.tokens, b.position_ids, None).double()  # [2B, S, V]
        logp = torch.log_softmax(logits, -1).gather(-1, b.labels[..., None])[..., 0]
        total = total - (logp * b.loss_mask)[0::2].sum()
    grads = torch.autograd.grad(total / tokens, list(params.values()))
    return dict(zip(params, grads, strict=True))


@pytest.fixture(scope="module")
def tp1_gradients(tmp_path_factory, cache_dir):
    tmp = tmp_path_factory.mktemp("sft_tp1")
    return run_ranks(first_step_gradients, 1, _argv(tmp, cache_dir, []), timeout=240)[0]


def _assert_close(grads: dict, ref: dict, what: str) -> None:
    assert set(grads) == set(ref)
    for name, want in ref.items():
        err = (grads[name] - want).norm() / want.norm().clamp(min=1e-30)
        assert err <= 1e-5, f"{what}: step-1 gradient of {name} differs by {err:.2e}"


def test_gradients_equal_per_token_mean_nll(tmp_path, cache_dir, tp1_gradients):
    reference = run_ranks(reference_gradients, 1, _argv(tmp_path, cache_dir, []), timeout=240)[0]
    _assert_close(tp1_gradients, reference, "tp1 vs autograd")


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_layout_matches_tp1(layout, tmp_path, cache_dir, tp1_gradients):
    argv = _argv(tmp_path, cache_dir, LAYOUTS[layout])
    grads = run_ranks(first_step_gradients, 2, argv, timeout=240)[0]
    _assert_close(grads, tp1_gradients, layout)
