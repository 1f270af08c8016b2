"""The run: its pieces (data, policy, reference, DDP, optimizer, schedule) and its loop.

``Trainer(config)`` claims the run directory (``run/lock.py``), decides where the run starts
(``run/run_dir.py``: fresh, resumed from ``checkpoints/latest``, or already finished), checks a
resumed run against its checkpoint (``run/resume.py``) and builds everything inside an
initialised process group; ``Trainer.train()`` runs the steps (micro-batches -> reference
log-probs -> Megatron schedule forward / backward -> optimizer -> metrics -> eval -> checkpoint)
and saves at the end. SIGTERM (Slurm preemption) stops within a bounded time, saves and exits 0
(``run/preemption.py``: a step completes; an evaluation is abandoned, and the resumed run does
it first). A re-launched finished run says so and touches nothing. The module-level builders
are shared with ``run/precompute.py``.
"""

from __future__ import annotations

import time

import torch.distributed as dist

from megatron_adadpo.config import Config, ConfigError
from megatron_adadpo.losses import reduce_metrics
from megatron_adadpo.model.build import build_model
from megatron_adadpo.model.initialization import init_layout_invariant
from megatron_adadpo.model.lora import add_adapters
from megatron_adadpo.planner.throughput import step_model_flops
from megatron_adadpo.platform.distributed import init_model_parallel, is_logging_rank
from megatron_adadpo.platform.hardware import peak_flops_per_device
from megatron_adadpo.run import checkpoints, resume
from megatron_adadpo.run import run_dir as run_files
from megatron_adadpo.run.batches import step_batches
from megatron_adadpo.run.consistency import check_starting_model
from megatron_adadpo.run.datasets import load_dataset
from megatron_adadpo.run.evaluation import Evaluator
from megatron_adadpo.run.lock import claim_run_dir
from megatron_adadpo.run.metrics import MetricsLogger, step_values, wandb_settings
from megatron_adadpo.run.optimizer import build_optimizer, build_scheduler, wrap_ddp
from megatron_adadpo.run.preemption import Preemption
from megatron_adadpo.run.reference import (
    AdaptersOffReference,
    PrecomputedReference,
    ResidentReference,
)
from megatron_adadpo.run.step import StepContext, train_step


def packed_sequences(config: Config) -> bool:
    """The run feeds packed rows (``data.batching: packed``): the model's attention takes them
    (``model/build.py``)."""
    return config.data.batching == "packed"


def build_policy(config: Config) -> list:
    """The policy's model chunks with their initial weights (checkpoint or initialisation)."""
    chunks = build_model(config.model, config.execution, packed_sequences(config))
    if config.train.init_checkpoint:
        checkpoints.load_model(chunks, config.train.init_checkpoint, config.model)
    elif config.train.init_method == "layout_invariant":
        init_layout_invariant(chunks, config.train.seed, config.model.vocab_size)
    return chunks


def add_policy_adapters(config: Config, chunks: list) -> None:
    """With a ``lora:`` section: adapters on the policy's linears, the base frozen
    (``model/lora.py``); after the base is loaded and any resident reference copied from it."""
    if config.lora is not None:
        add_adapters(chunks, config.lora, config.train.seed)


def build_references(config: Config, policy_chunks: list, context: StepContext, datasets):
    """(train reference, eval reference): resident model, the policy with its adapters off,
    precomputed values, or none."""
    mode = config.reference_mode
    if mode == "adapters_off":
        ref = AdaptersOffReference(policy_chunks, context)
        return ref, ref
    if mode == "resident":
        chunks = build_model(config.model, config.execution, packed_sequences(config))
        ref = ResidentReference(chunks, policy_chunks, context)
        return ref, ref
    if mode == "precomputed":
        train_set, eval_set = datasets
        train_ref = PrecomputedReference(config.reference.path, train_set.identity)
        check_starting_model(train_ref.meta.get("starting_model"), config, config.reference.path)
        eval_ref = None
        if eval_set is not None and config.reference.eval_path:
            eval_ref = PrecomputedReference(config.reference.eval_path, eval_set.identity)
            path = config.reference.eval_path
            check_starting_model(eval_ref.meta.get("starting_model"), config, path)
        return train_ref, eval_ref
    return None, None


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


class Trainer:
    """One training run inside an initialised default process group."""

    def __init__(self, config: Config):
        self.config = config
        train = config.train
        self.groups = init_model_parallel(
            config.execution, seed=train.seed, timeout_minutes=train.distributed_timeout_minutes
        )
        self.dp_rank = dist.get_rank(self.groups.dp)
        self.dp_size = dist.get_world_size(self.groups.dp)
        run_dir = config.logging.run_dir
        run_files.check_writable(run_dir)  # before anything is built or trained
        self.lock = claim_run_dir(run_dir)
        try:
            self._prepare(config)
        except BaseException:
            self.close()
            raise

    def _prepare(self, config: Config) -> None:
        """Everything but the lock: where to start, data, model, optimizer, resumed state."""
        self.resume_from = run_files.resume_point(config.logging.run_dir, config.checkpoint.resume)
        if dist.get_rank() == 0:
            print(f"[megatron_adadpo] resolved config:\n{config.to_yaml()}", flush=True)
            for notice in config.notices:
                print(f"[megatron_adadpo] notice: {notice}", flush=True)
        self.dataset = load_dataset(config)
        eval_set = load_dataset(config, eval_split=True) if config.eval.interval else None
        self.total_steps = total_steps(config, self.dataset)
        start = run_files.step_of(self.resume_from.name) if self.resume_from else 0
        saved, saved_schedule = None, None
        if self.resume_from is not None:
            saved, saved_schedule = checkpoints.read_saved_state(self.resume_from, config.model)
        pending = bool(saved and saved.get("eval_pending") and config.eval.interval)
        # SIGTERM landed in the last step's evaluation: do it, and save again
        self.eval_pending_at_end = pending and start >= self.total_steps
        self.finished = start >= self.total_steps and not self.eval_pending_at_end
        if self.finished:
            return
        self.state = saved or resume.initial_state(config, self.dataset.identity)
        self.batches = step_batches(
            config, self.dataset, self._dp(), self.state["consumed_samples"], cp=self._cp()
        )
        if saved is not None:
            per_epoch = self.batches.sampler.samples_per_epoch
            resume.check_run_state(
                saved, config, self.dataset.identity, per_epoch, self.resume_from
            )
        self.context = StepContext.from_config(config, self.groups)
        chunks = build_policy(config)
        self.reference, eval_reference = build_references(
            config, chunks, self.context, (self.dataset, eval_set)
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
            self._resume(saved_schedule)
        self.evaluator = None
        if eval_set is not None:
            self.evaluator = Evaluator(
                config, self.policy, eval_reference, eval_set, self.context, self._dp(), self._cp()
            )

    def _dp(self) -> tuple[int, int]:
        return self.dp_rank, self.dp_size

    def _cp(self) -> tuple[int, int]:
        return dist.get_rank(self.groups.cp), dist.get_world_size(self.groups.cp)

    def _resume(self, saved_schedule: dict) -> None:
        """Load the checked checkpoint (model, optimizer, RNG) and its schedule."""
        where, config = self.resume_from, self.config
        if not config.checkpoint.override_scheduler:
            resume.check_schedule(
                saved_schedule, self.scheduler.state_dict(), where, self.state["step"], config
            )
        checkpoints.load_training(where, self.policy, self.optimizer)
        self.scheduler.load_state_dict(saved_schedule)
        self.state.update(seed=config.train.seed, optimizer_layout=resume.optimizer_layout(config))
        if dist.get_rank() == 0:
            step = self.state["step"]
            print(f"[megatron_adadpo] resumed from {where} at step {step}", flush=True)

    def close(self) -> None:
        """Release the run directory (idempotent)."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def save(self) -> None:
        checkpoints.save_training(
            self.config.logging.run_dir,
            self.state["step"],
            self.policy,
            self.optimizer,
            self.scheduler,
            self.state,
            self.config.model,
            self.config.to_yaml(),
        )

    preempted = False  # train() stopped on SIGTERM (and saved)

    def train(self) -> None:
        """Run the remaining steps; save at the configured interval, on SIGTERM and at the end."""
        try:
            if self.finished:
                self._report_finished()
            else:
                self._train()
        finally:
            self.close()

    def _report_finished(self) -> None:
        if dist.get_rank() == 0:
            print(
                f"[megatron_adadpo] {self.config.logging.run_dir} is finished: its latest "
                f"checkpoint {self.resume_from.name} is at or past the last step "
                f"({self.total_steps}); nothing to train, no file changed (to train further, "
                "raise train.train_iters or train.epochs with checkpoint.override_scheduler=true)",
                flush=True,
            )

    def _train(self) -> None:
        with Preemption() as preemption:  # run/preemption.py: where the run may stop
            logger = self._logger()
            self.preempted = self._loop(logger, preemption)
            logger.close()

    def _logger(self) -> MetricsLogger:
        config, active = self.config, is_logging_rank()
        return MetricsLogger(
            config.logging.run_dir,
            self.total_steps,
            config.logging.tensorboard,
            config.logging.progress,
            active=active,
            start_step=self.state["step"],
            wandb=wandb_settings(config.logging, config.to_dict()) if active else None,
        )

    def _loop(self, logger: MetricsLogger, preemption: Preemption) -> bool:
        """The remaining steps, their saves and the final save; True when SIGTERM stopped it."""
        config, state = self.config, self.state
        pending = state.pop("eval_pending", False) and self.evaluator is not None
        stopped = pending and not self._evaluate(logger, preemption)
        if stopped and dist.get_rank() == 0:  # the checkpoint still says: evaluate first
            print(f"[megatron_adadpo] SIGTERM: step {state['step']} is saved, exiting")
        while state["step"] < self.total_steps and not stopped:
            stopped = self._step(logger, preemption)
            interval = config.checkpoint.save_interval
            if stopped:
                self.save()
            elif interval and state["step"] % interval == 0 and state["step"] < self.total_steps:
                self.save()
                stopped = preemption.agreed()  # SIGTERM during the save: it is saved
            if stopped:
                self._report_stop()
        if not stopped and (config.checkpoint.save_at_end or self.eval_pending_at_end):
            self.save()
        return stopped

    def _report_stop(self) -> None:
        if dist.get_rank() == 0:
            pending = " (its evaluation pending: the resumed run does it first)"
            pending = pending if self.state.get("eval_pending") else ""
            print(f"[megatron_adadpo] SIGTERM: saved step {self.state['step']}{pending}, exiting")

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
            config.train.global_batch_size,
            nan_policy=config.train.nan_policy,
            step=state["step"] + 1,
            stop_requested=preemption,  # read after this step's forward / backward
        )
        state["step"] += 1
        state["consumed_samples"] += config.train.global_batch_size
        logger.advance()
        if state["step"] % config.logging.log_interval == 0 or state["step"] == self.total_steps:
            values = self._throughput(result, time.monotonic() - start)
            logger.log(state["step"], values)
        evaluate = self.evaluator is not None and state["step"] % config.eval.interval == 0
        if evaluate and (result.stop or not self._evaluate(logger, preemption)):
            state["eval_pending"] = True  # saved with the checkpoint
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
            logger.log(self.state["step"], values, prefix="eval")
        return True

    def _throughput(self, result, elapsed: float) -> dict:
        config = self.config
        flops = step_model_flops(
            config.model, config.execution.tp, self.batches.step_lengths, 1, config.reference_mode
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
            peak * dist.get_world_size(),
        )
        values["skipped"] = float(result.skipped)
        return values
