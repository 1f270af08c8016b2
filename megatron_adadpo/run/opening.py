"""Opening a run: its process groups, its run directory, its data and where it starts.

``open_run_dir(config)`` resolves the run once on this world size and machine
(``resolve(config, world_size, machine)``: every reason it cannot run, before any allocation),
builds the parallel value once, claims the run directory (``run/state/lock.py``), loads the
data and decides where the launch starts (``run/state/run_dir.py``: fresh, resumed from
``checkpoints/latest``, or already finished). Nothing is built on the accelerator yet: a
finished run (its latest checkpoint at or past the last step) becomes a
``FinishedRun``, which says so and touches nothing; any other becomes a ``Trainer``
(``run/trainer.py`` ``open_run``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist

from megatron_adadpo.config import Config, ConfigError
from megatron_adadpo.platform.distributed import init_model_parallel
from megatron_adadpo.platform.machine import probe_machine
from megatron_adadpo.platform.parallel import Parallel
from megatron_adadpo.resolve import ResolvedRun, resolve
from megatron_adadpo.run.datasets import load_dataset
from megatron_adadpo.run.state import checkpoints
from megatron_adadpo.run.state import run_dir as run_files
from megatron_adadpo.run.state.lock import RunDirLock, claim_run_dir
from megatron_adadpo.status import log as status


def total_steps(config: Config, dataset) -> int:
    """``train.train_iters``, or ``train.epochs`` over the dataset's whole global batches;
    refuses a dataset that does not fill one global batch (no step could be taken)."""
    pairs, batch = len(dataset), config.train.global_batch_size
    if pairs < batch:
        raise ConfigError(
            f"{pairs} pairs do not fill one global batch of {batch} (train.global_batch_size): "
            "lower train.global_batch_size or add data"
        )
    if config.train.train_iters is not None:
        return config.train.train_iters
    return config.train.epochs * (len(dataset) // config.train.global_batch_size)


@dataclass(frozen=True)
class StartPoint:
    """Where a launch starts: step 0, or the checkpoint ``resume_from`` (its run state and
    schedule read, not yet checked against the config)."""

    resume_from: Path | None
    saved: dict | None  # the checkpoint's run state (``RunState.to_dict``)
    saved_schedule: dict | None  # the checkpoint's scheduler state
    total_steps: int
    evaluates: bool  # the run evaluates (``eval.interval``)

    @property
    def step(self) -> int:
        return run_files.step_of(self.resume_from.name) if self.resume_from else 0

    @property
    def eval_pending_at_end(self) -> bool:
        """SIGTERM landed in the last step's evaluation: do it, and save again."""
        pending = bool(self.saved and self.saved.get("eval_pending") and self.evaluates)
        return pending and self.step >= self.total_steps

    @property
    def finished(self) -> bool:
        """Nothing is left to do: no step, no pending evaluation."""
        return self.step >= self.total_steps and not self.eval_pending_at_end


@dataclass
class OpenedRun:
    """A claimed run directory with its resolved run, parallel value, data and start."""

    run: ResolvedRun  # what will run (``resolve``): everything after reads it
    parallel: Parallel
    lock: RunDirLock | None
    dataset: object  # the training pairs
    eval_set: object | None  # the held-out pairs (None without eval.interval)
    start: StartPoint

    def close(self) -> None:
        """Release the run directory (idempotent)."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None


def open_run_dir(config: Config) -> OpenedRun:
    """Resolve the run, build the parallel value, claim the run directory, load the data and
    find the start."""
    run = resolve(config, dist.get_world_size(), probe_machine())
    train = config.train
    parallel = init_model_parallel(
        config.execution, seed=train.seed, timeout_minutes=train.distributed_timeout_minutes
    )
    run_dir = config.logging.run_dir
    run_files.check_writable(run_dir)  # before anything is built or trained
    opened = OpenedRun(run, parallel, claim_run_dir(run_dir), None, None, None)
    try:
        resume_from = run_files.resume_point(run_dir, config.checkpoint.resume)
        if parallel.rank == 0:
            status.info("resolved config:\n%s", config.to_yaml())
            for notice in config.notices:
                status.info("notice: %s", notice)
        opened.dataset = load_dataset(config)
        if config.eval.interval:
            opened.eval_set = load_dataset(config, eval_split=True)
        steps = total_steps(config, opened.dataset)
        saved, saved_schedule = None, None
        if resume_from is not None:
            saved, saved_schedule = checkpoints.read_saved_state(resume_from, config.model)
        evaluates = bool(config.eval.interval)
        opened.start = StartPoint(resume_from, saved, saved_schedule, steps, evaluates)
    except BaseException:
        opened.close()
        raise
    return opened


class FinishedRun:
    """A launch of a run whose latest checkpoint is at or past its last step: ``train()``
    says so and changes no file."""

    preempted = False  # as ``Trainer.preempted``: nothing ran, nothing was stopped

    def __init__(self, config: Config, opened: OpenedRun):
        self.config, self.opened = config, opened

    def train(self) -> None:
        try:
            if self.opened.parallel.rank == 0:
                start = self.opened.start
                status.info(
                    "%s is finished: its latest checkpoint %s is at or past the last step (%d); "
                    "nothing to train, no file changed (to train further, raise "
                    "train.train_iters or train.epochs with checkpoint.override_scheduler=true)",
                    self.config.logging.run_dir,
                    start.resume_from.name,
                    start.total_steps,
                )
        finally:
            self.close()

    def close(self) -> None:
        self.opened.close()
