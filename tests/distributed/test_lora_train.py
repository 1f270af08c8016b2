"""LoRA through the real trainer: the reference is the policy with its adapters off (step 1 at
ln 2), only the adapters train (no gradient buffer or optimizer state for the base), and every
parallel layout equals TP1 (step-1 adapter gradients, the step's metrics, a 5-step run)."""

import math

import pytest
import torch

from tests.distributed.train_harness import argv as trainer_argv
from tests.distributed.train_harness import (
    assert_same_rows,
    first_step,
    read_metrics,
    run_trainer,
)
from tests.launcher import run_ranks

pytestmark = pytest.mark.distributed

LORA = ["lora.rank=8", "lora.alpha=16", "reference.mode=null"]  # unset: adapters_off

PACKED = ["data.batching=packed", "data.max_tokens_per_micro_batch=160"]  # pairs are <= 128
LAYOUTS = {
    "tp2": (2, ["execution.tp=2"]),
    "tp2_sp": (2, ["execution.tp=2", "execution.sequence_parallel=true"]),
    "pp2": (2, ["execution.pp=2"]),
    "dp2": (2, []),
    "pp2_vpp2": (2, ["execution.pp=2", "execution.vpp=2"]),
    "tp2_sp_chunked_recompute": (
        2,
        [
            "execution.tp=2",
            "execution.sequence_parallel=true",
            "execution.logprob_chunk_tokens=64",
            "execution.recompute=full",
            "execution.recompute_num_layers=2",
        ],
    ),
    "tp2_sp_packed": (2, ["execution.tp=2", "execution.sequence_parallel=true", *PACKED]),
    "dp2_packed": (2, PACKED),
    "dp2_distributed_optimizer": (
        2,
        ["optimizer.use_distributed_optimizer=true", "optimizer.overlap_grad_reduce=true"],
    ),
}


def _argv(tmp_path, cache_dir, name, extra=()):
    return trainer_argv(tmp_path / name, cache_dir, *LORA, *extra)


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, cache_dir):
    """TP1 PP1 DP1 with adapters: step 1 (gradients, metrics) and a 5-step run's metrics."""
    tmp = tmp_path_factory.mktemp("lora_baseline")
    step = run_ranks(first_step, 1, _argv(tmp, cache_dir, "step"))[0]
    run_ranks(run_trainer, 1, _argv(tmp, cache_dir, "run"))
    return step, read_metrics(tmp / "run")


def test_only_adapters_train_and_step_one_is_ln2(baseline):
    step, rows = baseline
    grads = step["grads"]
    assert grads and all(name.endswith((".lora_a", ".lora_b")) for name in grads)
    assert sum(float(g.norm()) for n, g in grads.items() if n.endswith("lora_b")) > 0
    losses = [r["loss"] for r in rows if r["split"] == "train"]
    assert math.isclose(losses[0], math.log(2), rel_tol=0, abs_tol=1e-6)  # adapters start at 0
    assert losses[-1] < losses[0] - 1e-3  # the adapters learn


def _trainable_state(rank, world, argv):
    """What DDP and the optimizer hold: buffer and optimizer parameter counts vs the model's,
    and the dtypes of the base, the adapters, their gradient buffers and main parameters."""
    from megatron_adadpo import train
    from megatron_adadpo.config import load_config
    from megatron_adadpo.run.trainer import Trainer

    args = train.parse_args(argv)
    trainer = Trainer(load_config(args.config, args.set))
    chunk = trainer.policy[0]
    in_buffers = sum(b.numel_unpadded for b in chunk.buffers)
    in_optimizer = [p for g in trainer.optimizer.param_groups for p in g["params"]]
    model = chunk.module
    trainable = [p for p in model.parameters() if p.requires_grad]
    trainer.close()
    return {
        "buffer": in_buffers,
        "trainable": sum(p.numel() for p in trainable),
        "total": sum(p.numel() for p in model.parameters()),
        "optimizer": sum(p.numel() for p in in_optimizer),
        "grads_on_base": [
            n
            for n, p in model.named_parameters()
            if not p.requires_grad and hasattr(p, "main_grad")
        ],
        "dtypes": {
            "base": {p.dtype for p in model.parameters() if not p.requires_grad},
            "adapters": {p.dtype for p in trainable},
            "grads": {b.grad_dtype for b in chunk.buffers},
            "main": {p.dtype for p in in_optimizer},
        },
    }


BF16 = ["execution.bf16=true"]


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_base_has_no_gradient_buffer_or_optimizer_state(bf16, tmp_path, cache_dir):
    extra = BF16 if bf16 else []
    state = run_ranks(_trainable_state, 1, _argv(tmp_path, cache_dir, "state", extra))[0]
    assert 0 < state["trainable"] < state["total"] / 5  # rank 8 of width 64
    assert state["buffer"] == state["trainable"] == state["optimizer"]
    assert not state["grads_on_base"]
    model_dtype = torch.bfloat16 if bf16 else torch.float32
    # bf16: the frozen base and the adapters in bf16; Megatron's optimizer keeps fp32 main
    # parameters and DDP fp32 gradients (grad_reduce_in_fp32) for the adapters only
    assert state["dtypes"] == {
        "base": {model_dtype},
        "adapters": {model_dtype},
        "grads": {torch.float32},
        "main": {torch.float32},
    }


def test_bf16_lora_trains_like_fp32(tmp_path, cache_dir, baseline):
    """A bf16 LoRA run starts at ln 2 exactly (``B = 0``: the adapted output is the base
    output, bit for bit, so policy and adapters-off reference agree) and follows the fp32 run
    within bf16's resolution: ``|loss_bf16 - loss_fp32| <= 2**-9 * loss_fp32``, the rounding
    of the loss itself to bf16 (8 significant bits). Measured here: <= 1.8e-4 (1/8 of it) over
    5 steps, while the loss falls by 3e-2: a bf16 run whose adapters did not train, or trained
    on wrong gradients, is far outside."""
    run_ranks(run_trainer, 1, _argv(tmp_path, cache_dir, "run", BF16))
    rows = [r for r in read_metrics(tmp_path / "run") if r["split"] == "train"]
    ref = [r for r in baseline[1] if r["split"] == "train"]
    losses, ref_losses = [r["loss"] for r in rows], [r["loss"] for r in ref]
    assert losses[0] == pytest.approx(math.log(2), abs=1e-6)
    assert losses[-1] < losses[0] - 1e-3  # the adapters learn in bf16
    for got, want in zip(losses, ref_losses, strict=True):
        assert abs(got - want) <= 2**-9 * want, (losses, ref_losses)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_lora_layout_matches_single_rank(layout, tmp_path, cache_dir, baseline):
    world, extra = LAYOUTS[layout]
    ref_step, ref_rows = baseline
    if "distributed_optimizer" not in layout:  # its main grads are sharded over DP by design
        got = run_ranks(first_step, world, _argv(tmp_path, cache_dir, "step", extra), timeout=240)
        grads, ref_grads = got[0]["grads"], ref_step["grads"]
        assert set(grads) == set(ref_grads)
        for name, ref in ref_grads.items():
            err = (grads[name] - ref).norm() / ref.norm().clamp(min=1e-30)
            assert err <= 1e-5, f"{layout}: step-1 gradient of {name} differs by {err:.2e}"
        for key, ref in ref_step["metrics"].items():
            if key != "batch/tokens":  # padded tokens: sequence parallelism pads to TP
                value = got[0]["metrics"][key]
                torch.testing.assert_close(value, ref, rtol=1e-5, atol=1e-5, msg=key)
    run_ranks(run_trainer, world, _argv(tmp_path, cache_dir, "run", extra), timeout=240)
    rows = read_metrics(tmp_path / "run")
    assert_same_rows(rows, ref_rows, layout)
