"""Megatron checkpoint (any layout it was saved with) -> HF directory for ``from_pretrained``.

Writes ``model-0000k-of-0000n.safetensors`` + ``model.safetensors.index.json``, ``config.json``,
``generation_config.json`` and the tokenizer files. The checkpoint is read shard by shard: each
output shard's tensors are loaded (``dist_checkpointing`` reads only those keys), converted and
written before the next, so memory holds about one output shard.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import yaml
from tqdm import tqdm

from megatron_adadpo.convert import hf_io, mapping, megatron_io
from megatron_adadpo.convert.hf_config import model_config_to_hf
from megatron_adadpo.model.config import ModelConfig

log = logging.getLogger(__name__)
DEFAULT_SHARD_BYTES = 2 * 1024**3
EXPORT_FIX = "copy the checkpoint again, or pass an earlier iter_* directory with --checkpoint"
_HF_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


def plan_shards(model: ModelConfig, element_size: int, max_bytes: int) -> list[list]:
    """Entries grouped into output shards of at most ``max_bytes`` (one entry never splits)."""
    shards, current, size = [], [], 0
    for entry in mapping.tensor_map(model):
        nbytes = sum(_numel(mapping.hf_shape(n, model)) for n in entry.hf) * element_size
        if current and size + nbytes > max_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(entry)
        size += nbytes
    if current:
        shards.append(current)
    return shards


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def output_dtype(model: ModelConfig, stored: torch.dtype, requested) -> torch.dtype:
    """``--dtype``, else the dtype named in the original config.json, else the stored dtype."""
    if requested is not None:
        return requested
    name = model.hf_extra.get("torch_dtype") or model.hf_extra.get("dtype")
    return _HF_DTYPES.get(name, stored)


def find_tokenizer(checkpoint: Path, explicit: str | Path | None) -> Path | None:
    """``--tokenizer-dir``, else ``tokenizer/`` beside the checkpoint or in a directory named by
    its run's ``config.yaml`` (e.g. the converted initial checkpoint)."""
    if explicit:
        path = Path(explicit)
        if not hf_io.has_tokenizer(path):
            raise FileNotFoundError(
                f"--tokenizer-dir {path} has no tokenizer.json / tokenizer.model"
            )
        return path
    candidates = [checkpoint, checkpoint / "tokenizer"]
    for cfg in (checkpoint / "config.yaml", checkpoint.parent.parent / "config.yaml"):
        if cfg.is_file():
            for value in _strings(yaml.safe_load(cfg.read_text())):
                p = Path(value)
                candidates += [p, p / "tokenizer", p.parent / "tokenizer"]
    for path in candidates:
        try:
            if path.is_dir() and hf_io.has_tokenizer(path):
                return path
        except OSError:
            continue
    return None


def _strings(node):
    if isinstance(node, dict):
        for v in node.values():
            yield from _strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from _strings(v)
    elif isinstance(node, str) and ("/" in node or node.startswith(".")):
        yield node


_SPECIAL = ("bos_token_id", "eos_token_id", "pad_token_id")


def _special_token_ids(model: ModelConfig, tok_dir: Path | None) -> dict:
    """bos / eos ids for a model that never had an HF config (trained from scratch)."""
    if tok_dir is None or "model_type" in model.hf_extra:  # converted from HF: keep its config
        return {}
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}
    return {k: v for k, v in ids.items() if v is not None}


def write_side_files(out: Path, model: ModelConfig, tok_dir: Path | None, dtype) -> None:
    """config.json, generation_config.json and the tokenizer files."""
    config = model_config_to_hf(model)
    special = _special_token_ids(model, tok_dir)
    config.update({k: v for k, v in special.items() if k not in config})
    for key in ("torch_dtype", "dtype"):
        if key in config:
            config[key] = str(dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    copied = hf_io.copy_tokenizer_files(tok_dir, out) if tok_dir else []
    if "generation_config.json" not in copied:
        gen = {k: v for k, v in config.items() if k in _SPECIAL and v is not None}
        import transformers

        gen["transformers_version"] = transformers.__version__
        (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")


def convert_megatron_to_hf(
    checkpoint: str | Path,
    output: str | Path,
    dtype: str | None = None,
    tokenizer_dir: str | Path | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    progress: bool = True,
) -> Path:
    """Convert; returns the output directory."""
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes={max_shard_bytes} must be > 0 (--max-shard-size-gb)")
    requested = megatron_io.parse_dtype(dtype) if dtype else None
    hf_io.require_empty_output(Path(output))
    ckpt = megatron_io.resolve_checkpoint(checkpoint)
    megatron_io.check_files(ckpt, EXPORT_FIX)
    model = megatron_io.checkpoint_model_config(ckpt)
    tok_dir = find_tokenizer(ckpt, tokenizer_dir)
    if tok_dir is None:
        raise FileNotFoundError(
            f"no tokenizer files found for {ckpt} (looked in its tokenizer/ and the paths in its "
            "config.yaml); pass --tokenizer-dir DIR (the HF model directory it started from)"
        )
    hf_io.check_tokenizer_vocab(tok_dir, model.vocab_size, f"vocab_size in {ckpt}/model.yaml")
    megatron_io.init_single_process()
    stored = megatron_io.stored_dtype(ckpt)
    out_dtype = output_dtype(model, stored, requested)
    with hf_io.staged_output(Path(output)) as stage:
        count = _write(stage, ckpt, model, stored, out_dtype, tok_dir, max_shard_bytes, progress)
    log.info("wrote %s (%s, %d shards) from %s", output, out_dtype, count, ckpt)
    return Path(output)


def _write(out: Path, ckpt: Path, model, stored, out_dtype, tok_dir, max_bytes, progress) -> int:
    """The HF files into ``out``, shard by shard; returns the number of shards."""
    shards = plan_shards(model, out_dtype.itemsize, max_bytes)
    weight_map, total = {}, 0
    bar = tqdm(
        total=sum(len(s) for s in shards),
        desc="Megatron -> HF",
        unit="tensor",
        disable=not progress,
    )
    sharded = megatron_io.template(model, stored)
    for i, entries in enumerate(shards):
        names = [e.megatron for e in entries]
        loaded = megatron_io.load_subset(ckpt, sharded, names, stored, EXPORT_FIX)
        tensors = {}
        for entry in entries:
            parts = mapping.to_hf(entry, loaded.pop(entry.megatron), model)
            tensors.update({n: t.to(out_dtype) for n, t in zip(entry.hf, parts, strict=True)})
            bar.update()
        file = hf_io.shard_file_name(i, len(shards))
        total += hf_io.write_shard(out, file, tensors)
        weight_map.update(dict.fromkeys(tensors, file))
        del tensors, loaded
    bar.close()
    hf_io.write_index(out, weight_map, total)
    write_side_files(out, model, tok_dir, out_dtype)
    return len(shards)
