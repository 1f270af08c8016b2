"""`python tools/preprocess_data.py` as a user runs it: 2 workers, progress bar, no-op re-run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "examples" / "data"


@pytest.mark.e2e
def test_preprocess_cli_end_to_end(tmp_path):
    out = tmp_path / "prefs"
    cmd = [sys.executable, str(ROOT / "tools" / "preprocess_data.py"),
           "--input", str(DATA / "prefs_train.jsonl"), str(DATA / "prefs_eval.jsonl"),
           "--tokenizer", str(DATA / "spm" / "spm.model"), "--output", str(out),
           "--max-length", "64", "--workers", "2"]  # fmt: skip
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert "tokenizing pairs" in first.stderr  # tqdm progress bar
    assert "pairs written 464" in first.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["tokenizer"]["kind"] == "sentencepiece"
    assert manifest["tokenizer"]["template"]["name"] == "plain-v1"
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert second.returncode == 0 and "up to date" in second.stdout
