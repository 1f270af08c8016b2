"""examples/miniature: held-out prompts never leak into training data; the run summary."""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parents[2] / "examples/miniature"


def _module(name: str):
    sys.path.insert(0, str(HERE))  # the example's modules import each other by name
    try:
        spec = importlib.util.spec_from_file_location(f"miniature_{name}", HERE / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(HERE))


def test_held_out_prompts_never_appear_in_training_rows():
    data = _module("data")
    rows = data.make_rows(seed=3, sft=600, prefs=300, heldout=100)
    assert (len(rows["sft"]), len(rows["prefs"])) == (600, 300)
    train = {r["prompt"] for r in rows["sft"] + rows["prefs"]}
    held = [r["prompt"] for r in rows["heldout"]]
    assert held and len(set(held)) == len(held) and not train & set(held)
    assert all(data.held_out(p) for p in held) and not any(data.held_out(p) for p in train)
    assert {r["task"] for r in rows["heldout"]} >= {"arithmetic", "parity", "sort_letters"}
    assert data.make_rows(3, 600, 300, 100) == rows  # deterministic


def test_pair_summary_formulas():
    evaluate = _module("evaluate")
    start = np.array([[-4.0, -9.0, 4, 3], [-2.0, -6.0, 2, 2]])
    after = np.array([[-6.0, -15.0, 4, 3], [-1.0, -8.0, 2, 2]])
    s = evaluate.pair_summary(after, start, "dpo")
    # per-token changes: pair 0 chosen -0.5, rejected -2; pair 1 chosen +0.5, rejected -1
    assert s["delta_chosen"] == pytest.approx(0.0) and s["delta_rejected"] == pytest.approx(-1.5)
    assert s["both_fell"] == 0.5
    assert s["reward_accuracy"] == 1.0  # h_w - h_l: (-2) - (-6) > 0, (+1) - (-2) > 0
    simpo = evaluate.pair_summary(after, start, "simpo")
    assert simpo["reward_accuracy"] == 1.0 and simpo["chosen_per_token"] == pytest.approx(-1.0)
