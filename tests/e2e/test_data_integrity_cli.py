"""Bad bytes and the wrong tokenizer, as a user meets them: ``tools/preprocess_data.py`` writes
the dataset, it is damaged as a disk or a partial copy damages it, and ``python -m
megatron_adadpo.train`` refuses it before any step (one ``error:`` line naming the file and the
fix, exit 2), or rebuilds a damaged cache entry with a warning and trains."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megatron_adadpo.data.integrity import seal

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "examples" / "data"
QUICKSTART = "examples/configs/quickstart.yaml"
TINY = ["train.train_iters=1", "train.global_batch_size=4", "eval.interval=0"]
TINY += ["checkpoint.save_at_end=false", "execution.tp=1"]


def _run(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )


def _preprocess(out: Path, *extra: str) -> subprocess.CompletedProcess:
    args = ["tools/preprocess_data.py", "--input", str(DATA / "prefs_train.jsonl"), "--tokenizer"]
    args += [str(DATA / "tokenizer"), "--output", str(out), "--max-length", "128"]
    return _run(
        args + ["--max-prompt-length", "64", "--chat-template", "always", "--quiet", *extra]
    )


def _train(run_dir: Path, *sets: str, ranks: int = 1) -> subprocess.CompletedProcess:
    """``python -m megatron_adadpo.train`` (TP1), or under torchrun with ``ranks`` ranks."""
    launch = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]
    args = (launch if ranks > 1 else []) + ["-m", "megatron_adadpo.train", "--config", QUICKSTART]
    for item in [f"logging.run_dir={run_dir}", *TINY, *sets]:
        args += ["--set", item]
    return _run(args)


def _errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "error: " in line]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "prefs"
    result = _preprocess(out)
    assert result.returncode == 0, result.stderr
    return out


def _in_range_flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2 & ~1] ^= 1  # the low bit of a uint16 token id: still < 640
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize(
    "name, damage, problem",
    [
        (
            "pairs.bin",
            _in_range_flip,
            "is damaged: its xxh3_128 checksum differs from the manifest's",
        ),
        ("pairs.bin", _truncate, "is truncated: 13497 bytes of 26994"),
        ("pairs.idx", _truncate, "is truncated: 8821 bytes of 17642"),
    ],
)
def test_damaged_dataset_is_refused_before_any_step(pristine, tmp_path, name, damage, problem):
    data = Path(shutil.copytree(pristine, tmp_path / "prefs"))
    damage(data / name)
    out = _train(tmp_path / "run", f"data.preprocessed={data}")
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    fix = f"re-run tools/preprocess_data.py --force --output {data} with the inputs"
    assert _errors(out.stderr) == [_errors(out.stderr)[0]]
    assert _errors(out.stderr)[0].startswith(f"error: {data / name} {problem}; {fix}")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # no step was taken
    if name == "pairs.bin" and damage is _in_range_flip:  # the fix the message gives works
        assert _preprocess(data, "--force").returncode == 0
        assert (data / name).read_bytes() == (pristine / name).read_bytes()


@pytest.mark.parametrize("tp", [1, 2])
def test_out_of_range_token_id_is_refused(pristine, tmp_path, tp):
    """Ids that pass their checksum (a writer sealed them) but reach past the model's
    vocabulary: were a bare IndexError at TP 1 and silently wrong training at TP 2."""
    data = Path(shutil.copytree(pristine, tmp_path / "prefs"))
    tokens = np.memmap(data / "pairs.bin", dtype=np.uint16, mode="r+")
    tokens[5] = 700
    tokens.flush()
    del tokens
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["integrity"] = seal(str(data), 700)
    (data / "manifest.json").write_text(json.dumps(manifest))
    out = _train(tmp_path / "run", f"data.preprocessed={data}", f"execution.tp={tp}", ranks=tp)
    assert out.returncode == (2 if tp == 1 else 1), out.stderr  # torchrun: a rank failed
    assert "megatron_adadpo/" not in out.stderr, out.stderr
    assert _errors(out.stderr) == [  # once, from rank 0; no traceback through the package
        f"error: {data} holds token id 700 but model.vocab_size=640: ids >= 640 have no embedding"
        " row; re-run tools/preprocess_data.py --force with this model's tokenizer (or train the"
        " model its data was made for)"
    ]


def test_damaged_cache_entry_is_rebuilt_and_training_runs(pristine, tmp_path):
    cache = tmp_path / "cache"
    first = _train(tmp_path / "run1", f"data.cache_dir={cache}")
    assert first.returncode == 0, first.stderr
    (entry,) = cache.iterdir()
    assert (entry / "pairs.bin").read_bytes() == (pristine / "pairs.bin").read_bytes()
    _truncate(entry / "pairs.bin")
    out = _train(tmp_path / "run2", f"data.cache_dir={cache}")
    assert out.returncode == 0, out.stderr
    assert (
        f"{entry / 'pairs.bin'} is truncated: 13497 bytes of 26994: rebuilding this entry of the "
        f"data cache {cache} (data.cache_dir)"
    ) in out.stderr
    assert (entry / "pairs.bin").read_bytes() == (pristine / "pairs.bin").read_bytes()
    assert "step 1/1" in out.stdout


def test_sentencepiece_model_against_an_hf_checkpoint_is_refused(tmp_path):
    spm = DATA / "spm" / "spm.model"
    ckpt = "examples/checkpoints/sft_tiny"
    out = _train(tmp_path / "run", f"train.init_checkpoint={ckpt}", f"data.tokenizer={spm}")
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    (line,) = _errors(out.stderr)
    assert line.startswith(
        f"error: data.tokenizer={spm} is not the tokenizer of train.init_checkpoint "
        f"{ckpt}/tokenizer (holds chat_template.jinja, tokenizer.json, tokenizer_config.json; "
        "tokenizer.model differs or is missing)"
    )


def test_preprocess_with_a_sentencepiece_directory(tmp_path):
    """A directory holding a sentencepiece model under any name is read by sentencepiece (it
    was transformers' "need sentencepiece installed"); two models are one clear error."""
    spdir = tmp_path / "llama-tokenizer"
    spdir.mkdir()
    shutil.copy(DATA / "spm" / "spm.model", spdir / "spm.model")
    (spdir / "params.json").write_text("{}")

    def preprocess(tokenizer: Path, out: str) -> subprocess.CompletedProcess:
        args = ["tools/preprocess_data.py", "--input", str(DATA / "prefs_eval.jsonl")]
        args += ["--tokenizer", str(tokenizer), "--output", str(tmp_path / out), "--quiet"]
        return _run(args)

    from_dir, from_file = preprocess(spdir, "a"), preprocess(DATA / "spm" / "spm.model", "b")
    assert from_dir.returncode == 0 == from_file.returncode, from_dir.stderr
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["tokenizer"]["kind"] == "sentencepiece"
    assert (tmp_path / "a" / "pairs.bin").read_bytes() == (
        tmp_path / "b" / "pairs.bin"
    ).read_bytes()
    shutil.copy(DATA / "spm" / "spm.model", spdir / "other.model")
    two = preprocess(spdir, "c")
    assert two.returncode == 2 and _errors(two.stderr) == [
        f"error: data.tokenizer={spdir} is a directory with no HF tokenizer files "
        "(tokenizer.json / tokenizer_config.json) and 2 sentencepiece .model files (other.model, "
        "spm.model): set data.tokenizer to the sentencepiece .model file itself, or to an HF "
        "tokenizer directory"
    ]
