"""Load a checkpoint saved at any layout into one TP1 / PP1 model, and find its tokenizer.

Checkpoints are ``dist_checkpointing`` directories with global keys, so the trainer's
(``<run_dir>/checkpoints/iter_*``, at any TP / PP / VPP / DP) and the HF converter's load into
a single-process model (``run.checkpoints.load_model``). The model keeps the checkpoint's dtype.
"""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from megatron_adadpo.convert.megatron_io import (
    checkpoint_model_config,
    init_single_process,
    resolve_checkpoint,
    stored_dtype,
)
from megatron_adadpo.convert.megatron_to_hf import find_tokenizer
from megatron_adadpo.data.tokenize import PairTokenizer, load_tokenizer
from megatron_adadpo.layout import ExecutionConfig
from megatron_adadpo.model.build import build_model
from megatron_adadpo.model.config import ModelConfig
from megatron_adadpo.run.state.checkpoints import load_model


def load_policy(checkpoint: str | Path) -> tuple[torch.nn.Module, ModelConfig, Path]:
    """``(model in eval mode, its ModelConfig, the resolved checkpoint directory)``.

    ``checkpoint``: a checkpoint or ``iter_*`` directory, a checkpoints root or a run directory
    (its ``latest``). Starts a world of one process (``init_single_process``).
    """
    directory = resolve_checkpoint(checkpoint)
    model_config = checkpoint_model_config(directory)
    init_single_process()
    run = ExecutionConfig(bf16=stored_dtype(directory) == torch.bfloat16)
    chunks = build_model(model_config, run)
    load_model(chunks, directory, model_config)
    return chunks[0].eval(), model_config, directory


def training_data_settings(directory: Path) -> dict:
    """The ``data`` section of the run that wrote the checkpoint (its ``config.yaml``, in the
    checkpoint or two levels up), or ``{}`` (e.g. a checkpoint converted from HF)."""
    for config in (directory / "config.yaml", directory.parent.parent / "config.yaml"):
        if config.is_file():
            return (yaml.safe_load(config.read_text()) or {}).get("data") or {}
    return {}


def checkpoint_tokenizer(directory: Path, explicit: str | None = None) -> PairTokenizer:
    """``explicit``, else the training run's ``data.tokenizer`` (its ``config.yaml``), else a
    tokenizer directory beside the checkpoint (HF conversions keep one in ``tokenizer/``)."""
    if explicit:
        return load_tokenizer(explicit)
    data = training_data_settings(directory)
    if data.get("tokenizer") and Path(data["tokenizer"]).exists():
        return load_tokenizer(data["tokenizer"], data.get("tokenizer_kind", "auto"))
    found = find_tokenizer(directory, None)
    if found is None:
        raise FileNotFoundError(
            f"no tokenizer found for {directory} (its run's config.yaml names none that exists, "
            "and it has no tokenizer/ directory); pass --tokenizer PATH"
        )
    return load_tokenizer(str(found))
