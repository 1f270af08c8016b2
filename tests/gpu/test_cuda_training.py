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
