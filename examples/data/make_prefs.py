"""Generate the bundled preference data (schema (a): prompt + chosen + rejected).

All content is synthetic and written here: arithmetic, facts about made-up countries, repeating a
word, sorting letters and parity. `chosen` is the correct short answer, `rejected` is wrong or
sloppy, so a tiny model learns the preference in a few dozen steps. About a third of the prompts
are chat-message lists (some with a system turn) and some completions use the UltraFeedback shape
(`chosen` = [user turn, assistant turn]); the rest are plain strings.

Usage: python examples/data/make_prefs.py  (deterministic: seed fixed; rewrites the two files)
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
SEED = 1234

# fmt: off
COUNTRIES = {
    "Velmora": "Tarsk", "Quenlia": "Odrin", "Brastavia": "Mellow Point", "Zorath": "Kiva",
    "Ulmeria": "Paxton", "Dravik": "Sunhollow", "Feyland": "Ostra", "Norvane": "Caldris",
    "Tirelle": "Hamsworth", "Okavo": "Lunet", "Prazia": "Vendal", "Skelmar": "Rookfield",
    "Amberlin": "Tosca", "Gorvia": "Ninehill", "Halcyra": "Brenn", "Ixtavo": "Palema",
}
WORDS = [
    "lantern", "river", "copper", "meadow", "falcon", "pebble", "orchid", "thunder", "maple",
    "harbor", "velvet", "cinder", "glacier", "tunnel", "saffron", "willow",
]
# fmt: on
NUMBER_WORDS = {2: "two", 3: "three", 4: "four"}
SYSTEMS = ["You are a helpful assistant.", "Answer briefly and correctly."]


def arithmetic(rng: random.Random) -> tuple[str, str, str]:
    a, b = rng.randint(2, 49), rng.randint(2, 49)
    op = rng.choice(["+", "-", "*"])
    value = {"+": a + b, "-": a - b, "*": a * b}[op]
    wrong = value + rng.choice([-3, -2, -1, 1, 2, 10])
    prompt = rng.choice([f"What is {a} {op} {b}?", f"Compute {a} {op} {b}.", f"{a} {op} {b} = ?"])
    chosen = f"{a} {op} {b} = {value}."
    rejected = rng.choice([f"{a} {op} {b} = {wrong}.", f"I think it is about {wrong}."])
    return prompt, chosen, rejected


def capital(rng: random.Random) -> tuple[str, str, str]:
    country = rng.choice(sorted(COUNTRIES))
    other = rng.choice([c for c in sorted(COUNTRIES) if c != country])
    prompt = rng.choice(
        [f"What is the capital of {country}?", f"Name the capital city of {country}."]
    )
    chosen = f"The capital of {country} is {COUNTRIES[country]}."
    rejected = rng.choice(
        [f"The capital of {country} is {COUNTRIES[other]}.", f"{country} has no capital."]
    )
    return prompt, chosen, rejected


def repeat(rng: random.Random) -> tuple[str, str, str]:
    word, n = rng.choice(WORDS), rng.choice([2, 3, 4])
    prompt = f"Repeat the word '{word}' {NUMBER_WORDS[n]} times."
    chosen = " ".join([word] * n)
    wrong_n = rng.choice([k for k in (1, 2, 3, 4, 5) if k != n])
    other = rng.choice([w for w in WORDS if w != word])
    rejected = rng.choice([" ".join([word] * wrong_n), " ".join([other] * n), "No."])
    return prompt, chosen, rejected


def sort_letters(rng: random.Random) -> tuple[str, str, str]:
    letters = rng.sample("abcdefghijklmnopqrstuvwxyz", rng.randint(3, 6))
    word = "".join(letters)
    prompt = f"Sort the letters of '{word}' alphabetically."
    good = sorted(letters)
    bad = rng.choice([letters, sorted(letters, reverse=True), good[1:] + good[:1]])
    if bad == good:
        bad = good[::-1]
    return prompt, f"In order: {' '.join(good)}.", f"In order: {' '.join(bad)}."


def parity(rng: random.Random) -> tuple[str, str, str]:
    n = rng.randint(1, 999)
    right, wrong = ("even", "odd") if n % 2 == 0 else ("odd", "even")
    prompt = f"Is {n} even or odd?"
    return prompt, f"{n} is {right}.", rng.choice([f"{n} is {wrong}.", "It depends."])


TASKS = [arithmetic, capital, repeat, sort_letters, parity]


def make_row(rng: random.Random) -> dict:
    prompt, chosen, rejected = rng.choice(TASKS)(rng)
    shape = rng.random()
    if shape < 0.6:  # plain strings
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    messages = [{"role": "user", "content": prompt}]
    if rng.random() < 0.4:
        messages.insert(0, {"role": "system", "content": rng.choice(SYSTEMS)})
    if shape < 0.85:  # chat prompt, assistant-message completions
        return {
            "prompt": messages,
            "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}],
        }
    # UltraFeedback shape: string prompt, completions are the whole [user, assistant] exchange
    user = [{"role": "user", "content": prompt}]
    return {
        "prompt": prompt,
        "chosen": user + [{"role": "assistant", "content": chosen}],
        "rejected": user + [{"role": "assistant", "content": rejected}],
    }


def write(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main(out: Path = HERE) -> None:
    rng = random.Random(SEED)
    write(out / "prefs_train.jsonl", [make_row(rng) for _ in range(400)])
    write(out / "prefs_eval.jsonl", [make_row(rng) for _ in range(64)])


if __name__ == "__main__":
    main()
