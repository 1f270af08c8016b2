"""Weights & Biases logging (offline) from the real trainer, and its config checks."""

from __future__ import annotations

import importlib.util
import json
import struct

import pytest

from megatron_adadpo.config import ConfigError, load_config
from tests.distributed.train_harness import REPO, overrides, read_metrics, run_trainer
from tests.launcher import run_ranks

CONFIG = str(REPO / "examples/configs/quickstart.yaml")
needs_wandb = pytest.mark.skipif(
    importlib.util.find_spec("wandb") is None, reason="wandb is in the test extra"
)


def read_wandb_history(path) -> list[dict]:
    """The ``history`` records of an offline run file (``run-<id>.wandb``): a 7-byte W&B header,
    then LevelDB log blocks of 32 KiB (records with a 7-byte header: crc32, length, type; type
    1 full, 2 first, 3 middle, 4 last) holding ``wandb_internal_pb2.Record`` protobufs."""
    from wandb.proto import wandb_internal_pb2

    data, pos, payload, rows = path.read_bytes(), 7, b"", []
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # block trailer padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:
            break
        payload += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(payload)
            payload = b""
            if record.WhichOneof("record_type") == "history":
                items = record.history.item
                rows.append(
                    {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in items}
                )
    return rows


@needs_wandb
@pytest.mark.distributed
def test_wandb_offline_run_from_the_last_stage_only(tmp_path, monkeypatch):
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb_home"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = tmp_path / "run"
    extra = [
        "execution.pp=2",  # the logging rank is rank 1; rank 0 must start no W&B run
        "train.train_iters=3",
        "eval.interval=2",
        "logging.wandb_project=adadpo-tests",
        "logging.wandb_mode=offline",
    ]
    argv = ["--config", CONFIG]
    for item in overrides(run_dir, tmp_path / "cache", extra):
        argv += ["--set", item]
    run_ranks(run_trainer, 2, argv, timeout=240)
    (run_file,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")  # exactly one run
    assert run_file.name == f"run-{(run_dir / 'wandb_run_id').read_text()}.wandb"
    history = read_wandb_history(run_file)
    expected = read_metrics(run_dir)
    assert [r["split"] for r in expected] == ["train", "train", "eval", "train"]
    assert len(history) == 3  # steps 1, 2 (train + eval), 3
    logged = {}
    for row in history:
        logged.setdefault(row["_step"], {}).update(row)
    for record in expected:
        got = logged[record["step"]]
        keys = ("loss", "rewards/margins", "logps/chosen", "logits/chosen", "grad_norm")
        for key in (*keys, "entropy", "mean_token_accuracy"):  # TRL's keys, train and eval
            assert key in record or key == "grad_norm", (record["split"], key)
            if key in record:
                assert got[f"{record['split']}/{key}"] == pytest.approx(record[key], rel=1e-12)


def test_wandb_config_checks(monkeypatch):
    with pytest.raises(ConfigError, match=r"logging.wandb_mode='cloud'.*offline"):
        load_config(CONFIG, ["logging.wandb_mode=cloud"])
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "wandb" else real_find_spec(n, *a)
    )
    with pytest.raises(ConfigError, match=r"logging.wandb_project='p' needs the wandb package"):
        load_config(CONFIG, ["logging.wandb_project=p"])
    assert load_config(CONFIG, []).logging.wandb_project is None  # not asked: no check
