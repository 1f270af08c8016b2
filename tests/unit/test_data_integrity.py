"""Checksums, sizes and the largest token id of preprocessed data: written with it, verified at
every open; a damaged user dataset is refused naming the file and ``--force``, a damaged cache
entry is rebuilt with a warning naming the cache directory."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import xxhash

from megatron_adadpo.config import ConfigError, load_config
from megatron_adadpo.data import DataConfig, PreferenceDataset, load_preference_dataset
from megatron_adadpo.data import pipeline as pipeline_module
from megatron_adadpo.data.integrity import DataIntegrityError, seal
from megatron_adadpo.platform.megatron import IndexedDataset
from megatron_adadpo.run.state.consistency import check_vocab

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "examples" / "data"
EVAL = str(DATA / "prefs_eval.jsonl")
FILES = ("pairs.bin", "pairs.idx", "pair_ids.npy")


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """A preprocessed copy of the bundled eval pairs (64) with the bundled HF tokenizer."""
    out = tmp_path_factory.mktemp("pristine") / "pre"
    pipeline_module.preprocess(_config(), str(out), progress=False)
    return out


def _config(**kw) -> DataConfig:
    base = dict(inputs=(EVAL,), tokenizer=str(DATA / "tokenizer"), max_length=64)
    base["max_prompt_length"] = 32
    return DataConfig(**(base | kw))


def _copy(pristine: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(pristine, tmp_path / "pre"))


def _flip(path: Path, offset: int) -> None:
    """Change one byte, keeping a uint16 token id in range (its low bit flips)."""
    data = bytearray(path.read_bytes())
    data[offset] ^= 1
    path.write_bytes(bytes(data))


def test_manifest_records_digest_size_and_max_token_id(pristine):
    integrity = json.loads((pristine / "manifest.json").read_text())["integrity"]
    assert integrity["algorithm"] == "xxh3_128"
    for name in FILES:
        raw = (pristine / name).read_bytes()  # one-shot reference digest of the whole file
        want = {"bytes": len(raw), "digest": xxhash.xxh3_128(raw).hexdigest()}
        assert integrity["files"][name] == want
    tokens = IndexedDataset(str(pristine / "pairs"))  # Megatron's reader, not ours
    largest = max(int(tokens[k].max()) for k in range(len(tokens)) if len(tokens[k]))
    assert integrity["max_token_id"] == largest == PreferenceDataset(str(pristine)).max_token_id


@pytest.mark.parametrize("name", FILES)
def test_one_changed_byte_is_refused_naming_the_file_and_force(pristine, tmp_path, name):
    pre = _copy(pristine, tmp_path)
    _flip(pre / name, (pre / name).stat().st_size // 2 & ~1)
    with pytest.raises(DataIntegrityError) as err:
        PreferenceDataset(str(pre))
    assert str(err.value).startswith(f"{pre / name} is damaged: its xxh3_128 checksum differs")
    assert f"re-run tools/preprocess_data.py --force --output {pre}" in str(err.value)


@pytest.mark.parametrize(
    "name, size, how",
    [
        ("pairs.bin", lambda n: n - 2, "truncated"),
        ("pairs.idx", lambda n: n // 2, "truncated"),
        ("pairs.bin", lambda n: 0, "truncated"),
        ("pair_ids.npy", lambda n: n + 8, "longer than written"),
    ],
)
def test_wrong_size_is_refused_before_megatron_maps_it(pristine, tmp_path, name, size, how):
    pre = _copy(pristine, tmp_path)
    path = pre / name
    n = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size(n))
    with pytest.raises(DataIntegrityError, match=rf"is {how}: {size(n)} bytes of {n}; re-run"):
        PreferenceDataset(str(pre))
    path.unlink()
    with pytest.raises(DataIntegrityError, match=f"{path} is missing"):
        PreferenceDataset(str(pre))


def test_old_dataset_without_checksums_is_refused_and_rebuilt_by_preprocess(pristine, tmp_path):
    pre = _copy(pristine, tmp_path)
    manifest = json.loads((pre / "manifest.json").read_text())
    del manifest["integrity"]
    (pre / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataIntegrityError, match="manifest.json records no checksums"):
        PreferenceDataset(str(pre))
    _, report = pipeline_module.preprocess(_config(), str(pre), progress=False)
    assert report is not None  # written again although nothing else changed
    assert PreferenceDataset(str(pre)).identity == manifest["identity"]  # same identity


def test_preprocess_rewrites_damaged_files_or_manifest(pristine, tmp_path, caplog):
    """A re-run (no --force needed) does not call damaged files "up to date"; --force also
    replaces a damaged manifest."""
    pre = _copy(pristine, tmp_path)
    _flip(pre / "pairs.bin", 10)
    with caplog.at_level(logging.WARNING):
        _, report = pipeline_module.preprocess(_config(), str(pre), progress=False)
    assert report is not None and f"{pre / 'pairs.bin'} is damaged" in caplog.text
    assert (pre / "pairs.bin").read_bytes() == (pristine / "pairs.bin").read_bytes()
    (pre / "manifest.json").write_bytes(b'{"format": "megatron_adadpo.pref')  # half-copied
    with pytest.raises(DataIntegrityError, match=r"manifest.json is damaged \(.*--force"):
        PreferenceDataset(str(pre))
    pipeline_module.preprocess(_config(), str(pre), progress=False, force=True, guard_output=True)
    assert len(PreferenceDataset(str(pre))) == 64


@pytest.mark.parametrize("damage", ["byte", "truncate", "no_checksums", "manifest"])
def test_damaged_cache_entry_is_rebuilt_with_a_warning(tmp_path, caplog, damage):
    cfg = _config(cache_dir=str(tmp_path / "cache"))
    entry = Path(load_preference_dataset(cfg).directory)
    pristine = {n: (entry / n).read_bytes() for n in FILES}
    if damage == "byte":
        _flip(entry / "pairs.bin", 100)
    elif damage == "truncate":
        (entry / "pairs.idx").write_bytes(pristine["pairs.idx"][:-1])
    else:
        manifest = json.loads((entry / "manifest.json").read_text())
        del manifest["integrity"]
        text = json.dumps(manifest)
        (entry / "manifest.json").write_text(text if damage == "no_checksums" else text[:50])
    with caplog.at_level(logging.WARNING):
        again = load_preference_dataset(cfg)
    assert f"rebuilding this entry of the data cache {tmp_path / 'cache'}" in caplog.text
    assert again.directory == str(entry) and len(again) == 64
    assert {n: (entry / n).read_bytes() for n in FILES} == pristine


def test_resealed_out_of_range_id_is_kept_out_by_the_vocab_rule(pristine, tmp_path):
    """The rule the trainer applies before any model exists, so at every TP: the data's
    largest id must be < model.vocab_size (a padding row or another shard otherwise)."""
    pre = _copy(pristine, tmp_path)
    tokens = np.memmap(pre / "pairs.bin", dtype=np.uint16, mode="r+")
    tokens[3] = 700  # >= 640 (the model's vocab); a writer that sealed it anyway
    tokens.flush()
    del tokens
    manifest = json.loads((pre / "manifest.json").read_text())
    manifest["integrity"] = seal(str(pre), 700)
    (pre / "manifest.json").write_text(json.dumps(manifest))
    ds = PreferenceDataset(str(pre))
    assert ds.max_token_id == 700 and ds.vocab_size == 640
    for tp in (1, 2):
        config = load_config(str(ROOT / "examples/configs/quickstart.yaml"), [f"execution.tp={tp}"])
        with pytest.raises(ConfigError, match=rf"{pre} holds token id 700 but model.vocab_size"):
            check_vocab(config, ds.vocab_size, None, ds.max_token_id, ds.directory)
        check_vocab(config, ds.vocab_size, None, 639, ds.directory)  # the largest valid id
