"""The trainer on a CUDA GPU (NCCL, bf16, Megatron's fused CUDA paths); skipped without CUDA."""

import math

import pytest

from tests.gpu_runs import train_on_one_gpu

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("bf16", [False, True])
def test_trainer_runs_on_one_gpu(tmp_path, bf16):
    from megatron_adadpo.platform import cpu

    extra = [f"execution.bf16={str(bf16).lower()}", "checkpoint.save_at_end=true"]
    rows = train_on_one_gpu(tmp_path, f"run_bf16_{bf16}", extra)
    run_dir = tmp_path / f"run_bf16_{bf16}"
    assert not cpu.is_active()  # the CPU layer never runs on a GPU host
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in rows)
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert rows[-1]["throughput/mfu"] > 0
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "iter_0000004"


@pytest.mark.parametrize("bf16, rel", [(False, 1e-5), (True, 2e-2)])
def test_chunked_logprobs_follow_the_unchunked_run(tmp_path, bf16, rel):
    """The chunked output layer on the GPU host's megatron-core (0.19: ``GPTModel``'s
    ``output_processor`` hook gives the hidden states; CUDA matmuls; DDP main grads)."""
    runs = {}
    for chunk in (0, 37):
        extra = [f"execution.bf16={str(bf16).lower()}", f"execution.logprob_chunk_tokens={chunk}"]
        runs[chunk] = [r["loss"] for r in train_on_one_gpu(tmp_path, f"chunk{chunk}_{bf16}", extra)]
    assert runs[0][-1] < runs[0][0]
    assert runs[37] == pytest.approx(runs[0], rel=rel)


def test_async_fully_parallel_saves_train_as_sync_and_publish_every_checkpoint(tmp_path):
    """``checkpoint.async_save`` on CUDA (Megatron's ``AsyncCallsQueue`` writer process, CUDA
    tensors staged to host): the losses equal the synchronous run's and every periodic
    checkpoint is published, ``latest`` naming the last (CPU rule and fault tests:
    ``tests/distributed/test_saves.py``, ``tests/e2e/test_train_torchrun.py``)."""
    saves = ["checkpoint.save_interval=2", "checkpoint.save_at_end=true"]
    sync = train_on_one_gpu(tmp_path, "sync", saves)
    written = train_on_one_gpu(tmp_path, "async", [*saves, "checkpoint.async_save=true"])
    assert [r["loss"] for r in written] == pytest.approx([r["loss"] for r in sync], rel=1e-6)
    checkpoints = tmp_path / "async" / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == "iter_0000004"
    assert (checkpoints / "iter_0000002").is_dir() and not list(checkpoints.glob("*.partial"))
