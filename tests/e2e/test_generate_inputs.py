"""tools/generate.py's inputs as a user gives them: JSON lines are split at newlines only, an
empty prompt is refused naming file:line, and an --output that is the prompts file (by any
path) is refused before anything is written."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cli import one_error_line

REPO = Path(__file__).resolve().parents[2]
CHECKPOINT = REPO / "examples" / "checkpoints" / "sft_tiny"
pytestmark = pytest.mark.e2e


def _generate(prompts, output, cwd) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO / "tools" / "generate.py"), "--checkpoint", str(CHECKPOINT),
           "--prompts", str(prompts), "--output", str(output), "--max-new-tokens", "2"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_jsonl_with_line_separator_characters_is_read_as_json(tmp_path):
    """U+2028 / U+2029 / U+0085 are valid inside JSON strings (json.dumps with
    ensure_ascii=False writes them raw); ``str.splitlines`` broke the row there."""
    rows = [{"prompt": "Is 62 even\u2028or odd?"}, {"prompt": "Repeat\u2029the word\x85'x'."}]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
    out = _generate(prompts, tmp_path / "answers.jsonl", tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = (tmp_path / "answers.jsonl").read_text("utf-8").split("\n")
    records = [json.loads(line) for line in lines if line]
    assert [r["prompt"] for r in records] == [r["prompt"] for r in rows]


def test_empty_prompt_is_refused_naming_the_line(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Is 4 even?"}\n\n{"prompt": "  "}\n')
    assert one_error_line(_generate(prompts, tmp_path / "a.jsonl", tmp_path)) == (
        f"error: {prompts}:3: the prompt is empty; give every row a non-empty prompt"
    )
    prompts.write_text('{"instruction": ""}\n')
    assert f"{prompts}:1: the instruction is empty" in one_error_line(
        _generate(prompts, tmp_path / "a.jsonl", tmp_path)
    )
    assert not (tmp_path / "a.jsonl").exists()


def test_output_that_is_the_prompts_file_is_refused(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    content = '{"prompt": "Is 4 even?"}\n'
    prompts.write_text(content)
    (tmp_path / "sub").mkdir()
    (tmp_path / "link.jsonl").symlink_to(prompts)
    os.link(prompts, tmp_path / "hard.jsonl")
    for output, cwd in [
        ("../prompts.jsonl", tmp_path / "sub"),  # relative
        (tmp_path / "link.jsonl", tmp_path),  # a symlink to it
        (tmp_path / "hard.jsonl", tmp_path),  # a hard link to it
    ]:
        error = one_error_line(_generate(prompts, output, cwd))
        assert f"--output {output} is the --prompts file" in error
        assert "choose another --output" in error
    assert prompts.read_text() == content


def test_arena_hard_answers_of_the_bundled_checkpoint(tmp_path):
    """Arena-Hard questions in, its answer file out (``--format arena-hard``): the bundled SFT
    checkpoint's greedy answers (``test_generate.py`` pins them) under ``choices``, keyed by
    ``question_id``, with the generated token count; a .json output is refused before the model
    loads."""
    questions = {"q1": "Is 62 even or odd?", "q2": "Repeat the word 'willow' two times."}
    prompts = tmp_path / "question.jsonl"
    rows = [{"question_id": k, "turns": [{"content": v}]} for k, v in questions.items()]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    output = tmp_path / "model_answer" / "sft_tiny.jsonl"
    cmd = [sys.executable, str(REPO / "tools" / "generate.py"), "--checkpoint", str(CHECKPOINT),
           "--prompts", str(prompts), "--output", str(output), "--max-new-tokens", "24",
           "--format", "arena-hard"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    answers = [json.loads(x) for x in output.read_text().splitlines()]
    assert [a["question_id"] for a in answers] == list(questions)
    turns = [a["choices"][0]["turns"][0] for a in answers]
    assert [t["content"] for t in turns] == ["62 is even.", "willow willow"]
    assert all(a["model_id"] == "sft_tiny" and a["choices"][0]["index"] == 0 for a in answers)
    assert all(3 <= t["token_len"] <= 24 for t in turns)
    refused = subprocess.run([*cmd[:7], str(tmp_path / "a.json"), *cmd[8:]], env=env,
                             capture_output=True, text=True, timeout=300)  # fmt: skip
    assert "--format arena-hard writes JSON lines" in one_error_line(refused)
