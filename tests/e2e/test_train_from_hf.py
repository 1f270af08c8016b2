"""Train from a converted HF checkpoint: the trainer's step-1 log-probs equal an HF model's.

HF Llama (transformers, random weights, the bundled tokenizer) -> tools/convert_hf_to_megatron.py
-> ``train.init_checkpoint`` loaded at TP=2 -> the first step's mean chosen / rejected
completion log-probs, and TRL's ``logits/*`` (mean logit over the full vocabulary per completion
token, here computed from TP shards), equal the same pairs scored by ``LlamaForCausalLM`` in
fp64 on the host.
"""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from megatron_adadpo.data import DataConfig, PreferenceSampler, load_preference_dataset
from tests.distributed.train_harness import read_metrics, run_trainer
from tests.launcher import run_ranks

pytestmark = [pytest.mark.e2e, pytest.mark.distributed]
REPO = Path(__file__).resolve().parents[2]
TOKENIZER = REPO / "examples/data/tokenizer"


def _hf_model(directory: Path):
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=640,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.08)
    model.save_pretrained(directory, safe_serialization=True)
    for f in TOKENIZER.iterdir():
        shutil.copy(f, directory / f.name)
    return model.double().eval()


def _yaml(value) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


@torch.no_grad()
def _completion_logps(model, ids: list, prompt_length: int) -> float:
    x = torch.tensor([ids])
    logp = torch.log_softmax(model(input_ids=x).logits.double(), -1)[0, :-1]
    token = logp.gather(-1, x[0, 1:, None])[:, 0]
    return float(token[prompt_length - 1 :].sum())  # labels of completion tokens (EOS too)


@torch.no_grad()
def _completion_logit_sum(model, ids: list, prompt_length: int) -> tuple[float, int]:
    """(sum over completion-token positions of the mean logit over the vocabulary, count)."""
    logits = model(input_ids=torch.tensor([ids])).logits.double()[0, :-1]
    mean = logits.mean(-1)[prompt_length - 1 :]
    return float(mean.sum()), mean.numel()


def test_step1_logprobs_from_converted_hf_equal_hf_model(tmp_path):
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    hf = _hf_model(hf_dir)
    ckpt = tmp_path / "megatron"
    out = subprocess.run(
        [
            sys.executable,
            "tools/convert_hf_to_megatron.py",
            "--hf-dir",
            str(hf_dir),
            "--output",
            str(ckpt),
            "--dtype",
            "fp32",
            "--no-progress",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    model_section = yaml.safe_load((ckpt / "model.yaml").read_text())
    sets = [f"model.{k}={_yaml(v)}" for k, v in model_section.items()]
    sets += [
        "execution.tp=2",
        "data.max_length=64",
        "data.max_prompt_length=32",
        f"data.cache_dir={tmp_path / 'cache'}",
        f"logging.run_dir={tmp_path / 'run'}",
        "train.global_batch_size=8",
        "train.micro_batch_size=2",
        "train.train_iters=1",
        f"train.init_checkpoint={ckpt}",
        "eval.interval=0",
        "logging.progress=false",
        "checkpoint.save_at_end=false",
    ]
    argv = ["--config", str(REPO / "examples/configs/quickstart.yaml")]
    for item in sets:
        argv += ["--set", item]
    run_ranks(run_trainer, 2, argv, timeout=300)
    row = read_metrics(tmp_path / "run")[0]
    assert row["loss"] == pytest.approx(0.6931471805599453, abs=1e-6)

    data = DataConfig(
        inputs=("examples/data/prefs_train.jsonl",),
        tokenizer=str(TOKENIZER),
        max_length=64,
        max_prompt_length=32,
        cache_dir=str(tmp_path / "cache"),
        chat_template="always",  # as the quickstart config
    )
    dataset = load_preference_dataset(data)
    sampler = iter(PreferenceSampler(len(dataset), 8, 2, 0, 1, seed=1234))
    pairs = [dataset[i] for _ in range(4) for i in next(sampler)]
    chosen = [_completion_logps(hf, list(p["chosen_ids"]), p["prompt_length"]) for p in pairs]
    rejected = [_completion_logps(hf, list(p["rejected_ids"]), p["prompt_length"]) for p in pairs]
    assert row["logps/chosen"] == pytest.approx(sum(chosen) / 8, rel=1e-5)
    assert row["logps/rejected"] == pytest.approx(sum(rejected) / 8, rel=1e-5)
    for key in ("chosen", "rejected"):
        sums = [_completion_logit_sum(hf, list(p[f"{key}_ids"]), p["prompt_length"]) for p in pairs]
        tokens = sum(n for _, n in sums)
        assert row[f"logits/{key}"] == pytest.approx(sum(s for s, _ in sums) / tokens, abs=1e-6)
