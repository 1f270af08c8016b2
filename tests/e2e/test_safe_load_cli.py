"""Loading never executes, through the real command lines: a code-running payload planted in a
checkpoint is refused with one error naming the file, the command exits non-zero, and the
payload never runs (its marker file is never created).

- the issue's attack: ``rng/rank_0.pt`` of a run trained with ``torchrun -m
  megatron_adadpo.train``, resumed with the documented command (a longer ``train_iters`` and
  ``checkpoint.override_scheduler=true``);
- ``tools/generate.py`` on the bundled checkpoint with one ``_extra_state`` bytes item replaced;
- ``tools/convert_megatron_to_hf.py`` on the bundled checkpoint with a ``.metadata`` payload.
"""

import shutil
import subprocess
import sys

import pytest

from tests import payloads
from tests.e2e.test_train_torchrun import REPO, _env, _launch

pytestmark = pytest.mark.e2e

BUNDLED = REPO / "examples" / "checkpoints" / "sft_tiny"


def test_torchrun_resume_refuses_code_in_rng_state(tmp_path):
    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    first = _launch(run_dir, cache, "train.train_iters=2", "checkpoint.save_at_end=true")
    assert first.returncode == 0, first.stderr[-3000:]
    marker = tmp_path / "payload_ran"
    rng = run_dir / "checkpoints" / "iter_0000002" / "rng" / "rank_0.pt"
    rng.write_bytes(payloads.torch_file(marker))
    again = _launch(run_dir, cache, "train.train_iters=4", "checkpoint.override_scheduler=true")
    assert again.returncode != 0
    assert f"{rng} would run code when loaded" in again.stderr, again.stderr[-3000:]
    assert not marker.exists(), "the payload ran"
    assert not (run_dir / "checkpoints" / "iter_0000004").exists()


def _tool(*args, cwd):
    cmd = [sys.executable, str(REPO / "tools" / args[0]), *map(str, args[1:])]
    return subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=300)


def test_generate_refuses_code_in_a_bytes_item(tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(BUNDLED, ckpt)
    marker = tmp_path / "payload_ran"
    key = payloads.plant_bytes_item(ckpt, "_extra_state", marker)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Is 62 even or odd?"}\n')
    out = _tool("generate.py", "--checkpoint", ckpt, "--prompts", prompts, "--output",
                tmp_path / "out.jsonl", "--max-new-tokens", 4, cwd=tmp_path)  # fmt: skip
    assert out.returncode == 2, out.stderr[-3000:]
    assert f"bytes item '{key}'" in out.stderr and "would run code" in out.stderr, out.stderr
    assert str(ckpt) in out.stderr
    assert not marker.exists(), "the payload ran"


def test_export_refuses_code_in_metadata(tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(BUNDLED, ckpt)
    marker = tmp_path / "payload_ran"
    (ckpt / ".metadata").write_bytes(payloads.pickled(marker))
    out = _tool("convert_megatron_to_hf.py", "--checkpoint", ckpt, "--output", tmp_path / "hf",
                cwd=tmp_path)  # fmt: skip
    assert out.returncode == 2, out.stderr[-3000:]
    assert f"{ckpt / '.metadata'} would run code when loaded" in out.stderr, out.stderr
    assert not marker.exists(), "the payload ran"
