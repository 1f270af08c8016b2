"""The bundled data and tokenizers are exactly what their committed scripts generate."""

from __future__ import annotations

import importlib.util
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "examples" / "data"


def run_script(name: str, out: Path) -> None:
    spec = importlib.util.spec_from_file_location(name, DATA / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(out)


def test_bundled_files_are_reproducible(tmp_path):
    run_script("make_prefs", tmp_path)
    run_script("make_tokenizer", tmp_path)
    for rel in ("prefs_train.jsonl", "prefs_eval.jsonl", "spm/spm.model",
                "tokenizer/tokenizer.json", "tokenizer/chat_template.jinja"):  # fmt: skip
        assert (tmp_path / rel).read_bytes() == (DATA / rel).read_bytes(), rel
    total = sum(p.stat().st_size for p in DATA.rglob("*") if p.is_file())
    assert total < 1_000_000
    lines = (DATA / "prefs_train.jsonl").read_text().splitlines()
    assert len(lines) == 400 and len((DATA / "prefs_eval.jsonl").read_text().splitlines()) == 64
