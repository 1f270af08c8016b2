"""`tools/convert_hf_to_megatron.py` and `tools/convert_megatron_to_hf.py` as a user runs them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests import convert_models as cm

ROOT = Path(__file__).resolve().parents[2]
TOOLS = ROOT / "tools"


def _run(tool: str, *args, cwd) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(TOOLS / tool), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=cwd)


def _tensors(directory: Path) -> dict:
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.e2e
def test_convert_clis_round_trip(tmp_path):
    hf = cm.make_hf_model("qwen2_tied", tmp_path / "hf", dtype=torch.bfloat16)
    bad = _run("convert_hf_to_megatron.py", "--hf-dir", hf, "--output", tmp_path / "x",
               "--dtype", "fp16", cwd=tmp_path)  # fmt: skip
    assert bad.returncode == 2 and "--dtype 'fp16' is not supported" in bad.stderr
    first = _run("convert_hf_to_megatron.py", "--hf-dir", hf, "--output", tmp_path / "mg",
                 cwd=tmp_path)  # fmt: skip
    assert first.returncode == 0, first.stderr
    assert "HF -> Megatron" in first.stderr  # tqdm progress bar
    assert "model.yaml" in first.stdout
    back = _run("convert_megatron_to_hf.py", "--checkpoint", tmp_path / "mg", "--output",
                tmp_path / "hf_back", cwd=tmp_path)  # fmt: skip
    assert back.returncode == 0, back.stderr
    src, out = _tensors(hf), _tensors(tmp_path / "hf_back")
    assert sorted(src) == sorted(out)
    assert all(out[k].dtype == torch.bfloat16 and torch.equal(out[k], v) for k, v in src.items())
    config = json.loads((tmp_path / "hf_back" / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM"] and config["tie_word_embeddings"]
