"""Pair-length profiles for planning and benchmarks (numpy only; never used for training).

``UltraFeedbackProfile`` synthesizes token lengths following UltraFeedback binarized
(``HuggingFaceH4/ultrafeedback_binarized``, ``train_prefs``: 61,135 pairs), the preference set of
the paper's recipe (ALGORITHM.md section 7). Source of the statistics: Shi et al., "WildFeedback:
Aligning LLMs With In-situ User Interactions And Feedback", arXiv:2408.15549 (2024), the table
comparing preference datasets: UltraFeedback, 61,135 samples, mean prompt length 159 tokens,
mean response length 256 tokens. The table gives means only, so the shape is an assumption,
stated here: lengths are log-normal with those means (log-space sigma 1.0 for prompts, 0.9 for
responses: a median response of ~170 tokens, a 99th percentile of ~1,400, i.e. "a few tokens to
well over a thousand"), chosen and rejected drawn independently, plus the chat template's tokens
(``TEMPLATE_TOKENS``: Llama-3's BOS and turn headers around the prompt, the EOS of the answer).
Pairs are then truncated exactly as ``data/truncation.py`` does at ``max_length`` /
``max_prompt_length`` (the recipe's 2048 / 1800).

``HistogramProfile`` draws from a preprocessed set's ``manifest.json`` ``length_histogram``
(prompt + longer completion per pair, in equal-width bins): both rows of a drawn pair get that
length, an upper bound (the manifest keeps only the longer one).

Both give ``row_lengths(n, seed)``: int64 ``[n, 2]``, the chosen and rejected rows' tokens
(prompt + completion) that ``data/batching.py`` plans with.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PROMPT_MEAN, RESPONSE_MEAN = 159.0, 256.0  # tokens; WildFeedback (arXiv:2408.15549)
TEMPLATE_TOKENS = (10, 1)  # Llama-3 chat template: prompt side, completion side (EOS)


def _log_normal(rng: np.random.Generator, mean: float, sigma: float, n: int) -> np.ndarray:
    """Integer lengths >= 1 whose log-normal law has the given mean: ``mu = ln(mean) - s^2/2``."""
    mu = np.log(mean) - sigma**2 / 2
    return np.maximum(1, np.rint(rng.lognormal(mu, sigma, n))).astype(np.int64)


@dataclass(frozen=True)
class UltraFeedbackProfile:
    """UltraFeedback-binarized-like pairs (see the module docstring for source and shape)."""

    max_length: int = 2048
    max_prompt_length: int | None = 1800
    prompt_sigma: float = 1.0
    response_sigma: float = 0.9

    def sample(self, n: int, seed: int = 0) -> np.ndarray:
        """int64 ``[n, 3]``: prompt, chosen and rejected completion tokens after truncation."""
        rng = np.random.default_rng(seed)
        prompt = _log_normal(rng, PROMPT_MEAN, self.prompt_sigma, n) + TEMPLATE_TOKENS[0]
        chosen, rejected = (
            _log_normal(rng, RESPONSE_MEAN, self.response_sigma, n) + TEMPLATE_TOKENS[1]
            for _ in range(2)
        )
        limit = self.max_length - 1 if self.max_prompt_length is None else self.max_prompt_length
        prompt = np.minimum(prompt, min(limit, self.max_length - 1))  # as truncation.py keeps it
        room = self.max_length - prompt
        return np.stack([prompt, np.minimum(chosen, room), np.minimum(rejected, room)], axis=1)

    def row_lengths(self, n: int, seed: int = 0) -> np.ndarray:
        pairs = self.sample(n, seed)
        return pairs[:, :1] + pairs[:, 1:]


@dataclass(frozen=True)
class HistogramProfile:
    """Pairs drawn from a manifest's ``length_histogram`` (uniform within each bin)."""

    upper_edges: tuple[int, ...]
    counts: tuple[int, ...]

    @classmethod
    def from_manifest(cls, path: str | Path) -> HistogramProfile:
        """``path``: a preprocessed directory or its ``manifest.json``."""
        path = Path(path)
        file = path / "manifest.json" if path.is_dir() else path
        fix = (
            "pass a directory written by tools/preprocess_data.py (its manifest.json holds the "
            "length histogram) or 'ultrafeedback'"
        )
        try:
            histogram = json.loads(file.read_text(encoding="utf-8"))["length_histogram"]
            edges, counts = histogram["bin_upper_edges"], histogram["counts"]
            profile = cls(tuple(int(e) for e in edges), tuple(int(c) for c in counts))
        except (OSError, ValueError, KeyError, TypeError) as err:
            if isinstance(err, json.JSONDecodeError):
                reason = f"not one JSON object: {err.msg} at line {err.lineno}"
            elif isinstance(err, OSError):
                reason = err.strerror or str(err)
            else:
                reason = "no length_histogram with bin_upper_edges and counts"
            raise ValueError(
                f"length profile {file} is not a data manifest ({reason}); {fix}"
            ) from None
        if len(profile.upper_edges) != len(profile.counts) or not profile.counts:
            raise ValueError(f"length profile {file}: a malformed length histogram; {fix}")
        return profile

    def row_lengths(self, n: int, seed: int = 0) -> np.ndarray:
        rng = np.random.default_rng(seed)
        counts = np.asarray(self.counts, dtype=np.float64)
        if counts.sum() <= 0:
            raise ValueError("the manifest's length histogram is empty")
        upper = np.asarray(self.upper_edges, dtype=np.int64)
        lower = np.concatenate([[1], upper[:-1] + 1])
        bins = rng.choice(len(counts), size=n, p=counts / counts.sum())
        rows = rng.integers(lower[bins], np.maximum(lower[bins], upper[bins]) + 1)
        return np.stack([rows, rows], axis=1)


def load_profile(spec: str, max_length: int = 2048, max_prompt_length: int | None = 1800):
    """``"ultrafeedback"`` or a preprocessed directory / ``manifest.json`` path."""
    if spec == "ultrafeedback":
        return UltraFeedbackProfile(max_length, max_prompt_length)
    if not Path(spec).exists():
        raise ValueError(
            f"length profile {spec!r}: use 'ultrafeedback' or a preprocessed data directory "
            "(its manifest.json holds the length histogram)"
        )
    return HistogramProfile.from_manifest(spec)
