"""The grid's statistics: exact match with a 95 % interval over held-out prompts, cells won.

Interval (:func:`prompt_interval`): a method's exact match is ``m = mean_j p_j``, where
``p_j = mean_r hit[r, j]`` is the fraction of the method's runs ``r`` that answer held-out prompt
``j`` exactly. The interval is the normal one over prompts, ``m +- z * s_p / sqrt(N)`` (``s_p``
the sample standard deviation of the ``p_j``, ddof 1; ``z`` the 97.5 % normal quantile; N = 309
prompts, where Student's t differs by 0.3 %): the uncertainty from which prompts were held out,
for this method's fixed set of runs (hyperparameters and seeds), not a spread over runs.
:func:`paired_interval` is the same interval of the per-prompt difference ``p_j - q_j`` of two
methods (AdaDPO minus a baseline): the prompts are shared, so it is much narrower than the two
methods' intervals side by side.

Cells (:func:`cells_won`): AdaDPO's exact match in a (lr, beta) cell (mean of its seeds) against
a baseline's; a tie when they differ by at most one held-out prompt (``|d| <= 1 / N``), else a
win or a loss. Cells where either method has no finished run are left out (partial results).
"""

from __future__ import annotations

from statistics import NormalDist

import numpy as np

Z95 = NormalDist().inv_cdf(0.975)


def hits(answers: list[str], truth: list[str]) -> np.ndarray:
    """``[N]`` 1.0 where a run's greedy answer equals the ground truth, else 0.0."""
    return np.array([a == t for a, t in zip(answers, truth, strict=True)], dtype=np.float64)


def _interval(per_prompt: np.ndarray) -> tuple[float, float, float]:
    mean = float(per_prompt.mean())
    half = Z95 * float(per_prompt.std(ddof=1)) / np.sqrt(per_prompt.size)
    return mean, mean - half, mean + half


def prompt_interval(hit: np.ndarray) -> tuple[float, float, float]:
    """``(mean, low, high)`` of exact match over runs and prompts (module docstring).

    Shapes: ``hit`` ``[R, N]`` (runs x prompts, 0 / 1).
    """
    return _interval(np.asarray(hit, dtype=np.float64).mean(axis=0))


def paired_interval(ours: np.ndarray, theirs: np.ndarray) -> tuple[float, float, float]:
    """``(mean, low, high)`` of exact match ``ours`` minus ``theirs``, paired by prompt.

    Shapes: ``ours`` ``[R, N]``, ``theirs`` ``[R', N]`` (the same N prompts).
    """
    ours, theirs = (np.asarray(h, dtype=np.float64).mean(axis=0) for h in (ours, theirs))
    return _interval(ours - theirs)


def cell_means(runs: list[dict], method: str, key: str = "exact") -> dict[tuple, float]:
    """``{(lr, beta): mean of key over the seeds}`` of ``method``'s runs."""
    cells: dict[tuple, list[float]] = {}
    for r in runs:
        if r["method"] == method:
            cells.setdefault((r["lr"], r["beta"]), []).append(r[key])
    return {cell: float(np.mean(values)) for cell, values in cells.items()}


def cells_won(ours: dict, theirs: dict, n_prompts: int) -> tuple[int, int, int]:
    """``(wins, ties, losses)`` of ``ours`` against ``theirs`` over the cells both have; a tie
    is a difference of at most one prompt (``1 / n_prompts``)."""
    wins = ties = losses = 0
    for cell in sorted(ours.keys() & theirs.keys()):
        diff = ours[cell] - theirs[cell]
        if abs(diff) <= 1.0 / n_prompts + 1e-12:
            ties += 1
        elif diff > 0:
            wins += 1
        else:
            losses += 1
    return wins, ties, losses
