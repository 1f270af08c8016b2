"""Row-level problems and the counts of everything read, kept, truncated and dropped.

Nothing leaves the pipeline silently. A stage that refuses a row (parsing and validation,
template, BOS / EOS policy, truncation) raises `RowRejected(reason, detail)`; the pipeline turns
it, once, into a `RowIssue` with the row's source, its line (text files, 1-based) or row index
(0-based). Every issue and every truncation is counted in the `DataReport`.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import asdict, dataclass, field

# Reasons that make a row *bad* (on_error applies); policy drops are counted but never fail.
BAD_ROW_REASONS = (
    "malformed_json",
    "missing_field",
    "wrong_type",
    "empty_completion",
    "chosen_equals_rejected",
    "undecodable_text",
    "prompt_mismatch",
    "template_error",
    "double_bos",
    "control_token",
)
POLICY_DROP_REASONS = ("overlength_dropped", "completion_emptied")


class RowRejected(ValueError):
    """One row refused: `reason` (one of BAD_ROW_REASONS or POLICY_DROP_REASONS) and a `detail`
    that names the field and the fix; `str(err) == detail`. It does not know where the row is:
    the pipeline adds the location (`RowIssue`)."""

    def __init__(self, reason: str, detail: str):
        if reason not in BAD_ROW_REASONS + POLICY_DROP_REASONS:
            raise ValueError(f"unknown row rejection reason {reason!r}")
        super().__init__(detail)
        self.reason = reason
        self.detail = detail

    def __reduce__(self):  # pickled from tokenizer worker processes
        return type(self), (self.reason, self.detail)


@dataclass(frozen=True)
class RowIssue:
    """One dropped row: where it is and why (one entry of `data_report.json`).

    Attributes:
        source: The file path or dataset spec.
        index: 1-based line number for .jsonl files, else 0-based row index.
        index_kind: "line" or "row".
        reason: One of BAD_ROW_REASONS or POLICY_DROP_REASONS.
        detail: Human-readable explanation naming the field and the fix.
    """

    source: str
    index: int
    index_kind: str
    reason: str
    detail: str

    def __str__(self) -> str:
        return f"{self.source}:{self.index_kind} {self.index}: {self.reason}: {self.detail}"


class DataError(ValueError):
    """Bad input rows with on_error='fail'; `issues` lists all of them."""

    def __init__(self, issues: list[RowIssue], limit: int = 20, report_path: str | None = None):
        self.issues = issues
        self.report_path = report_path
        shown = "\n  ".join(str(i) for i in issues[:limit])
        more = f"\n  ... and {len(issues) - limit} more" if len(issues) > limit else ""
        where = f"\nfull list: {report_path}" if report_path else ""
        super().__init__(
            f"{len(issues)} bad preference row(s); fix them or use on_error='skip' "
            f"(--on-error skip) to skip and report them:\n  {shown}{more}{where}"
        )


@dataclass
class DataReport:
    """Counts and issues of one preprocessing run (mergeable across workers)."""

    rows_read: int = 0
    pairs_written: int = 0
    prompt_truncated: int = 0
    chosen_truncated: int = 0
    rejected_truncated: int = 0
    issues: list[RowIssue] = field(default_factory=list)
    length_histogram: Counter = field(default_factory=Counter)

    def merge(self, other: DataReport) -> None:
        self.rows_read += other.rows_read
        self.pairs_written += other.pairs_written
        self.prompt_truncated += other.prompt_truncated
        self.chosen_truncated += other.chosen_truncated
        self.rejected_truncated += other.rejected_truncated
        self.issues.extend(other.issues)
        self.length_histogram.update(other.length_histogram)

    @property
    def bad_rows(self) -> list[RowIssue]:
        return [i for i in self.issues if i.reason in BAD_ROW_REASONS]

    def counts(self) -> dict[str, int]:
        by_reason = Counter(i.reason for i in self.issues)
        return {
            "rows_read": self.rows_read,
            "pairs_written": self.pairs_written,
            "bad_rows": len(self.bad_rows),
            "prompt_truncated": self.prompt_truncated,
            "chosen_truncated": self.chosen_truncated,
            "rejected_truncated": self.rejected_truncated,
            **{f"dropped_{r}": by_reason.get(r, 0) for r in BAD_ROW_REASONS + POLICY_DROP_REASONS},
        }

    def histogram(self, max_length: int, bins: int = 16) -> dict[str, list[int]]:
        """Histogram of per-pair length (longer of chosen / rejected) in equal-width bins."""
        width = max(1, -(-max_length // bins))
        counts = [0] * bins
        for length, n in self.length_histogram.items():
            counts[min(bins - 1, (length - 1) // width)] += n
        edges = [min(max_length, (b + 1) * width) for b in range(bins)]
        return {"bin_upper_edges": edges, "counts": counts}

    def write(self, directory: str) -> str:
        """Write `data_report.json` (counts + every issue) into `directory`; return its path."""
        path = os.path.join(directory, "data_report.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump(
                {"counts": self.counts(), "issues": [asdict(i) for i in self.issues]},
                f,
                indent=1,
                ensure_ascii=False,
            )
        return path

    def nothing_survived(self, report_path: str, limit: int = 5) -> str:
        """The error of a run in which no pair survived: the counts, the first dropped rows
        with their file and line, and where the full list is."""
        if not self.rows_read:
            return "no preference pair survived preprocessing: data.inputs hold no rows"
        shown = "\n  ".join(str(i) for i in self.issues[:limit])
        more = f"\n  ... and {len(self.issues) - limit} more" if len(self.issues) > limit else ""
        return (
            f"no preference pair survived preprocessing ({self.summary()}); first dropped rows:"
            f"\n  {shown}{more}\nevery dropped row with its reason: {report_path}"
        )

    def summary(self) -> str:
        c = self.counts()
        drops = ", ".join(f"{k[8:]}={v}" for k, v in c.items() if k.startswith("dropped_") and v)
        return (
            f"rows read {c['rows_read']}, pairs written {c['pairs_written']}, truncated "
            f"prompt/chosen/rejected {c['prompt_truncated']}/{c['chosen_truncated']}/"
            f"{c['rejected_truncated']}, dropped: {drops or 'none'}"
        )
