"""Export a LoRA run's adapter checkpoint: merged into its base as an HF model, or as a PEFT
adapter (``adapter_config.json`` + ``adapter_model.safetensors``) that ``peft`` loads onto the
HF base model.

An adapter checkpoint holds only ``lora_a`` / ``lora_b`` and names its base (the run state's
``adapter_base``: ``train.init_checkpoint`` and its fingerprint); a base whose files differ is
refused. The adapters are read at TP1 (any saved layout reshards), beside the base:

- merged: ``W += (alpha / r) B A`` per adapted linear (Megatron's TP1 layout: ``linear_qkv``
  rows fused per query group, ``linear_fc1`` rows ``[gate; up]``), then the existing
  Megatron -> HF conversion (``convert/megatron_to_hf.py``);
- PEFT: Megatron's fused layers become HF's separate ones with the same update: ``B``'s rows
  split like the weight's (``mapping.split_qkv``, the fc1 halves, vocabulary padding dropped)
  and ``A`` shared, so ``B_q A`` is exactly the q rows of ``B A``. PEFT's scale ``lora_alpha /
  r`` is the run's.

Shapes: ``A`` ``[r, in]``, ``B`` ``[out, r]`` (TP1, full).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from megatron_adadpo.convert import mapping, megatron_io
from megatron_adadpo.convert.megatron_to_hf import convert_megatron_to_hf, find_tokenizer
from megatron_adadpo.layout import ExecutionConfig
from megatron_adadpo.model.config import ModelConfig
from megatron_adadpo.model.lora import LoraLinear, add_adapters, lora_layers
from megatron_adadpo.model.lora_config import LoraSection
from megatron_adadpo.platform.safe_dcp import common_state_dict

FIX = "pass the iter_* directory of a LoRA run (lora: section) with --checkpoint"
# Megatron layer -> HF modules of the Llama family (what splits B's rows: mapping.to_hf kinds)
HF_MODULES = {
    "linear_qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "linear_proj": ("self_attn.o_proj",),
    "linear_fc1": ("mlp.gate_proj", "mlp.up_proj"),
    "linear_fc2": ("mlp.down_proj",),
}


def adapter_run(checkpoint: str | Path, base: str | Path | None) -> tuple:
    """(checkpoint dir, model, lora section, base checkpoint dir) of an adapter checkpoint;
    refuses one without adapters and a base other than the one it was trained on."""
    from megatron_adadpo.run.state.consistency import checkpoint_fingerprint

    ckpt = megatron_io.resolve_checkpoint(checkpoint)
    recorded = (common_state_dict(ckpt).get("run") or {}).get("adapter_base")
    if recorded is None:
        raise ValueError(f"{ckpt} holds no LoRA adapters (a full model): {FIX}")
    base = Path(base or recorded["init_checkpoint"] or "")
    fingerprint = recorded["base"].get("checkpoint")
    if fingerprint is None or not base.is_dir():
        raise ValueError(
            f"{ckpt}'s adapters were trained on a randomly initialised base (no init "
            "checkpoint to merge into) or the base is missing: pass --lora-base DIR"
        )
    if checkpoint_fingerprint(base) != fingerprint:
        raise ValueError(
            f"{base} is not the base {ckpt}'s adapters were trained on (its files differ from "
            f"the recorded {recorded['init_checkpoint']}): pass that checkpoint with --lora-base"
        )
    shape = recorded["lora"]
    lora = LoraSection(rank=shape["rank"], alpha=shape["alpha"], target_modules=shape["targets"])
    return ckpt, megatron_io.checkpoint_model_config(ckpt), lora, base


def load_adapted(ckpt: Path, model: ModelConfig, lora: LoraSection, base: Path) -> list:
    """A TP1 model: the base checkpoint's weights plus the checkpoint's adapters (fp32)."""
    from megatron_adadpo.model.build import build_model
    from megatron_adadpo.run.state import checkpoints

    megatron_io.init_single_process()
    chunks = build_model(model, ExecutionConfig(transformer_impl="local"))
    checkpoints.load_model(chunks, base, model)
    add_adapters(chunks, lora, seed=0)
    sharded = checkpoints.model_sharded_state_dict(chunks)  # the adapters only
    loaded = checkpoints.load_tolerating_extra_state(sharded, ckpt, FIX)
    chunks[0].load_state_dict(loaded["model"], strict=False)
    return chunks


@torch.no_grad()
def merge_adapters(chunks: list) -> None:
    """``W += (alpha / r) B A`` in every adapted linear, which is then replaced by its base."""
    for chunk in chunks:
        for name, module in list(chunk.named_modules()):
            if isinstance(module, LoraLinear):
                update = module.lora_b.double() @ module.lora_a.double() * module.scaling
                module.base.weight += update.to(module.base.weight.dtype)
                parent, _, child = name.rpartition(".")
                setattr(chunk.get_submodule(parent) if parent else chunk, child, module.base)


def export_merged(checkpoint, output, base=None, tokenizer_dir=None, **convert_options) -> Path:
    """The base with the adapters merged, as an HF directory (``convert_megatron_to_hf``)."""
    from megatron_adadpo.run.state import checkpoints

    ckpt, model, lora, base = adapter_run(checkpoint, base)
    tok_dir = find_tokenizer(ckpt, tokenizer_dir) or find_tokenizer(base, None)
    chunks = load_adapted(ckpt, model, lora, base)
    merge_adapters(chunks)
    with tempfile.TemporaryDirectory(dir=Path(output).parent) as tmp:
        checkpoints.save_model(chunks, tmp, model)
        return convert_megatron_to_hf(tmp, output, tokenizer_dir=tok_dir, **convert_options)


def peft_tensors(chunks: list, model: ModelConfig) -> dict[str, torch.Tensor]:
    """PEFT's ``adapter_model.safetensors`` entries of the TP1 adapted ``chunks``."""
    out = {}
    for layer, prefix in _adapted_layers(chunks):
        a, b = layer.lora_a.detach().float(), layer.lora_b.detach().float()
        kind = prefix.rsplit(".", 1)[-1]
        if kind == "output_layer":
            parts, names = [b[: model.vocab_size]], ["lm_head"]
        else:
            number = int(prefix.split(".")[2])
            entry = mapping.Entry(prefix, HF_MODULES[kind], _KINDS.get(kind, "copy"))
            parts = mapping.to_hf(entry, b, model)
            names = [f"model.layers.{number}.{m}" for m in HF_MODULES[kind]]
        for name, part in zip(names, parts, strict=True):
            out[f"base_model.model.{name}.lora_A.weight"] = a.clone().contiguous()
            out[f"base_model.model.{name}.lora_B.weight"] = part.clone().contiguous()
    return out


_KINDS = {"linear_qkv": "qkv", "linear_fc1": "fc1"}


def _adapted_layers(chunks: list):
    names = {id(m): n for n, m in chunks[0].named_modules()}
    for layer in lora_layers(chunks):
        yield layer, names[id(layer)]


def peft_config(lora: LoraSection, base_name: str | None) -> dict:
    """``adapter_config.json``: PEFT's LoRA on the HF modules the Megatron targets become."""
    targets = [m.rsplit(".", 1)[-1] for t in lora.target_modules for m in HF_MODULES.get(t, ())]
    if "output_layer" in lora.target_modules:
        targets.append("lm_head")
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_name,
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "target_modules": sorted(targets),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "inference_mode": True,
    }


def export_peft(checkpoint, output, base=None, base_name: str | None = None) -> Path:
    """The adapters in PEFT's format (``PeftModel.from_pretrained(hf_base, output)``)."""
    from safetensors.torch import save_file

    ckpt, model, lora, base = adapter_run(checkpoint, base)
    chunks = load_adapted(ckpt, model, lora, base)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=False)
    save_file(peft_tensors(chunks, model), str(out / "adapter_model.safetensors"))
    config = peft_config(lora, base_name)
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out
