"""Inputs of a run that must agree with each other. Torch-free.

- ``train.init_checkpoint`` against the ``model`` section (``model.yaml``: shape, RoPE, norm
  epsilon, positions) and against ``data.tokenizer`` (the tokenizer files the converter stored
  in ``<init_checkpoint>/tokenizer``): checked with the config, before anything is allocated.
- The tokenizer's vocabulary and the data's largest token id against ``model.vocab_size``
  (after the data is loaded and its checksums verified, before the model is built): an id past
  the vocabulary has no embedding row (an ``IndexError`` at TP 1; at TP > 1 it falls outside
  every shard, or on a padding row, and trains silently wrong).
- A precomputed reference against the run's reference model (``reference_model``: the model
  of ``reference.checkpoint`` when set, else the policy's starting model).
- A precomputed reference against the run's LD-DPO weighting (``loss.ld_alpha``:
  ``check_precomputed_loss``).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING

from megatron_adadpo.config_text import ConfigError

if TYPE_CHECKING:
    from megatron_adadpo.config import Config

TOKENIZER_SUBDIR = "tokenizer"  # where tools/convert_hf_to_megatron.py stores the tokenizer
_NOT_TOKENIZER = ("generation_config.json",)
_SAMPLE_BYTES = 1 << 16


def check_init_checkpoint(config: Config) -> None:
    """Refuse an init checkpoint, or a ``reference.checkpoint``, whose model or tokenizer
    differs from the config's."""
    for name, path in (
        ("train.init_checkpoint", config.train.init_checkpoint),
        ("reference.checkpoint", config.reference.checkpoint),
    ):
        if path:
            _check_checkpoint(config, name, path)


def _check_checkpoint(config: Config, name: str, path: str) -> None:
    from megatron_adadpo.model.config import check_same_architecture, read_model_config

    if not Path(path).is_dir():
        raise ConfigError(
            f"{name}={path} does not exist (convert an HF model with "
            "tools/convert_hf_to_megatron.py)"
        )
    try:
        check_same_architecture(read_model_config(path), config.model, path)
    except (ValueError, FileNotFoundError) as err:
        raise ConfigError(f"{name}: {err}") from None
    data = config.data
    _check_tokenizer(Path(path) / TOKENIZER_SUBDIR, data.tokenizer, data.tokenizer_kind, name)


def _check_tokenizer(stored: Path, tokenizer: str | None, kind: str, name: str) -> None:
    """``data.tokenizer`` must be the tokenizer stored with the checkpoint: an HF directory
    holds each stored file, equal; a sentencepiece model equals the stored ``tokenizer.model``
    (a checkpoint with an HF tokenizer and no such file has another tokenizer)."""
    from megatron_adadpo.data.tokenize import resolve_tokenizer

    if tokenizer is None or not stored.is_dir():
        return
    try:
        given = Path(resolve_tokenizer(tokenizer, kind)[1])
    except ValueError as err:
        raise ConfigError(str(err)) from None
    files = sorted(p for p in stored.iterdir() if p.is_file() and p.name not in _NOT_TOKENIZER)
    if given.is_file():  # a sentencepiece model
        files = [stored / "tokenizer.model"]
    for file in files:
        other = given if given.is_file() else given / file.name
        if not file.is_file() or not other.is_file() or other.read_bytes() != file.read_bytes():
            held = ", ".join(sorted(p.name for p in stored.iterdir())) or "nothing"
            raise ConfigError(
                f"data.tokenizer={tokenizer} is not the tokenizer of {name} "
                f"{stored} (holds {held}; {file.name} differs or is missing): the token ids "
                f"would not match the weights; set data.tokenizer: {stored}"
            )


def check_vocab(
    config: Config,
    tokenizer_vocab_size: int,
    tokenizer: str | None,
    max_token_id: int = -1,
    data_dir: str | None = None,
) -> None:
    """Refuse a model vocabulary smaller than the tokenizer's, or than the largest token id
    + 1 of the data in ``data_dir`` (``max_token_id``, from its verified manifest)."""
    vocab = config.model.vocab_size
    if tokenizer_vocab_size > vocab:
        raise ConfigError(
            f"data.tokenizer={tokenizer} has {tokenizer_vocab_size} tokens but "
            f"model.vocab_size={vocab}: ids {vocab}..{tokenizer_vocab_size - 1} have no "
            f"embedding row; set model.vocab_size >= {tokenizer_vocab_size} (the converted "
            "model.yaml has the right value)"
        )
    if max_token_id >= vocab:
        raise ConfigError(
            f"{data_dir} holds token id {max_token_id} but model.vocab_size={vocab}: ids >= "
            f"{vocab} have no embedding row; re-run tools/preprocess_data.py --force with this "
            "model's tokenizer (or train the model its data was made for)"
        )


def checkpoint_fingerprint(directory: str | Path) -> str:
    """sha256 over a checkpoint's file names, sizes and sampled bytes (start, middle, end of
    each file): equal for copies, different for other weights, and cheap at any size."""
    root = Path(directory)
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        size = path.stat().st_size
        digest.update(f"{path.relative_to(root)}\0{size}\0".encode())
        with open(path, "rb") as handle:
            for offset in {0, max(0, size // 2 - _SAMPLE_BYTES // 2), max(0, size - _SAMPLE_BYTES)}:
                handle.seek(offset)
                digest.update(handle.read(_SAMPLE_BYTES))
    return digest.hexdigest()


def reference_model(config: Config) -> dict:
    """The model whose log-probs are the reference: the model section plus the fingerprint of
    ``reference.checkpoint``, else of ``train.init_checkpoint`` (the policy's start), else the
    initialisation method and seed. Precomputing with ``train.init_checkpoint=B`` and with
    ``reference.checkpoint=B`` records the same value."""
    return _model_identity(config, config.reference.checkpoint or config.train.init_checkpoint)


def starting_model(config: Config) -> dict:
    """The model the policy starts from (a LoRA run's base): as ``reference_model``, with
    ``train.init_checkpoint`` only."""
    return _model_identity(config, config.train.init_checkpoint)


def _model_identity(config: Config, checkpoint: str | None) -> dict:
    identity = {"model": config.model.to_dict()}
    if checkpoint:
        identity["checkpoint"] = checkpoint_fingerprint(checkpoint)
    else:
        identity.update(init_method=config.train.init_method, seed=config.train.seed)
    return identity


def recorded_reference_model(meta: dict) -> dict | None:
    """``reference_model`` as a precomputed file's ``meta.json`` records it; files written
    before ``reference.checkpoint`` record ``starting_model`` with ``init_checkpoint``."""
    if "reference_model" in meta:
        return meta["reference_model"]
    legacy = meta.get("starting_model")
    if legacy is None or "init_checkpoint" not in legacy:
        return legacy
    legacy = dict(legacy)
    legacy["checkpoint"] = legacy.pop("init_checkpoint")
    return legacy


def check_reference_model(recorded: dict | None, config: Config, where: str) -> None:
    """Refuse precomputed reference values made from another model than the reference
    (``reference.checkpoint``, or the starting model when it is unset)."""
    current = reference_model(config)
    if recorded == current:
        return
    if config.reference.checkpoint:
        field = f"reference.checkpoint={config.reference.checkpoint}"
    elif config.train.init_checkpoint:
        field = f"train.init_checkpoint={config.train.init_checkpoint} (the starting model)"
    else:
        field = "the starting model (train.init_method, train.seed)"
    if recorded is None:
        what = "records no reference model (written by an older version)"
    else:
        keys = sorted(k for k in set(recorded) | set(current) if recorded.get(k) != current.get(k))
        what = f"was made from another reference model (differs in: {', '.join(keys)})"
    raise ConfigError(
        f"reference.path={where} {what} than this run's reference, {field}: set "
        "reference.checkpoint to the model it was precomputed from, or re-run "
        "tools/precompute_reference.py with this config"
    )


def ld_alpha_error(recorded: dict, config: Config, where: str) -> str | None:
    """Why precomputed reference values (their ``meta.json``: ``recorded``) do not fit the run's
    ``loss.ld_alpha`` (LD-DPO weights the reference's sums too), or None. A file that records
    no ``ld_alpha`` predates LD-DPO: its sums are unweighted (``ld_alpha`` None)."""
    made, wanted = recorded.get("ld_alpha"), config.loss.ld_alpha
    if made == wanted:
        return None
    return (
        f"reference.path={where} was precomputed with loss.ld_alpha={made}, but this run has "
        f"loss.ld_alpha={wanted} (LD-DPO weights the reference's log-prob sums too); re-run "
        "tools/precompute_reference.py with this config"
    )


def check_precomputed_loss(recorded: dict, config: Config, where: str) -> None:
    """Refuse precomputed reference values whose loss-side weighting differs from the run's."""
    error = ld_alpha_error(recorded, config, where)
    if error:
        raise ConfigError(error)
