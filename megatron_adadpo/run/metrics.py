"""Step metrics: one console line, ``metrics.jsonl``, optional TensorBoard and Weights & Biases,
tokens/s and MFU.

Only the logging rank (last pipeline stage, first TP / CP / DP rank: where the reduced loss
metrics live) writes, and only it starts a W&B run. The loss metrics arrive as ``[sum, count]``
tensors (``megatron_adadpo.losses.metrics``: names ending in ``_min`` / ``_max`` hold
``[value, 1]``, every other ``[sum, count]``); ``accumulate_metrics`` combines micro-batches,
``all_reduce_metrics`` reduces over data-parallel ranks in at most three collectives, and
``reduce_metrics`` makes the single host copy per logged step. Progress: each line ends with the
ETA, and on a terminal a ``tqdm`` bar (steps, rate) sits below the lines (a log file, e.g. under
Slurm, gets the lines only). A run that
starts at step ``k`` (resumed, or started afresh: ``k = 0``) first drops the rows after step
``k`` that an interrupted run left in ``metrics.jsonl`` (they are re-trained), and TensorBoard
purges its events after ``k``, so every step is recorded once.
"""

from __future__ import annotations

import json
import math
import sys
import time
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import Tensor
from tqdm import tqdm

from megatron_adadpo.run.state.run_dir import atomic_write_text

CONSOLE_FIELDS = (
    ("loss", "loss", "{:.4f}"),
    ("rewards/chosen", "r_c", "{:+.3f}"),
    ("rewards/rejected", "r_r", "{:+.3f}"),
    ("rewards/margins", "margin", "{:+.3f}"),
    ("rewards/accuracies", "acc", "{:.2f}"),
    ("logps/chosen", "lp_c", "{:.2f}"),
    ("logps/rejected", "lp_r", "{:.2f}"),
    ("ada/coef_mean", "coef", "{:.3f}"),
    ("ada/clip_frac", "clip", "{:.2f}"),
    ("ada/grad_balance", "gbal", "{:.3f}"),
    ("ada/log_prob_balance", "log_pbal", "{:+.3f}"),
    ("grad_norm", "gnorm", "{:.3f}"),
    ("lr", "lr", "{:.2e}"),
    ("throughput/tokens_per_s", "tok/s", "{:.0f}"),
    ("throughput/pairs_per_s", "pairs/s", "{:.2f}"),
    ("throughput/mfu", "mfu", "{:.2%}"),
)


class MetricsLogger:
    """Formats, prints and stores the metrics of each logged step (``active`` rank only)."""

    def __init__(
        self,
        run_dir: str,
        total_steps: int,
        tensorboard: bool,
        progress: bool,
        active: bool,
        start_step: int = 0,
        wandb: dict | None = None,
    ):
        """``wandb``: ``wandb.init`` arguments (:func:`wandb_settings`), or None for no W&B."""
        self.active = active
        self.total_steps = total_steps
        self.progress = progress
        self.start = (time.monotonic(), start_step)
        self.jsonl = None
        self.writer = None
        self.wandb_run = None
        self.bar = None
        if not self.active:
            return
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        path = Path(run_dir) / "metrics.jsonl"
        drop_rows_after(path, start_step)
        self.jsonl = open(path, "a", buffering=1)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(
                str(Path(run_dir) / "tensorboard"), purge_step=start_step + 1
            )
        if wandb is not None:
            import wandb as wandb_module

            self.wandb_run = wandb_module.init(**wandb)
        if progress and sys.stderr.isatty():
            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def advance(self) -> None:
        """One optimizer step done (moves the progress bar)."""
        if self.bar is not None:
            self.bar.update(1)

    def log(self, step: int, values: dict[str, float], prefix: str = "train") -> None:
        if not self.active:
            return
        record = {"step": step, "split": prefix, **values}
        self.jsonl.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for name, value in values.items():
                self.writer.add_scalar(f"{prefix}/{name}", value, step)
        if self.wandb_run is not None:
            self.wandb_run.log({f"{prefix}/{k}": v for k, v in values.items()}, step=step)
        tqdm.write(self._line(step, values, prefix))

    def _line(self, step: int, values: dict[str, float], prefix: str) -> str:
        parts = [f"[{prefix}] step {step}/{self.total_steps}"]
        for key, short, fmt in CONSOLE_FIELDS:
            if key in values and not math.isnan(values[key]):
                parts.append(f"{short} {fmt.format(values[key])}")
        started, first_step = self.start
        if prefix == "train" and self.progress and step > first_step:
            per_step = (time.monotonic() - started) / (step - first_step)
            parts.append(f"eta {tqdm.format_interval(per_step * (self.total_steps - step))}")
        return " | ".join(parts)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.jsonl is not None:
            self.jsonl.close()
        if self.writer is not None:
            self.writer.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


def wandb_settings(logging, run_config: dict) -> dict | None:
    """``wandb.init`` arguments for ``logging`` (the config's LoggingSection), or None.

    The W&B run id is kept in ``<run_dir>/wandb_run_id``, so a resumed training run continues
    the same W&B run (``resume="allow"``); files go under ``<run_dir>/wandb``.
    """
    if not logging.wandb_project:
        return None
    run_dir = Path(logging.run_dir)
    id_file = run_dir / "wandb_run_id"
    if not id_file.exists():
        run_dir.mkdir(parents=True, exist_ok=True)
        id_file.write_text(uuid.uuid4().hex[:16])
    return {
        "project": logging.wandb_project,
        "entity": logging.wandb_entity,
        "name": logging.wandb_name or run_dir.name,
        "mode": logging.wandb_mode,
        "dir": str(run_dir),
        "id": id_file.read_text().strip(),
        "resume": "allow",
        "config": run_config,
    }


def drop_rows_after(path: Path, step: int) -> None:
    """Rewrite ``metrics.jsonl`` without the rows after ``step`` (and without a line cut short
    by a kill), atomically; a no-op when there is nothing to drop."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines()
    kept = []
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and row.get("step", 0) <= step:
            kept.append(line)
    if len(kept) != len(lines):
        atomic_write_text(path, "".join(line + "\n" for line in kept))


def step_values(
    metrics,
    grad_norm,
    lr: float,
    step_time: float,
    global_batch_size: int,
    flops: float,
    peak: float,
) -> dict[str, float]:
    """Host-side values of one step: loss metrics (means), grad norm, lr, throughput, MFU.

    ``batch/tokens`` and ``batch/real_tokens`` arrive as per-pair means (``token_metrics``):
    times ``global_batch_size`` they are the step's processed and real (non-padding) tokens.
    ``flops`` is the model FLOPs of the global batch's real tokens; ``peak`` the summed peak
    FLOP/s of all devices.
    """
    values = reduce_metrics(metrics) if metrics else {}
    tokens = values.pop("batch/tokens", float("nan")) * global_batch_size
    real = values.pop("batch/real_tokens", float("nan")) * global_batch_size
    values["grad_norm"] = float("nan") if grad_norm is None else float(grad_norm)
    values["lr"] = lr
    values["step_time_s"] = step_time
    values["throughput/tokens_per_s"] = tokens / step_time
    values["throughput/real_tokens_per_s"] = real / step_time
    values["throughput/padding_fraction"] = 1.0 - real / tokens
    values["throughput/pairs_per_s"] = global_batch_size / step_time
    values["throughput/mfu"] = flops / step_time / peak if peak else float("nan")
    return values


def reduce_op(name: str) -> str:
    """``"min"``, ``"max"`` or ``"sum"``: how metric ``name`` is reduced."""
    if name.endswith("_min"):
        return "min"
    if name.endswith("_max"):
        return "max"
    return "sum"


def accumulate_metrics(metrics_list: Iterable[Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """Combine micro-batch metrics (SUM, or MIN/MAX for extrema). Shapes: ``[2]`` each."""
    total: dict[str, Tensor] = {}
    for metrics in metrics_list:
        for name, value in metrics.items():
            if name not in total:
                total[name] = value.clone()
            elif reduce_op(name) == "sum":
                total[name] = total[name] + value
            else:
                pick = torch.minimum if reduce_op(name) == "min" else torch.maximum
                total[name] = torch.stack([pick(total[name][0], value[0]), value[1]])
    return total


def stack_metrics(metrics: Mapping[str, Tensor]) -> dict[str, tuple[list[str], Tensor]]:
    """Group metrics by reduce op: ``{"sum"|"min"|"max": (names, stacked [k, 2])}``."""
    groups: dict[str, list[str]] = {}
    for name in metrics:
        groups.setdefault(reduce_op(name), []).append(name)
    return {op: (names, torch.stack([metrics[n] for n in names])) for op, names in groups.items()}


def unstack_metrics(stacked: Mapping[str, tuple[list[str], Tensor]]) -> dict[str, Tensor]:
    """Inverse of :func:`stack_metrics`."""
    return {n: t for names, table in stacked.values() for n, t in zip(names, table, strict=True)}


def all_reduce_metrics(metrics: Mapping[str, Tensor], group=None) -> dict[str, Tensor]:
    """All-reduce metrics over ``group`` (e.g. the data-parallel group): <= 3 collectives.

    A no-op when torch.distributed is not initialised.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return dict(metrics)
    ops = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}
    stacked = stack_metrics(metrics)
    for op, (_, table) in stacked.items():
        dist.all_reduce(table, op=ops[op], group=group)
    return unstack_metrics(stacked)


def reduce_metrics(
    metrics: Mapping[str, Tensor] | Iterable[Mapping[str, Tensor]],
) -> dict[str, float]:
    """Host-side means ``sum / count`` (one device->host copy). Accepts one dict or a list.

    A metric with count 0 (no valid pairs) or an unreduced extremum (+-inf) gives NaN.
    """
    if not isinstance(metrics, Mapping):
        metrics = accumulate_metrics(metrics)
    names = list(metrics)
    table = torch.stack([metrics[n].detach().double() for n in names]).cpu().tolist()
    result = {}
    for name, (value, count) in zip(names, table, strict=True):
        unreduced = reduce_op(name) != "sum" and value in (float("inf"), float("-inf"))
        ok = count > 0 and not unreduced
        result[name] = value / count if ok else float("nan")
    return result
