"""Training inputs through the real CLI: SFT rows without ``rejected``; the batch rule of the
budget batching modes.

``loss.name: sft`` trains on rows without a ``rejected`` column. Reference: SFT's loss is the
per-token NLL of the chosen answers only, so the same rows with their rejected answers removed
must give the same losses, step by step, as with them. A preference loss on those rows is
refused naming the column; ``data.rejected_optional`` set by hand for a preference loss is
refused naming the field."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cli import one_error_line

REPO = Path(__file__).resolve().parents[2]
CONFIG = "examples/configs/quickstart.yaml"
TRAIN = REPO / "examples" / "data" / "prefs_train.jsonl"
pytestmark = pytest.mark.e2e


def _train(tmp_path: Path, name: str, data: Path, *sets: str) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "megatron_adadpo.train", "--config", CONFIG]
    for item in ["execution.tp=1", "train.train_iters=2", "eval.interval=0",
                 "checkpoint.save_at_end=false", "logging.progress=false",
                 f"logging.run_dir={tmp_path / name}", f"data.cache_dir={tmp_path / 'cache'}",
                 f"data.inputs=[{data or TRAIN}]", *sets]:  # fmt: skip
        args += ["--set", item]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def _losses(run_dir: Path) -> list[float]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().split("\n") if x]
    return [r["loss"] for r in rows if "loss" in r]


def test_sft_trains_on_rows_without_rejected_as_on_the_full_rows(tmp_path):
    full = TRAIN
    rows = [json.loads(x) for x in full.read_text("utf-8").split("\n") if x]
    chosen_only = tmp_path / "sft.jsonl"
    chosen_only.write_text("".join(json.dumps({k: r[k] for k in ("prompt", "chosen")}) + "\n"
                                   for r in rows))  # fmt: skip
    sft = ["loss.name=sft", "loss.adaptive=false"]
    with_rejected = _train(tmp_path, "full", full, *sft)
    without = _train(tmp_path, "chosen_only", chosen_only, *sft)
    assert with_rejected.returncode == 0, with_rejected.stderr[-3000:]
    assert without.returncode == 0, without.stderr[-3000:]
    expected = _losses(tmp_path / "full")
    # the same chosen rows, padded to other lengths beside other rows: equal up to the CPU
    # GEMM's blocking for those shapes (bitwise on some CPUs, 1e-7 apart on others)
    assert len(expected) == 2 and _losses(tmp_path / "chosen_only") == pytest.approx(
        expected, rel=1e-6
    )

    dpo = _train(tmp_path, "dpo", chosen_only, "loss.name=dpo")
    assert dpo.returncode == 2 and "Traceback" not in dpo.stderr, dpo.stderr[-3000:]
    assert f"{chosen_only}:line 1: missing_field: no 'rejected' field" in dpo.stderr
    by_hand = _train(tmp_path, "by_hand", chosen_only, "data.rejected_optional=true")
    assert one_error_line(by_hand) == (
        "error: data.rejected_optional=true (rows without a rejected answer) is for "
        "loss.name=sft; loss.name=adadpo needs every row's rejected answer: remove it"
    )


def test_budget_modes_ignore_micro_batch_size_and_fixed_refuses_a_budget(tmp_path):
    """``token_budget`` with ``micro_batch_size=3`` and a global batch of 16 (not a multiple of
    3: refused before) trains, with the losses of ``micro_batch_size=4``; a budget under
    ``batching: fixed`` (ignored before) is refused naming the field."""
    budget = ["data.batching=token_budget", "data.max_tokens_per_micro_batch=512"]
    three = _train(tmp_path, "mbs3", None, *budget, "train.micro_batch_size=3")
    four = _train(tmp_path, "mbs4", None, *budget, "train.micro_batch_size=4")
    assert three.returncode == 0, three.stderr[-3000:]
    assert four.returncode == 0, four.stderr[-3000:]
    expected = _losses(tmp_path / "mbs4")
    assert len(expected) == 2 and _losses(tmp_path / "mbs3") == expected
    fixed = _train(tmp_path, "fixed", None, "data.max_tokens_per_micro_batch=512")
    assert "data.max_tokens_per_micro_batch=512 has no effect under data.batching=fixed" in (
        one_error_line(fixed)
    )
