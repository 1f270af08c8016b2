"""Inputs of a run that must agree with each other. Torch-free.

- ``train.init_checkpoint`` against the ``model`` section (``model.yaml``: shape, RoPE, norm
  epsilon, positions) and against ``data.tokenizer`` (the tokenizer files the converter stored
  in ``<init_checkpoint>/tokenizer``): checked with the config, before anything is allocated.
- The tokenizer's vocabulary and the data's largest token id against ``model.vocab_size``
  (after the data is loaded and its checksums verified, before the model is built): an id past
  the vocabulary has no embedding row (an ``IndexError`` at TP 1; at TP > 1 it falls outside
  every shard, or on a padding row, and trains silently wrong).
- A precomputed reference against the run's starting model (``starting_model``).
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
    """Refuse an init checkpoint whose model or tokenizer differs from the config's."""
    from megatron_adadpo.model.config import check_same_architecture, read_model_config

    path = config.train.init_checkpoint
    if not path:
        return
    if not Path(path).is_dir():
        raise ConfigError(
            f"train.init_checkpoint={path} does not exist (convert an HF model with "
            "tools/convert_hf_to_megatron.py)"
        )
    try:
        check_same_architecture(read_model_config(path), config.model, path)
    except (ValueError, FileNotFoundError) as err:
        raise ConfigError(f"train.init_checkpoint: {err}") from None
    data = config.data
    _check_tokenizer(Path(path) / TOKENIZER_SUBDIR, data.tokenizer, data.tokenizer_kind)


def _check_tokenizer(stored: Path, tokenizer: str | None, kind: str) -> None:
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
                f"data.tokenizer={tokenizer} is not the tokenizer of train.init_checkpoint "
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


def starting_model(config: Config) -> dict:
    """What the policy starts from (the reference model): the model section plus the init
    checkpoint's fingerprint, or the initialisation method and seed."""
    train = config.train
    start = {"model": config.model.to_dict()}
    if train.init_checkpoint:
        start["init_checkpoint"] = checkpoint_fingerprint(train.init_checkpoint)
    else:
        start.update(init_method=train.init_method, seed=train.seed)
    return start


def check_starting_model(recorded: dict | None, config: Config, where: str) -> None:
    """Refuse precomputed reference values made from another starting model."""
    current = starting_model(config)
    if recorded == current:
        return
    if recorded is None:
        what = "records no starting model (written by an older version)"
    else:
        keys = sorted(k for k in set(recorded) | set(current) if recorded.get(k) != current.get(k))
        what = f"was made from another starting model (differs in: {', '.join(keys)})"
    raise ConfigError(
        f"reference.path={where} {what}: its log-probs are not this policy's initial ones "
        "(step 1 would not start at ln 2); re-run tools/precompute_reference.py with this config"
    )
