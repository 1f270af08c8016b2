"""The miniature's data: the bundled generator's tasks, with held-out prompts.

Every row comes from a task of ``examples/data/make_prefs.py`` (arithmetic, capitals of made-up
countries, repeating a word, sorting letters, parity): ``chosen`` is the correct answer, so a
greedy answer can be scored by exact match. A prompt is held out when its sha256 falls in one
eighth of the hash space: no held-out prompt text ever appears in the SFT or preference data
(a capital is still seen through the country's other phrasing). Three files:

- ``sft.jsonl``: pairs whose chosen answers the SFT warm start imitates;
- ``prefs.jsonl``: other pairs over the same training prompts, for DPO / AdaDPO / SimPO;
- ``heldout.jsonl``: one pair per held-out prompt (reward accuracy, log-prob changes, and the
  prompts of the greedy exact-match evaluation).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import random
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HELD_OUT_BUCKETS = 8  # 1 / 8 of the prompt space is held out


def _tasks() -> list:
    path = REPO / "examples/data/make_prefs.py"
    spec = importlib.util.spec_from_file_location("make_prefs", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.TASKS


def held_out(prompt: str) -> bool:
    digest = hashlib.sha256(prompt.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % HELD_OUT_BUCKETS == 0


def make_rows(seed: int, sft: int, prefs: int, heldout: int) -> dict[str, list[dict]]:
    """``{"sft": [...], "prefs": [...], "heldout": [...]}`` rows with a ``task`` field.

    Held-out prompts are distinct, at most ``heldout / 5`` per task (capitals and repeats have
    few distinct prompts, so they contribute fewer).
    """
    rng = random.Random(seed)
    tasks = _tasks()
    out: dict[str, list[dict]] = {"sft": [], "prefs": [], "heldout": []}
    seen_heldout: set[str] = set()
    per_task = heldout // len(tasks)  # capitals and repeats have fewer distinct prompts
    counts = dict.fromkeys((t.__name__ for t in tasks), 0)
    for _ in range(50 * (sft + prefs + heldout)):
        if len(out["sft"]) == sft and len(out["prefs"]) == prefs:
            break
        task = rng.choice(tasks)
        prompt, chosen, rejected = task(rng)
        row = {"prompt": prompt, "chosen": chosen, "rejected": rejected, "task": task.__name__}
        if held_out(prompt):
            if prompt not in seen_heldout and counts[task.__name__] < per_task:
                seen_heldout.add(prompt)
                counts[task.__name__] += 1
                out["heldout"].append(row)
        elif len(out["sft"]) < sft:
            out["sft"].append(row)
        elif len(out["prefs"]) < prefs:
            out["prefs"].append(row)
    return out


def write_data(directory: Path, seed: int, sft: int, prefs: int, heldout: int) -> dict[str, Path]:
    """Write the three files (deterministic for a seed); returns their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, rows in make_rows(seed, sft, prefs, heldout).items():
        paths[name] = directory / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return paths
