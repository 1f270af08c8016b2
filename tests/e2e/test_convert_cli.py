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


def _megatron_logits(rank, world, ckpt, ids):
    from megatron_adadpo.layout import ExecutionConfig
    from megatron_adadpo.model.build import build_model
    from megatron_adadpo.model.config import read_model_config
    from megatron_adadpo.platform import distributed as parallel
    from megatron_adadpo.run.state.checkpoints import load_model

    parallel.init_model_parallel(ExecutionConfig(tp=2, pp=2))
    model = read_model_config(ckpt)
    chunks = build_model(model, ExecutionConfig(tp=2, pp=2))
    load_model(chunks, ckpt, model)
    return cm.megatron_logits(chunks, ids, model.vocab_size)


@pytest.mark.e2e
@pytest.mark.slow
def test_trainer_checkpoint_tp2pp2_exports_to_hf(tmp_path):
    """The real trainer (torchrun, 4 ranks, TP2 x PP2 x 2 virtual stages, 3 steps) -> CLI -> HF."""
    import os

    from tests.launcher import run_ranks

    run_dir = tmp_path / "run"
    sets = ["execution.pp=2", "execution.vpp=2", "train.train_iters=3", "eval.interval=0",
            "logging.progress=false", f"logging.run_dir={run_dir}",
            f"data.cache_dir={tmp_path / 'cache'}"]  # fmt: skip
    config = "examples/configs/quickstart.yaml"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           "4", "-m", "megatron_adadpo.train", "--config", config]  # fmt: skip
    for item in sets:
        cmd += ["--set", item]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    train = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert train.returncode == 0, train.stdout[-2000:] + train.stderr[-2000:]
    # the run dir: `latest` -> iter dir; the tokenizer is found through its config.yaml
    export = _run("convert_megatron_to_hf.py", "--checkpoint", run_dir, "--output",
                  tmp_path / "hf", cwd=ROOT)  # fmt: skip
    assert export.returncode == 0, export.stderr[-2000:]
    ckpt = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()
    ids = torch.randint(0, 600, (2, 24), generator=torch.Generator().manual_seed(1))
    megatron = run_ranks(_megatron_logits, 4, ckpt, ids, timeout=200)[-1]
    hf = cm.hf_logits(tmp_path / "hf", ids)
    assert (hf - megatron).abs().max().item() <= 1e-5
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["vocab_size"] == 640 and "eos_token_id" in config
