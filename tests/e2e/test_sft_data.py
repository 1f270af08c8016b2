"""``loss.name: sft`` trains on rows without a ``rejected`` column, through the real CLI.

Reference: SFT's loss is the per-token NLL of the chosen answers only, so the same rows with
their rejected answers removed must give the same losses, step by step, as with them. A
preference loss on those rows is refused naming the column; ``data.rejected_optional`` set by
hand for a preference loss is refused naming the field."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CONFIG = "examples/configs/quickstart.yaml"
pytestmark = pytest.mark.e2e


def _train(tmp_path: Path, name: str, data: Path, *sets: str) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "megatron_adadpo.train", "--config", CONFIG]
    for item in ["execution.tp=1", "train.train_iters=2", "eval.interval=0",
                 "checkpoint.save_at_end=false", "logging.progress=false",
                 f"logging.run_dir={tmp_path / name}", f"data.cache_dir={tmp_path / 'cache'}",
                 f"data.inputs=[{data}]", *sets]:  # fmt: skip
        args += ["--set", item]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def _losses(run_dir: Path) -> list[float]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().split("\n") if x]
    return [r["loss"] for r in rows if "loss" in r]


def test_sft_trains_on_rows_without_rejected_as_on_the_full_rows(tmp_path):
    full = REPO / "examples" / "data" / "prefs_train.jsonl"
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
    assert len(expected) == 2 and _losses(tmp_path / "chosen_only") == expected

    dpo = _train(tmp_path, "dpo", chosen_only, "loss.name=dpo")
    assert dpo.returncode != 0 and "rejected" in dpo.stderr and "Traceback" not in dpo.stderr
    by_hand = _train(tmp_path, "by_hand", chosen_only, "data.rejected_optional=true")
    errors = [x for x in by_hand.stderr.splitlines() if x.startswith("error:")]
    assert by_hand.returncode == 2 and errors == [
        "error: data.rejected_optional=true (rows without a rejected answer) is for "
        "loss.name=sft; loss.name=adadpo needs every row's rejected answer: remove it"
    ], by_hand.stderr
