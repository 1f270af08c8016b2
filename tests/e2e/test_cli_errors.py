"""Every entry point shares one shell: a config or input error is one ``error:`` line from one
rank and a non-zero exit, never a traceback per rank (also under torchrun)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CONFIG = "examples/configs/quickstart.yaml"
pytestmark = pytest.mark.e2e


def _run(args, timeout=180):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "error: " in line]


@pytest.mark.parametrize(
    "args",
    [
        ["-m", "megatron_adadpo.train", "--config", CONFIG, "--set", "execution.tp=3"],
        ["tools/precompute_reference.py", "--config", CONFIG, "--output", "x",
         "--set", "loss.beta=-1"],
        ["tools/plan.py", "--recipe", CONFIG, "--set", "execution.tp=3"],
        ["tools/generate.py", "--checkpoint", "examples/checkpoints/sft_tiny",
         "--prompts", "missing.jsonl", "--output", "x.jsonl"],
    ],
)  # fmt: skip
def test_config_error_is_one_line(args):
    out = _run(args)
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr, out.stderr
    assert len(_error_lines(out.stderr)) == 1, out.stderr


@pytest.mark.parametrize(
    "sets, message",
    [
        (["execution.tp=3"], "execution.tp=3 must divide"),
        (
            ["train.train_iters=abc"],
            "train.train_iters='abc' must be an integer",
        ),  # was a traceback
        (["model.rope_scaling={factr: 8}"], "model.rope_scaling: unknown keys ['factr']"),
        (["optimizer.lr=inf"], "error: optimizer.lr=inf must be a finite number"),  # trained
        (["optimizer.lr=nan"], "error: optimizer.lr=nan must be a finite number"),  # min_lr
    ],
)
def test_config_error_under_torchrun_is_printed_once(sets, message):
    args = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    args += ["-m", "megatron_adadpo.train", "--config", CONFIG]
    out = _run(args + [x for s in sets for x in ("--set", s)])
    assert out.returncode != 0
    lines = _error_lines(out.stderr)
    assert len(lines) == 1 and message in lines[0], out.stderr
    assert "megatron_adadpo/" not in out.stderr  # no traceback through the package


def test_yaml_syntax_error_names_the_file(tmp_path):
    bad = tmp_path / "run.yaml"
    bad.write_text("model:\n  num_layers: 2\n   hidden_size: 3\n")
    out = _run(["-m", "megatron_adadpo.train", "--config", str(bad)])
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert _error_lines(out.stderr) == [
        f"error: {bad}: YAML syntax error at line 3, column 15: mapping values are not allowed here"
    ]


def test_binary_config_names_the_file(tmp_path):
    """A checkpoint shard or a Latin-1 file given as --config: one line naming the file (was
    UnicodeDecodeError's message alone); text YAML with control characters likewise."""
    shard = REPO / "examples" / "checkpoints" / "sft_tiny" / "__0_0.distcp"
    latin = tmp_path / "latin1.yaml"
    latin.write_bytes("train:\n  seed: 3  # r\u00e9glage\n".encode("latin-1"))
    control = tmp_path / "control.yaml"
    control.write_bytes(b"train:\n  seed: \x00\x01\n")
    first_bad = shard.read_bytes().index(next(b for b in shard.read_bytes() if b >= 0x80))
    expected = {
        shard: f"not a UTF-8 YAML file (byte {first_bad}, line 1: invalid start byte)",
        latin: f"not a UTF-8 YAML file (byte {latin.read_bytes().index(0xE9)}, line 2: invalid",
        control: "YAML syntax error: unacceptable character #x0000",
    }
    for path, message in expected.items():
        out = _run(["-m", "megatron_adadpo.train", "--config", str(path)])
        assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
        (line,) = _error_lines(out.stderr)
        assert line.startswith(f"error: {path}: {message}"), line


@pytest.mark.parametrize("length", ["train.train_iters=null", "train.train_iters=3"])
def test_dataset_smaller_than_one_global_batch_is_refused_before_any_step(tmp_path, length):
    """2 pairs and a global batch of 16: one line naming both numbers and the fix, under
    torchrun, whether the run's length comes from epochs (0 planned steps; was an
    AttributeError in ``_report_finished``) or from ``train.train_iters``."""
    data = tmp_path / "two.jsonl"
    rows = (REPO / "examples/data/prefs_train.jsonl").read_text().splitlines()[:2]
    data.write_text("\n".join(rows) + "\n")
    args = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    args += ["-m", "megatron_adadpo.train", "--config", CONFIG]
    sets = [f"data.inputs=[{data}]", "train.global_batch_size=16", length, "eval.interval=0"]
    sets += [f"logging.run_dir={tmp_path / 'run'}", f"data.cache_dir={tmp_path / 'cache'}"]
    out = _run(args + [x for s in sets for x in ("--set", s)])
    assert out.returncode != 0
    assert _error_lines(out.stderr) == [
        "error: 2 pairs do not fill one global batch of 16 (train.global_batch_size): lower "
        "train.global_batch_size or add data"
    ], out.stderr[-3000:]
    assert "megatron_adadpo/" not in out.stderr  # no traceback through the package
    assert not (tmp_path / "run" / "checkpoints" / "latest").exists()
