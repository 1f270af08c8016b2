"""LoRA export: a TP2 adapter checkpoint merged into its base as an HF model, and as PEFT
adapter files that ``peft`` loads onto the HF base with the same logits (tiny Llama)."""

import shutil

import pytest
import torch

from megatron_adadpo.convert import lora_export
from megatron_adadpo.convert.megatron_to_hf import convert_megatron_to_hf
from tests.convert_models import hf_logits
from tests.distributed.train_harness import REPO, run_trainer
from tests.launcher import run_ranks

pytestmark = pytest.mark.distributed

SFT_TINY = REPO / "examples/checkpoints/sft_tiny"


def _argv(run_dir, cache_dir):
    settings = [
        f"train.init_checkpoint={SFT_TINY}",
        f"logging.run_dir={run_dir}",
        f"data.cache_dir={cache_dir}",
        "reference.mode=null",
        "lora.rank=4",
        "lora.alpha=8",
        "lora.target_modules=[linear_qkv,linear_proj,linear_fc1,linear_fc2]",
        "optimizer.lr=2e-2",
        "optimizer.warmup_fraction=0.0",
        "train.train_iters=3",
        "train.global_batch_size=8",
        "train.micro_batch_size=4",
        "eval.interval=0",
        "logging.progress=false",
    ]
    out = ["--config", str(REPO / "examples/configs/quickstart.yaml")]
    for item in settings:
        out += ["--set", item]
    return out


def _call(rank, world, fn, *args, **kwargs):
    try:
        return str(fn(*args, **kwargs))
    except ValueError as err:
        return f"ValueError: {err}"


@pytest.fixture(scope="module")
def exported(tmp_path_factory, cache_dir):
    tmp = tmp_path_factory.mktemp("lora_export")
    run_ranks(run_trainer, 2, _argv(tmp / "run", cache_dir), timeout=300)  # TP2 adapters
    run_ranks(_call, 1, convert_megatron_to_hf, SFT_TINY, tmp / "base_hf", progress=False)
    run_ranks(_call, 1, lora_export.export_merged, tmp / "run", tmp / "merged", progress=False)
    run_ranks(_call, 1, lora_export.export_peft, tmp / "run", tmp / "adapter")
    return tmp


def test_peft_adapter_on_hf_base_equals_merged_export(exported):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = torch.randint(0, 600, (2, 24), generator=torch.Generator().manual_seed(2))
    base = AutoModelForCausalLM.from_pretrained(str(exported / "base_hf"), dtype=torch.float32)
    with torch.no_grad():
        plain = base(input_ids=ids).logits.float()
        peft = PeftModel.from_pretrained(base, str(exported / "adapter")).eval()
        adapted = peft(input_ids=ids).logits.float()
    merged = hf_logits(exported / "merged", ids)
    assert (merged - plain).abs().max() > 1e-3  # the adapters moved the model
    torch.testing.assert_close(adapted, merged, rtol=1e-5, atol=1e-5)


def test_export_refuses_another_base(exported, tmp_path):
    other = tmp_path / "other_base"
    shutil.copytree(SFT_TINY, other)
    (other / "metadata.json").write_text((other / "metadata.json").read_text() + " ")
    error = run_ranks(
        _call, 1, lora_export.export_peft, exported / "run", tmp_path / "a", base=other
    )[0]
    assert error.startswith("ValueError") and "not the base" in error
