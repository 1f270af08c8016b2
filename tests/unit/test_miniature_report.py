"""examples/miniature --grid / --lora: the interval, the cells won, the job lists, the report."""

import json
import math

import numpy as np
import pytest
import torch
from test_miniature import _module

from megatron_adadpo.config import load_config

N = 309  # held-out prompts of the miniature


def test_prompt_interval_equals_fp64_formula():
    stats = _module("stats")
    hit = (np.random.default_rng(0).random((6, N)) < 0.5).astype(float)
    mean, low, high = stats.prompt_interval(hit)
    p = [sum(hit[r, j] for r in range(6)) / 6 for j in range(N)]
    m = sum(p) / N
    sd = math.sqrt(sum((x - m) ** 2 for x in p) / (N - 1))
    z = math.sqrt(2.0) * torch.special.erfinv(torch.tensor(0.95, dtype=torch.float64)).item()
    assert mean == pytest.approx(m, abs=1e-15)
    assert (low, high) == pytest.approx((m - z * sd / math.sqrt(N), m + z * sd / math.sqrt(N)))


def test_paired_interval_equals_fp64_formula():
    stats, rng = _module("stats"), np.random.default_rng(2)
    ours, theirs = (rng.random((k, N)) < 0.5 for k in (4, 6))
    d = [
        sum(ours[r, j] for r in range(4)) / 4 - sum(theirs[r, j] for r in range(6)) / 6
        for j in range(N)
    ]
    m = sum(d) / N
    half = 1.959963984540054 * math.sqrt(sum((x - m) ** 2 for x in d) / (N - 1) / N)
    assert stats.paired_interval(ours, theirs) == pytest.approx((m, m - half, m + half))


def test_prompt_interval_covers_the_population_mean_95_percent_of_the_time():
    """Prompts drawn from a population of difficulties (mean 0.4), runs answering at random:
    the interval holds the population mean in about 95 % of 400 draws."""
    stats, rng = _module("stats"), np.random.default_rng(1)
    covered = 0
    for _ in range(400):
        difficulty = rng.beta(2.0, 3.0, size=N)  # mean 2 / 5
        _, low, high = stats.prompt_interval(rng.random((4, N)) < difficulty)
        covered += low <= 0.4 <= high
    assert 0.92 <= covered / 400 <= 0.98


def _runs(method: str, cells: dict) -> list[dict]:
    """Two seeds per cell, exact match value +- 1 / (2N) around the cell's value."""
    runs = []
    for (lr, beta), value in cells.items():
        for seed, offset in ((1, -0.5 / N), (2, 0.5 / N)):
            exact = value + offset
            runs.append(dict(method=method, lr=lr, beta=beta, seed=seed, exact=exact))
    return runs


def test_cells_won_counts_wins_ties_losses():
    stats = _module("stats")
    cells = [(lr, b) for lr in (1e-4, 2e-4, 5e-4, 1e-3) for b in (0.01, 0.05, 0.1, 0.5)]
    diff = [5 / N] * 10 + [0.5 / N, -0.5 / N, 0.0, 1 / N] + [-2 / N] * 2  # 10 win, 4 tie, 2 loss
    base = {c: 0.4 + 0.01 * k for k, c in enumerate(cells)}
    runs = _runs("DPO", base) + _runs(
        "AdaDPO", {c: base[c] + d for c, d in zip(cells, diff, strict=True)}
    )
    ada, dpo = stats.cell_means(runs, "AdaDPO"), stats.cell_means(runs, "DPO")
    assert dpo == pytest.approx(base)
    assert stats.cells_won(ada, dpo, N) == (10, 4, 2)
    partial = {c: v for c, v in dpo.items() if c != cells[0]}  # a cell not finished yet
    assert stats.cells_won(ada, partial, N) == (9, 4, 2)
    assert stats.cells_won(dpo, ada, N) == (2, 4, 10)


def _config(sets):
    return load_config(_module("jobs").BASE_CONFIG, ["data.inputs=[x.jsonl]", *sets])


def test_paper_grid_is_128_distinct_runs_with_the_methods_options():
    jobs = _module("jobs")
    runs = jobs.paper_grid()
    assert len(runs) == 128 == len({r["name"] for r in runs})
    assert len({tuple(r["sets"]) for r in runs}) == 128
    for method in ("DPO", "AdaDPO", "DPO+SFT", "DPOP"):
        mine = [r for r in runs if r["method"] == method]
        assert {(r["lr"], r["beta"], r["seed"]) for r in mine} == {
            (lr, b, s) for lr in jobs.GRID_LRS for b in jobs.GRID_BETAS for s in jobs.SEEDS
        }
        run = mine[-1]
        loss, optimizer = _config(run["sets"]).loss, _config(run["sets"]).optimizer
        assert (loss.name, loss.beta, optimizer.lr) == ("dpo", run["beta"], run["lr"])
        assert optimizer.min_lr == pytest.approx(run["lr"] / 10)
        assert loss.adaptive is (method == "AdaDPO")
        assert loss.sft_weight == (1.0 if method == "DPO+SFT" else 0.0)
        assert loss.dpop_lambda == (50.0 if method == "DPOP" else 0.0)


def test_lora_grid_and_default_grid():
    jobs = _module("jobs")
    lora = jobs.lora_grid()
    assert len(lora) == 12 == len({r["name"] for r in lora})
    for run in lora[0], lora[-1]:
        config = _config(run["sets"])
        assert (config.lora.rank, config.lora.alpha) == (8, 16.0)
        assert config.reference_mode == "adapters_off" and config.optimizer.lr == jobs.LORA_LR
        assert config.loss.adaptive is (run["method"] == "AdaDPO")
    default = jobs.grid()  # run.py without flags: the same 24 runs at lr 1e-4
    assert len(default) == 24 and all(r["sets"][:2] == jobs.PREFERENCE for r in default)


def test_report_renders_partial_grid_results(tmp_path):
    report = _module("grid_report")
    truth = [f"a{j}" for j in range(N)]
    (tmp_path / "data").mkdir()
    rows = "".join(
        json.dumps({"prompt": "q", "chosen": f" {t}", "rejected": "x"}) + "\n" for t in truth
    )
    (tmp_path / "data/heldout.jsonl").write_text(rows)
    measures = dict(delta_chosen=-0.1, delta_rejected=-1.0, both_fell=0.5, reward_accuracy=0.9)
    results = tmp_path / "results"
    results.mkdir()
    sft = dict(name="SFT", method="SFT", answers=truth, exact_match={"all": 1.0}, **measures)
    (results / "SFT.json").write_text(json.dumps(sft))
    for k, (method, right) in enumerate([("DPO", 100), ("AdaDPO", 150), ("AdaDPO", 160)]):
        answers = truth[:right] + ["wrong"] * (N - right)
        run = dict(name=f"r{k}", method=method, lr=1e-4, beta=0.1, seed=1 + k // 2, **measures)
        run.update(answers=answers, exact_match={"all": right / N})
        (results / f"r{k}.json").write_text(json.dumps(run))
    written = report.write_report(tmp_path, "grid")
    text = written[0].read_text()
    assert "3 runs finished" in text and "| AdaDPO vs DPO | 1 | 0 | 0 | 1 |" in text
    assert "| AdaDPO vs DPOP | 0 | 0 | 0 | 0 |" in text  # no DPOP run yet
    assert f"| AdaDPO | 2 | {155 / N:.1%} |" in text and (tmp_path / "grid.png").is_file()
    lora = report.write_report(tmp_path, "lora")[0].read_text()  # no cells, no figure, vs DPO
    assert "| AdaDPO vs DPO | 1 |" in lora and "DPOP" not in lora and "(lr, β) cell" not in lora
