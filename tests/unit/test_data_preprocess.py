"""tools/preprocess_data.py and load_preference_dataset: manifest, no-op re-runs, workers, cache."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import pickle
import re
from pathlib import Path

import numpy as np
import pytest

from megatron_adadpo import cli
from megatron_adadpo.data import DataConfig, PreferenceDataset, load_preference_dataset
from megatron_adadpo.data import pipeline as pipeline_module
from megatron_adadpo.data.indexed import PairWriter
from megatron_adadpo.platform.megatron import IndexedDataset

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "examples" / "data"
TOK = str(DATA / "tokenizer")
TRAIN, EVAL = str(DATA / "prefs_train.jsonl"), str(DATA / "prefs_eval.jsonl")


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location(
        "preprocess_data", ROOT / "tools" / "preprocess_data.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def files(directory):
    return {
        n: (Path(directory) / n).read_bytes() for n in ("pairs.bin", "pairs.idx", "pair_ids.npy")
    }


def test_cli_writes_manifest_and_rerun_is_a_noop(tmp_path, tool, capsys):
    out = tmp_path / "out"
    argv = [
        "--input",
        TRAIN,
        EVAL,
        "--tokenizer",
        TOK,
        "--output",
        str(out),
        "--max-length",
        "48",
        "--max-prompt-length",
        "24",
        "--chat-template",
        "always",
        "--quiet",
    ]
    assert tool.main(argv) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert (m["settings"]["chat_template"], m["settings"]["chat_template_tail"]) == (
        "always",
        "keep",
    )
    sha = lambda p: hashlib.sha256(Path(p).read_bytes()).hexdigest()  # noqa: E731
    assert [i["sha256"] for i in m["inputs"]] == [sha(TRAIN), sha(EVAL)]
    assert m["num_pairs"] == 464 == m["counts"]["pairs_written"] == m["counts"]["rows_read"]
    assert m["settings"]["max_length"] == 48 and m["settings"]["max_prompt_length"] == 24
    assert m["tokenizer"]["kind"] == "hf" and m["tokenizer"]["template"]["name"] == "chat_template"
    assert sum(m["length_histogram"]["counts"]) == 464
    assert (out / "data_report.json").exists()
    before = {n: os.stat(out / n).st_mtime_ns for n in os.listdir(out)}
    capsys.readouterr()
    assert tool.main(argv) == 0
    assert "up to date" in capsys.readouterr().out
    assert {n: os.stat(out / n).st_mtime_ns for n in os.listdir(out)} == before


def test_cli_output_rules(tmp_path, tool, capsys):
    """--output is rebuilt when its inputs' contents changed; another dataset is replaced only
    with --force; a user's files, an input directory and a dead run's partial are handled."""
    data = tmp_path / "data"
    data.mkdir()
    train = data / "train.jsonl"
    train.write_text(Path(TRAIN).read_text())
    out = tmp_path / "out"
    argv = ["--input", str(train), "--tokenizer", TOK, "--output", str(out), "--quiet"]
    stale = tmp_path / f"out.partial-{os.uname().nodename}-{_dead_pid()}-abc"
    stale.mkdir()
    live = tmp_path / f"out.partial-{os.uname().nodename}-{os.getpid()}-abc"
    live.mkdir()
    assert tool.main(argv) == 0
    assert not stale.exists() and live.exists()  # a dead writer's leftovers only
    train.write_text(Path(TRAIN).read_text().splitlines()[0] + "\n")  # same input, edited
    assert tool.main(argv) == 0
    assert json.loads((out / "manifest.json").read_text())["num_pairs"] == 1
    other = argv[:1] + [EVAL] + argv[2:]
    for args, message in [
        (other, "holds another preprocessed dataset (its names differ"),
        (argv[:5] + [str(data)] + argv[6:], "is (or contains) the input"),
        (argv[:1] + [str(data)] + argv[2:5] + [str(data)] + argv[6:], "is (or contains)"),
    ]:
        with pytest.raises(ValueError, match=re.escape(message)):
            tool.main(args)
    assert json.loads((out / "manifest.json").read_text())["num_pairs"] == 1
    assert tool.main(other + ["--force"]) == 0
    assert json.loads((out / "manifest.json").read_text())["num_pairs"] == 64
    user = tmp_path / "user"
    user.mkdir()
    (user / "manifest.json").write_text('{"mine": true}')
    with pytest.raises(ValueError, match="holds files that are not|not a preprocessed"):
        tool.main(argv[:5] + [str(user)] + argv[6:])
    assert (user / "manifest.json").read_text() == '{"mine": true}'


def _dead_pid() -> int:
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    return pid


def test_cli_fail_mode_exits_nonzero_with_report(tmp_path, tool):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n{"prompt": "p"}\n')
    argv = ["--input", str(bad), "--tokenizer", TOK, "--output", str(tmp_path / "o"), "--quiet"]
    assert tool.main(argv + ["--on-error", "fail"]) == 1
    report = json.loads((tmp_path / "o" / "data_report.json").read_text())
    assert [(i["index"], i["reason"]) for i in report["issues"]] == [(2, "missing_field")]
    assert not (tmp_path / "o" / "manifest.json").exists()
    assert tool.main(argv) == 0  # default --on-error skip


def test_cli_bad_setting_is_one_error_line_with_status_2(tmp_path, tool, capsys):
    argv = ["--input", TRAIN, "--tokenizer", str(tmp_path / "none"), "--output", str(tmp_path)]
    assert cli.run(tool.main, argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: data.tokenizer:") and "none" in err[0]


def test_pair_writer_layout(tmp_path):
    """Pair i = document i of three sequences [prompt, chosen, rejected], any chunking."""
    pairs = [([1, 5, 6], [7, 2], [8, 9, 2]), ([1, 4], [3], [639, 2]), ([1], [10, 11, 2], [12])]
    writer = PairWriter(str(tmp_path), vocab_size=640)
    for chunk, ids in ((pairs[:2], [4, 9]), ([], []), (pairs[2:], [11])):
        tokens = np.asarray([t for pair in chunk for seq in pair for t in seq], np.int64)
        writer.add_pairs(tokens, [len(seq) for pair in chunk for seq in pair], ids)
    writer.finalize()
    ds = IndexedDataset(str(tmp_path / "pairs"))
    assert ds.document_indices.tolist() == [0, 3, 6, 9] and writer.token_dtype == "uint16"
    assert [ds[k].tolist() for k in range(9)] == [list(seq) for pair in pairs for seq in pair]
    assert ds.sequence_lengths.tolist() == [len(seq) for pair in pairs for seq in pair]
    assert np.load(tmp_path / "pair_ids.npy").tolist() == [4, 9, 11]
    with pytest.raises(ValueError, match="3 lengths each"):
        writer.add_pairs(np.zeros(3, np.int64), [1, 2], [0])


def test_two_workers_write_identical_output(tmp_path):
    cfg = DataConfig(inputs=(TRAIN, EVAL), tokenizer=TOK, max_length=40, max_prompt_length=20)
    pipeline_module.preprocess(cfg, str(tmp_path / "w1"), progress=False)
    pipeline_module.preprocess(cfg.replace(num_workers=2), str(tmp_path / "w2"), progress=False)
    assert files(tmp_path / "w1") == files(tmp_path / "w2")


def test_preprocessed_dir_is_checked_against_the_config(tmp_path):
    cfg = DataConfig(
        inputs=(EVAL,),
        tokenizer=TOK,
        max_length=64,
        max_prompt_length=32,
        cache_dir=str(tmp_path / "cache"),
    )
    pipeline_module.preprocess(cfg, str(tmp_path / "pre"), progress=False)
    pre = load_preference_dataset(cfg.replace(preprocessed=str(tmp_path / "pre")))
    fly = load_preference_dataset(cfg)
    assert isinstance(pre, PreferenceDataset) and len(pre) == len(fly) == 64
    assert pre.identity == fly.identity == pre.manifest["identity"]
    copy = pickle.loads(pickle.dumps(pre))  # DataLoader worker processes pickle the dataset
    for i in (0, 17, 63):
        assert all(str(pre[i][k]) == str(fly[i][k]) == str(copy[i][k]) for k in pre[i])
    with pytest.raises(ValueError, match="max_length=64.*data.max_length=128"):
        load_preference_dataset(cfg.replace(preprocessed=str(tmp_path / "pre"), max_length=128))
    for key, value in (("chat_template", "always"), ("chat_template_tail", "strip")):
        with pytest.raises(ValueError, match=f"{key}='.*data.{key}='{value}'"):
            load_preference_dataset(cfg.replace(preprocessed=str(tmp_path / "pre"), **{key: value}))
        assert cfg.replace(**{key: value}).identity_settings() != cfg.identity_settings()
    with pytest.raises(ValueError, match="tokenizer"):
        load_preference_dataset(
            cfg.replace(
                preprocessed=str(tmp_path / "pre"), tokenizer=str(DATA / "spm" / "spm.model")
            )
        )


def test_on_the_fly_cache_is_reused(tmp_path, monkeypatch):
    cfg = DataConfig(
        inputs=(EVAL,), tokenizer=TOK, max_length=64, max_prompt_length=32, cache_dir=str(tmp_path)
    )
    first = load_preference_dataset(cfg)

    def refuse(*a, **k):
        raise AssertionError("preprocessed again")

    monkeypatch.setattr(pipeline_module, "preprocess", refuse)
    again = load_preference_dataset(cfg)
    assert again.directory == first.directory and len(again) == 64
    with pytest.raises(AssertionError):  # other settings -> another cache entry
        load_preference_dataset(cfg.replace(max_length=65))


def test_no_surviving_pair_names_the_rows_and_writes_the_report(tmp_path, tool):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p"}\n\n{"prompt": "p", "chosen": "a", "rejected": "a"}\n')
    argv = ["--input", str(bad), "--tokenizer", TOK, "--output", str(tmp_path / "o"), "--quiet"]
    with pytest.raises(ValueError, match="no preference pair survived") as err:
        tool.main(argv)
    assert f"{bad}:line 1: missing_field" in str(err.value)
    assert f"{bad}:line 3: chosen_equals_rejected" in str(err.value)
    report = json.loads((tmp_path / "o" / "data_report.json").read_text())
    assert [i["index"] for i in report["issues"]] == [1, 3]
    assert str(tmp_path / "o" / "data_report.json") in str(err.value)
    assert not (tmp_path / "o" / "manifest.json").exists()
