"""The core contract: the same model, data and seed give the same loss and gradients on every
parallel layout (TP, PP, virtual PP, DP, micro-batching, sequence parallel), through the real
trainer and Megatron's schedules, on CPU with gloo."""

import math

import pytest
import torch

from tests.distributed.train_harness import (
    REPO,
    first_step_gradients,
    overrides,
    read_metrics,
    run_trainer,
)
from tests.launcher import run_ranks

pytestmark = pytest.mark.distributed

CONFIG = str(REPO / "examples/configs/quickstart.yaml")

# name: (world size, overrides)
LAYOUTS = {
    "tp2": (2, ["execution.tp=2"]),
    "pp2": (2, ["execution.pp=2"]),
    "tp2pp2": (4, ["execution.tp=2", "execution.pp=2"]),
    "pp2_vpp2": (2, ["execution.pp=2", "execution.vpp=2"]),
    "dp2": (2, []),
    "mbs4x1": (1, ["train.micro_batch_size=4", "train.global_batch_size=4"]),
    "mbs1x4": (1, ["train.micro_batch_size=1", "train.global_batch_size=4"]),
    "tp2_sp": (2, ["execution.tp=2", "execution.sequence_parallel=true"]),
    "recompute_full": (1, ["execution.recompute=full", "execution.recompute_num_layers=2"]),
    "tp2_recompute_selective": (2, ["execution.tp=2", "execution.recompute=selective"]),
    "dp2_overlap_grad_reduce": (2, ["optimizer.overlap_grad_reduce=true"]),
    "dp2_distributed_optimizer": (
        2,
        ["optimizer.use_distributed_optimizer=true", "optimizer.overlap_grad_reduce=true"],
    ),
    "pp2_vpp2_distributed_optimizer_param_gather": (  # align_param_gather: test_param_gather.py
        2,
        [
            "execution.pp=2",
            "execution.vpp=2",
            "optimizer.use_distributed_optimizer=true",
            "optimizer.overlap_grad_reduce=true",
            "optimizer.overlap_param_gather=true",
        ],
    ),
}


def _argv(tmp_path, cache_dir, extra, name):
    return ["--config", CONFIG, "--set", *_flat(overrides(tmp_path / name, cache_dir, extra))]


def _flat(items):
    out = []
    for item in items:
        out += [item, "--set"]
    return out[:-1]


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, cache_dir):
    """TP1 PP1 DP1: step-1 gradients and the 5-step loss trajectory."""
    tmp = tmp_path_factory.mktemp("baseline")
    grads = {}
    traj = {}
    for mbs_name, extra in {
        "gbs8": [],
        "gbs4": ["train.global_batch_size=4", "train.micro_batch_size=4"],
    }.items():
        argv = _argv(tmp, cache_dir, extra, mbs_name)
        grads[mbs_name] = run_ranks(first_step_gradients, 1, argv)[0]
        run_ranks(run_trainer, 1, argv)
        traj[mbs_name] = read_metrics(tmp / mbs_name)
    return grads, traj


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_layout_matches_single_rank(layout, tmp_path, cache_dir, baseline):
    world, extra = LAYOUTS[layout]
    key = "gbs4" if "global_batch_size=4" in " ".join(extra) else "gbs8"
    ref_grads, ref_rows = baseline[0][key], baseline[1][key]
    if "distributed_optimizer" not in layout:  # its main grads are sharded over DP by design
        argv = _argv(tmp_path, cache_dir, extra, "grads")
        grads = run_ranks(first_step_gradients, world, argv, timeout=240)[0]
        assert set(grads) == set(ref_grads)
        for name, ref in ref_grads.items():
            err = (grads[name] - ref).norm() / ref.norm().clamp(min=1e-30)
            assert err <= 1e-5, f"{layout}: step-1 gradient of {name} differs by {err:.2e}"
    argv = _argv(tmp_path, cache_dir, extra, "traj")
    run_ranks(run_trainer, world, argv, timeout=240)
    rows = read_metrics(tmp_path / "traj")
    traj, ref_traj = [r["loss"] for r in rows], [r["loss"] for r in ref_rows]
    assert len(traj) == 5
    assert math.isclose(traj[0], math.log(2), rel_tol=0, abs_tol=1e-6)  # policy == reference
    norm, ref_norm = rows[0]["grad_norm"], ref_rows[0]["grad_norm"]
    assert abs(norm - ref_norm) <= 1e-5 * ref_norm, f"{layout}: grad norm {norm} vs {ref_norm}"
    for step, (a, b) in enumerate(zip(traj, ref_traj, strict=True), start=1):
        assert abs(a - b) <= 1e-4 * max(1.0, abs(b)), f"{layout}: step {step} loss {a} vs {b}"
    step_one = ("logits/chosen", "logits/rejected", "entropy", "mean_token_accuracy")
    for key in step_one:  # step 1: the same weights everywhere
        a, b = rows[0][key], ref_rows[0][key]
        assert abs(a - b) <= 1e-5 * max(1.0, abs(b)), f"{layout}: {key} {a} vs {b}"


def test_padded_vocab_does_not_change_loss_or_gradients(tmp_path, cache_dir):
    """Vocab 650 pads to 672 rows at TP1 and 704 at TP2: padding must not enter the softmax."""
    extra = ["model.vocab_size=650", "train.train_iters=2"]
    results = {}
    for tp in (1, 2):
        argv = _argv(tmp_path, cache_dir, [*extra, f"execution.tp={tp}"], f"tp{tp}")
        grads = run_ranks(first_step_gradients, tp, argv, timeout=240)[0]
        argv = _argv(tmp_path, cache_dir, [*extra, f"execution.tp={tp}"], f"traj{tp}")
        run_ranks(run_trainer, tp, argv, timeout=240)
        results[tp] = grads, read_metrics(tmp_path / f"traj{tp}")
    (g1, rows1), (g2, rows2) = results[1], results[2]
    for name, ref in g1.items():
        assert (g2[name] - ref).norm() <= 1e-5 * ref.norm(), name
    l1, l2 = [r["loss"] for r in rows1], [r["loss"] for r in rows2]
    assert l1[0] == pytest.approx(math.log(2), abs=1e-6)
    assert l2 == pytest.approx(l1, rel=1e-5)
    # means over the true 650, not 672 / 704
    for key in ("logits/chosen", "logits/rejected", "entropy", "mean_token_accuracy"):
        assert [r[key] for r in rows2] == pytest.approx([r[key] for r in rows1], rel=1e-5)


def test_baseline_learns(baseline):
    """Guards the equivalence tests against a degenerate trajectory (nothing would differ)."""
    traj = [r["loss"] for r in baseline[1]["gbs8"]]
    assert traj[0] == pytest.approx(math.log(2), abs=1e-6)
    assert traj[-1] < traj[0] - 0.01
    grads = baseline[0]["gbs8"]
    assert all(torch.isfinite(g).all() for g in grads.values())
    assert sum(float(g.norm()) for g in grads.values()) > 0
