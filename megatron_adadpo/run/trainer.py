"""The run: its pieces (data, policy, reference, DDP, optimizer, schedule) and its loop.

``open_run(config)`` opens the run (``run/opening.py``: the parallel value, the claimed run
directory, the data, where the run starts) and returns a ``FinishedRun`` when nothing is left,
else a ``Trainer``, which checks a resumed run against its checkpoint (``run/state/resume.py``) and
builds everything inside an initialised process group. ``Trainer.train()`` runs the steps
(micro-batches -> reference log-probs -> Megatron schedule forward / backward -> optimizer ->
metrics -> eval -> checkpoint) and saves at the end. SIGTERM (Slurm preemption) stops within a
bounded time, saves and exits 0 (``run/preemption.py``: a step completes; an evaluation is
abandoned, and the resumed run does it first). A re-launched finished run says so and touches
nothing (``FinishedRun``). The module-level builders are shared with ``run/precompute.py``.
"""

from __future__ import annotations

import time
from pathlib import Path

from megatron_adadpo.config import Config, ConfigError
from megatron_adadpo.model.build import build_model
from megatron_adadpo.model.initialization import init_layout_invariant
from megatron_adadpo.model.lora import add_adapters
from megatron_adadpo.planner.throughput import step_model_flops
from megatron_adadpo.platform.hardware import peak_flops_per_device
from megatron_adadpo.platform.megatron_optimizer import force_param_sync
from megatron_adadpo.platform.parallel import Parallel
from megatron_adadpo.resolve import ResolvedRun
from megatron_adadpo.run.batches import StepBatches, step_batches
from megatron_adadpo.run.evaluation import Evaluator
from megatron_adadpo.run.metrics import MetricsLogger, reduce_metrics, step_values, wandb_settings
from megatron_adadpo.run.opening import FinishedRun, OpenedRun, open_run_dir
from megatron_adadpo.run.optimizer import build_optimizer, build_scheduler, wrap_ddp
from megatron_adadpo.run.preemption import Preemption
from megatron_adadpo.run.reference import (
    AdaptersOffReference,
    PrecomputedReference,
    ResidentReference,
)
from megatron_adadpo.run.state import checkpoints, resume
from megatron_adadpo.run.state.checkpoint_writer import CheckpointWriter
from megatron_adadpo.run.state.consistency import (
    check_precomputed_loss,
    check_reference_model,
    recorded_reference_model,
)
from megatron_adadpo.run.state.lock import RunDirLock
from megatron_adadpo.run.state.resume import RunState
from megatron_adadpo.run.step import StepContext, train_step
from megatron_adadpo.status import log as status


def build_run_model(config: Config, run: ResolvedRun) -> list:
    """Model chunks of the resolved run (its kernels; packed rows when it packs them)."""
    packed = run.batching.packing is not None
    return build_model(config.model, config.execution, packed, run.kernels)


def build_policy(config: Config, run: ResolvedRun) -> list:
    """The policy's model chunks with their initial weights (checkpoint or initialisation)."""
    chunks = build_run_model(config, run)
    if config.train.init_checkpoint:
        checkpoints.load_model(
            chunks, config.train.init_checkpoint, config.model, config.checkpoint.fully_parallel
        )
    elif config.train.init_method == "layout_invariant":
        init_layout_invariant(chunks, config.train.seed, config.model.vocab_size)
    return chunks


def add_policy_adapters(config: Config, chunks: list) -> None:
    """With a ``lora:`` section: adapters on the policy's linears, the base frozen
    (``model/lora.py``); after the base is loaded and any resident reference copied from it."""
    if config.lora is not None:
        add_adapters(chunks, config.lora, config.train.seed)


def build_reference_model(config: Config, run: ResolvedRun) -> list:
    """The reference's model chunks with its weights: ``reference.checkpoint``'s, else the
    policy's initial ones (``build_policy``)."""
    checkpoint = config.reference.checkpoint
    if not checkpoint:
        return build_policy(config, run)
    chunks = build_run_model(config, run)
    checkpoints.load_model(chunks, checkpoint, config.model)
    return chunks


def build_references(
    config: Config, run: ResolvedRun, policy_chunks: list, context: StepContext, datasets
):
    """(train reference, eval reference): resident model, the policy with its adapters off,
    precomputed values, or none."""
    mode = run.step.reference
    if mode == "adapters_off":
        ref = AdaptersOffReference(policy_chunks, context)
        return ref, ref
    if mode == "resident":
        if config.reference.checkpoint:
            ref = ResidentReference(build_reference_model(config, run), None, context)
        else:  # a copy of the policy's initial weights: no second load
            chunks = build_run_model(config, run)
            ref = ResidentReference(chunks, policy_chunks, context)
        return ref, ref
    if mode == "precomputed":
        paths = (config.reference.path, config.reference.eval_path)
        refs = [None, None]
        for i, (path, dataset) in enumerate(zip(paths, datasets, strict=True)):
            if path and dataset is not None:
                refs[i] = PrecomputedReference(path, dataset.identity)
                check_reference_model(recorded_reference_model(refs[i].meta), config, path)
                check_precomputed_loss(refs[i].meta, config, path)
        return tuple(refs)
    return None, None


def open_run(config: Config) -> Trainer | FinishedRun:
    """The run of ``config``: a ``Trainer`` for the steps left, or the ``FinishedRun`` (its
    latest checkpoint at or past the last step, no evaluation pending)."""
    opened = open_run_dir(config)
    if opened.start.finished:
        return FinishedRun(config, opened)
    return Trainer(config, opened)


class Trainer:
    """A run with steps (or a pending evaluation) left, inside an initialised default process
    group. Every attribute is set by the constructor; the run state is ``state``."""

    config: Config
    run: ResolvedRun  # what runs (``resolve``, once, in ``open_run_dir``)
    parallel: Parallel  # degrees, process groups, this rank's coordinates (built once)
    lock: RunDirLock | None  # the claimed run directory (None once released)
    resume_from: Path | None  # the checkpoint this launch continues (None: fresh)
    total_steps: int
    eval_pending_at_end: bool  # SIGTERM landed in the last step's evaluation: do it, save again
    dataset: object  # the training pairs
    state: RunState  # step, consumed pairs, ...: saved with every checkpoint
    batches: StepBatches
    context: StepContext
    reference: ResidentReference | PrecomputedReference | None
    policy: list  # the DDP-wrapped model chunks
    optimizer: object  # Megatron's optimizer
    scheduler: object  # Megatron's OptimizerParamScheduler
    evaluator: Evaluator | None
    writer: CheckpointWriter | None  # how checkpoints are written (built at the first save)
    preempted: bool  # train() stopped on SIGTERM (and saved)

    def __init__(self, config: Config, opened: OpenedRun | None = None):
        """``opened``: ``open_run_dir(config)``'s (opened here when None). A finished run has
        no trainer: ``open_run`` returns its ``FinishedRun``."""
        opened = opened or open_run_dir(config)
        self.config, self.parallel, self.lock = config, opened.parallel, opened.lock
        self.run = opened.run
        self.preempted, self.writer = False, None
        try:
            if opened.start.finished:
                raise ConfigError(
                    f"{config.logging.run_dir} is finished (latest checkpoint "
                    f"{opened.start.resume_from.name}): open it with run.trainer.open_run, "
                    "which reports it, or raise train.train_iters / train.epochs"
                )
            self._prepare(opened)
        except BaseException:
            self.close()
            raise

    def _prepare(self, opened: OpenedRun) -> None:
        """Data order, model, reference, optimizer and the resumed state."""
        config, start = self.config, opened.start
        self.dataset, self.resume_from = opened.dataset, start.resume_from
        self.total_steps, self.eval_pending_at_end = start.total_steps, start.eval_pending_at_end
        identity = self.dataset.identity
        saved = start.saved
        fresh = saved is None
        run = self.run
        if fresh:
            self.state = RunState.fresh(config, run, identity)
        else:
            self.state = RunState.resumed(saved, config, run)
        consumed = self.state.consumed_samples
        self.batches = step_batches(config, run, self.dataset, self.parallel, consumed)
        if saved is not None:
            per_epoch = self.batches.sampler.samples_per_epoch
            resume.check_run_state(saved, config, run, identity, per_epoch, self.resume_from)
        self.context = StepContext.from_config(config, run, self.parallel)
        chunks = build_policy(config, run)
        self.reference, eval_reference = build_references(
            config, run, chunks, self.context, (self.dataset, opened.eval_set)
        )
        add_policy_adapters(config, chunks)
        self.policy = wrap_ddp(chunks, config.optimizer)
        self.optimizer = build_optimizer(self.policy, config.optimizer, config.execution.bf16)
        self.scheduler = build_scheduler(
            self.optimizer,
            config.optimizer,
            self.total_steps,
            config.train.global_batch_size,
            override=config.checkpoint.override_scheduler,
        )
        if saved is not None:
            self._resume(start.saved_schedule)
        self.evaluator = None
        if opened.eval_set is not None:
            self.evaluator = Evaluator(
                config, run, self.policy, eval_reference, opened.eval_set, self.context
            )

    def _resume(self, saved_schedule: dict) -> None:
        """Load the checked checkpoint (model, optimizer, RNG) and its schedule."""
        where, config = self.resume_from, self.config
        if not config.checkpoint.override_scheduler:
            resume.check_schedule(
                saved_schedule, self.scheduler.state_dict(), where, self.state.step, config
            )
        fully_parallel = config.checkpoint.fully_parallel
        reference = self._synced_reference()
        checkpoints.load_training(where, self.policy, self.optimizer, fully_parallel, reference)
        self.scheduler.load_state_dict(saved_schedule)
        if self.parallel.rank == 0:
            status.info("resumed from %s at step %d", where, self.state.step)

    def close(self) -> None:
        """Release the run directory (idempotent)."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def save(self) -> None:
        """Save the current step (with ``checkpoint.async_save``: published once written)."""
        if self.writer is None:
            checkpoint = self.config.checkpoint
            self.writer = CheckpointWriter(checkpoint.fully_parallel, checkpoint.async_save)
        checkpoints.save_training(
            self.config.logging.run_dir,
            self.state.step,
            self.policy,
            self.optimizer,
            self.scheduler,
            self.state.to_dict(),
            self.config.model,
            self.config.to_yaml(),
            self.writer,
            reference=self._synced_reference(),
        )

    def _finish_saves(self) -> None:
        """Wait for the asynchronous write in flight and publish it (collective)."""
        if self.writer is not None:
            self.writer.wait()

    def _synced_reference(self) -> list | None:
        """TR-DPO's reference chunks (part of the training state), else None."""
        return self.reference.chunks if self.config.reference.sync_steps else None

    def _sync_reference(self) -> None:
        """TR-DPO: every ``reference.sync_steps`` steps, after the optimizer step, mix the
        policy into the resident reference (``ResidentReference.sync``), each rank its own
        shards; overlapped parameter gathers are forced first (the distributed optimizer's
        updated shards reach the model's parameters in the next forward otherwise)."""
        every = self.config.reference.sync_steps
        if every and self.state.step % every == 0:
            force_param_sync(self.policy, self.optimizer)
            self.reference.sync(self.policy, self.config.reference.mixup_alpha)

    def train(self) -> None:
        """Run the remaining steps; save at the configured interval, on SIGTERM and at the end."""
        try:
            self._train()
        finally:
            self.close()

    def _train(self) -> None:
        with Preemption() as preemption:  # run/preemption.py: where the run may stop
            logger = self._logger()
            self.preempted = self._loop(logger, preemption)
            self._finish_saves()  # the end of training waits for the write in flight
            logger.close()

    def _logger(self) -> MetricsLogger:
        config, active = self.config, self.parallel.is_logging_rank
        return MetricsLogger(
            config.logging.run_dir,
            self.total_steps,
            config.logging.tensorboard,
            config.logging.progress,
            active=active,
            start_step=self.state.step,
            wandb=wandb_settings(config.logging, config.to_dict()) if active else None,
        )

    def _loop(self, logger: MetricsLogger, preemption: Preemption) -> bool:
        """The remaining steps, their saves and the final save; True when SIGTERM stopped it."""
        config, state = self.config, self.state
        pending = state.eval_pending and self.evaluator is not None
        state.eval_pending = False
        stopped = pending and not self._evaluate(logger, preemption)
        if stopped and self.parallel.rank == 0:  # the checkpoint still says: evaluate first
            status.info("SIGTERM: step %d is saved, exiting", state.step)
        while state.step < self.total_steps and not stopped:
            stopped = self._step(logger, preemption)
            if self.writer is not None:
                self.writer.poll()  # publish a finished asynchronous write
            interval = config.checkpoint.save_interval
            if stopped:
                self.save()
            elif interval and state.step % interval == 0 and state.step < self.total_steps:
                self.save()
                stopped = preemption.agreed()  # SIGTERM during the save: it is saved
            if stopped:
                self._finish_saves()  # SIGTERM: the write is complete before the rank leaves
                self._report_stop()
        if not stopped and (config.checkpoint.save_at_end or self.eval_pending_at_end):
            self.save()
        return stopped

    def _report_stop(self) -> None:
        if self.parallel.rank == 0:
            pending = " (its evaluation pending: the resumed run does it first)"
            pending = pending if self.state.eval_pending else ""
            status.info("SIGTERM: saved step %d%s, exiting", self.state.step, pending)

    def _step(self, logger: MetricsLogger, preemption: Preemption) -> bool:
        """One optimizer step with its logging and evaluation; True when a rank asked to stop
        (SIGTERM): during the step (it completes) or during its evaluation (left pending)."""
        config, state = self.config, self.state
        start = time.monotonic()
        batches = self.batches.next_step()
        if self.reference is not None:
            self.reference.attach(batches)
        result = train_step(
            self.policy,
            self.optimizer,
            self.scheduler,
            batches,
            self.context,
            step=state.step + 1,
            stop_requested=preemption,  # read after this step's forward / backward
        )
        state.step += 1
        state.consumed_samples += config.train.global_batch_size
        self._sync_reference()
        logger.advance()
        if state.step % config.logging.log_interval == 0 or state.step == self.total_steps:
            values = self._throughput(result, time.monotonic() - start)
            logger.log(state.step, values)
        evaluate = self.evaluator is not None and state.step % config.eval.interval == 0
        if evaluate and (result.stop or not self._evaluate(logger, preemption)):
            state.eval_pending = True  # saved with the checkpoint
            return True
        return result.stop

    def _evaluate(self, logger: MetricsLogger, preemption: Preemption) -> bool:
        """Evaluate and log at the current step; False when SIGTERM interrupted it."""
        eval_metrics = self.evaluator(stop=preemption.agreed)
        if eval_metrics is None:
            return False
        if eval_metrics:
            values = reduce_metrics(eval_metrics)
            for throughput_only in ("batch/tokens", "batch/real_tokens"):
                values.pop(throughput_only, None)
            logger.log(self.state.step, values, prefix="eval")
        return True

    def _throughput(self, result, elapsed: float) -> dict:
        config = self.config
        flops = step_model_flops(
            config.model, config.execution.tp, self.batches.step_lengths, 1, self.run.step.reference
        ).sum()  # the real tokens' FLOPs, sequence by sequence: padding is not model work
        peak_tflops = config.logging.peak_tflops
        peak = peak_tflops * 1e12 if peak_tflops else peak_flops_per_device()
        values = step_values(
            result.metrics,
            result.grad_norm,
            self.optimizer.param_groups[0]["lr"],
            elapsed,
            config.train.global_batch_size,
            float(flops),
            peak * self.parallel.world_size,
        )
        values["skipped"] = float(result.skipped)
        return values
