"""Loading never executes (``platform/safe_pickle.py``): the precomputed reference, the
preprocessed data / cache, HF weights and DCP metadata holding a code-running payload are
refused naming the file, and the payload never runs; genuine files still load. Checkpoints
through the trainer: ``tests/distributed/test_safe_checkpoint_load.py``."""

from __future__ import annotations

import io
import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest

from megatron_adadpo.convert.hf_io import HFCheckpointError, SafetensorsReader
from megatron_adadpo.data import DataConfig, load_preference_dataset
from megatron_adadpo.data.integrity import seal
from megatron_adadpo.platform.safe_pickle import MetadataUnpickler, UnsafeFileError, torch_load
from megatron_adadpo.run.reference import VALUES_FILE, PrecomputedReference, write_precomputed
from tests import payloads

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "examples" / "data"
BUNDLED = ROOT / "examples" / "checkpoints" / "sft_tiny"


def _assert_refused(call, error, match: str, marker: Path) -> None:
    with pytest.raises(error, match=match):
        call()
    assert not marker.exists(), "the payload ran"


def _object_npy(path: Path, marker: Path) -> None:
    np.save(path, np.array([payloads.Payload(marker)], dtype=object), allow_pickle=True)


def test_precomputed_reference_payload_is_refused(tmp_path):
    marker = tmp_path / "payload_ran"
    values = np.arange(8, dtype=np.float32).reshape(4, 2)
    write_precomputed(tmp_path / "ref", values, "identity", {})
    assert np.array_equal(PrecomputedReference(tmp_path / "ref", "identity").values, values)
    _object_npy(tmp_path / "ref" / VALUES_FILE, marker)
    _assert_refused(
        lambda: PrecomputedReference(tmp_path / "ref", "identity"),
        UnsafeFileError,
        f"{tmp_path / 'ref' / VALUES_FILE} would run code",
        marker,
    )


@pytest.mark.parametrize("where", ["preprocessed", "cache"])
def test_preprocessed_data_and_cache_payloads_are_refused(where, tmp_path):
    marker = tmp_path / "payload_ran"
    cfg = DataConfig(
        inputs=(str(DATA / "prefs_eval.jsonl"),),
        tokenizer=str(DATA / "tokenizer"),
        max_length=64,
        max_prompt_length=32,
        cache_dir=str(tmp_path / "cache"),
    )
    directory = load_preference_dataset(cfg).directory  # the on-the-fly cache entry
    if where == "preprocessed":
        shutil.copytree(directory, tmp_path / "pre")
        cfg, directory = cfg.replace(preprocessed=str(tmp_path / "pre")), str(tmp_path / "pre")
    assert len(load_preference_dataset(cfg)) == 64
    _object_npy(Path(directory) / "pair_ids.npy", marker)
    _reseal(Path(directory))  # a forger rewrites the checksums too: the reader must still hold
    match = f"{directory}/pair_ids.npy would run code"
    _assert_refused(lambda: load_preference_dataset(cfg), UnsafeFileError, match, marker)


def _reseal(directory: Path) -> None:
    """Record the planted file's size and checksum in the manifest, as a forger would (the
    checksums catch accidental damage only: ``data/integrity.py``)."""
    manifest = json.loads((directory / "manifest.json").read_text())
    record = manifest["integrity"]
    record.update(seal(str(directory), record["max_token_id"]))
    (directory / "manifest.json").write_text(json.dumps(manifest))


def test_hf_pickle_weights_are_never_unpickled(tmp_path):
    marker = tmp_path / "payload_ran"
    (tmp_path / "pytorch_model.bin").write_bytes(payloads.torch_file(marker))
    match = r"pytorch_model.bin.*safe_serialization=True"
    _assert_refused(lambda: SafetensorsReader(tmp_path), HFCheckpointError, match, marker)


def test_torch_files_load_tensors_and_refuse_code(tmp_path):
    marker = tmp_path / "payload_ran"
    (tmp_path / "rank_0.pt").write_bytes(payloads.torch_file(marker))
    match = rf"{tmp_path}/rank_0.pt would run code .*system"
    _assert_refused(lambda: torch_load(tmp_path / "rank_0.pt"), UnsafeFileError, match, marker)
    assert torch_load(BUNDLED / "common.pt") == {}


def _unpickle(data: bytes, name: str = "f"):
    return MetadataUnpickler(io.BytesIO(data), name).load()


def test_metadata_unpickler_admits_dcp_metadata_only(tmp_path):
    raw = (BUNDLED / ".metadata").read_bytes()
    genuine = pickle.loads(raw)  # the bundled file: what torch's own reader returns
    mine = _unpickle(raw)
    assert mine.state_dict_metadata == genuine.state_dict_metadata
    assert mine.storage_data == genuine.storage_data
    marker = tmp_path / "payload_ran"
    payload = payloads.pickled(marker)
    match = r"x/.metadata would run code .*names posix.system"
    _assert_refused(lambda: _unpickle(payload, "x/.metadata"), UnsafeFileError, match, marker)
    refused = [
        ("torch.distributed.checkpoint.filesystem", "FileSystemReader"),  # not a dataclass
        ("torch.distributed.checkpoint.metadata", "Metadata.__init__"),  # dotted: attributes
        ("builtins", "getattr"),
        ("torch", "load"),
    ]
    for module, name in refused:
        with pytest.raises(UnsafeFileError, match=f"names {module}.{name}"):
            _unpickle(f"c{module}\n{name}\n.".encode())
