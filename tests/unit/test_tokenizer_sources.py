"""Which tokenizer a path means (a sentencepiece directory is read by sentencepiece), and an
``init_checkpoint``'s tokenizer compared with a sentencepiece ``data.tokenizer``."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import sentencepiece as spm

from megatron_adadpo.config import ConfigError, load_config
from megatron_adadpo.data import DataConfig, load_preference_dataset
from megatron_adadpo.data import pipeline as pipeline_module
from megatron_adadpo.data.tokenize import load_tokenizer, resolve_tokenizer
from megatron_adadpo.model.config import write_model_config

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "examples" / "data"
SPM, HF = DATA / "spm" / "spm.model", DATA / "tokenizer"
TEXT = "What is 2 + 2? Hello, world."


def _sp_dir(tmp_path: Path, *names: str, extra: dict[str, str] | None = None) -> Path:
    d = tmp_path / "sp"
    d.mkdir()
    for name in names:
        shutil.copy(SPM, d / name)
    for name, text in (extra or {}).items():
        (d / name).write_text(text)
    return d


@pytest.mark.parametrize("name", ["spm.model", "tokenizer.model"])
def test_sentencepiece_directory_is_read_by_sentencepiece(tmp_path, name):
    d = _sp_dir(tmp_path, name, extra={"params.json": "{}", "README.md": "llama"})
    tok = load_tokenizer(str(d))
    reference = spm.SentencePieceProcessor(model_file=str(SPM))  # sentencepiece itself
    assert tok.kind == "sentencepiece" and tok.path == str(d / name)
    assert tok.encode(TEXT) == reference.encode(TEXT)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (
        reference.bos_id(),
        reference.eos_id(),
        reference.pad_id(),
    )
    assert tok.identity() == load_tokenizer(str(d / name)).identity()  # as the file itself


def test_tokenizer_kind_rules(tmp_path):
    hf_with_model = tmp_path / "hfsp"
    shutil.copytree(HF, hf_with_model)
    shutil.copy(SPM, hf_with_model / "tokenizer.model")
    assert resolve_tokenizer(str(hf_with_model)) == ("hf", str(hf_with_model))
    assert resolve_tokenizer(str(hf_with_model), "sentencepiece") == (
        "sentencepiece",
        str(hf_with_model / "tokenizer.model"),
    )
    assert resolve_tokenizer(str(SPM)) == ("sentencepiece", str(SPM))
    two = _sp_dir(tmp_path, "a.model", "b.model")
    message = (
        f"data.tokenizer={two} is a directory with no HF tokenizer files (tokenizer.json / "
        "tokenizer_config.json) and 2 sentencepiece .model files (a.model, b.model): set "
        "data.tokenizer to the sentencepiece .model file itself, or to an HF tokenizer directory"
    )
    with pytest.raises(ValueError) as err:
        load_tokenizer(str(two))
    assert str(err.value) == message
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="and no sentencepiece .model file: set data.tokenizer"):
        load_tokenizer(str(tmp_path / "empty"), "sentencepiece")


def test_dataset_of_a_sentencepiece_directory_matches_its_model_file(tmp_path):
    """Preprocessed with the directory, trained with the file (or the reverse): one tokenizer."""
    d = _sp_dir(tmp_path, "spm.model", extra={"params.json": "{}"})
    cfg = DataConfig(
        inputs=(str(DATA / "prefs_eval.jsonl"),),
        tokenizer=str(d),
        max_length=64,
        max_prompt_length=32,
        cache_dir=str(tmp_path / "cache"),
    )
    pipeline_module.preprocess(cfg, str(tmp_path / "pre"), progress=False)
    trained = cfg.replace(tokenizer=str(SPM))
    pre = load_preference_dataset(trained.replace(preprocessed=str(tmp_path / "pre")))
    fly = load_preference_dataset(trained)
    assert pre.identity == fly.identity and pre.manifest["tokenizer"]["kind"] == "sentencepiece"


def _checkpoint(tmp_path: Path, files: dict[str, Path]) -> Path:
    """A stand-in converted checkpoint: model.yaml and tokenizer/ (no weights needed)."""
    quick = load_config(str(ROOT / "examples/configs/quickstart.yaml"), [])
    ckpt = tmp_path / "ckpt"
    (ckpt / "tokenizer").mkdir(parents=True)
    write_model_config(ckpt, quick.model)
    for name, source in files.items():
        shutil.copy(source, ckpt / "tokenizer" / name)
    return ckpt


def _load(ckpt: Path, tokenizer: Path):
    return load_config(
        str(ROOT / "examples/configs/quickstart.yaml"),
        [f"train.init_checkpoint={ckpt}", f"data.tokenizer={tokenizer}"],
    )


def test_sentencepiece_tokenizer_against_an_hf_checkpoint_is_refused(tmp_path):
    hf_files = {p.name: p for p in HF.iterdir()}
    ckpt = _checkpoint(tmp_path, hf_files)
    assert _load(ckpt, HF).train.init_checkpoint == str(ckpt)  # the same HF tokenizer
    for given in (SPM, _sp_dir(tmp_path, "spm.model")):
        with pytest.raises(ConfigError) as err:
            _load(ckpt, given)
        line = str(err.value)
        assert "\n" not in line and line.startswith(
            f"data.tokenizer={given} is not the tokenizer of train.init_checkpoint "
            f"{ckpt / 'tokenizer'} (holds chat_template.jinja, tokenizer.json, "
            "tokenizer_config.json; tokenizer.model differs or is missing)"
        )
        assert line.endswith(f"set data.tokenizer: {ckpt / 'tokenizer'}")


def test_sentencepiece_tokenizer_equal_to_the_checkpoints_model_is_accepted(tmp_path):
    ckpt = _checkpoint(
        tmp_path, {"tokenizer.model": SPM, "tokenizer_config.json": HF / "tokenizer_config.json"}
    )
    for given in (SPM, _sp_dir(tmp_path, "spm.model")):
        assert _load(ckpt, given).train.init_checkpoint == str(ckpt)
    other = tmp_path / "other.model"
    other.write_bytes(SPM.read_bytes() + b"\0")  # another file
    with pytest.raises(ConfigError, match="tokenizer.model differs or is missing"):
        _load(ckpt, other)
