"""Periodic loss metrics on held-out pairs (every pair once, in a fixed order).

Evaluation can be long (a large held-out set), so it is interruptible: before each
micro-batch (with pipeline parallelism, each evaluation batch) every rank agrees whether to
stop (``run/preemption.py``); on SIGTERM the evaluation is abandoned and returns ``None``.
Ranks whose data-parallel share of a batch has fewer micro-batches still take part in every
agreement. The metrics are those of one pass over all micro-batches of a batch: the reports of
the separate forward calls are reduced over DP once per batch.
"""

from __future__ import annotations

from collections.abc import Callable

from megatron_adadpo.config import Config
from megatron_adadpo.resolve import ResolvedRun
from megatron_adadpo.run.batches import step_batches
from megatron_adadpo.run.metrics import accumulate_metrics
from megatron_adadpo.run.microbatch import MicroBatch
from megatron_adadpo.run.step import StepContext, eval_reports, reduce_reports


class Evaluator:
    """Forward-only loss metrics of ``min(len(dataset), eval.max_pairs)`` held-out pairs."""

    def __init__(
        self,
        config: Config,
        run: ResolvedRun,
        policy: list,
        reference,
        dataset,
        context: StepContext,
    ):
        self.config, self.run, self.policy, self.reference = config, run, policy, reference
        self.dataset, self.context = dataset, context
        pairs = min(len(dataset), config.eval.max_pairs or len(dataset))
        self.steps = max(1, pairs // config.train.global_batch_size)
        self.pipelined = config.execution.pp > 1  # one schedule call per batch fills the pipe

    def __call__(self, stop: Callable[[], bool] = lambda: False) -> dict | None:
        """``[sum, count]`` metric tensors over the evaluated pairs (last stage; else {}), or
        None when ``stop`` (a collective: every rank calls it equally often) said to stop."""
        parallel = self.context.parallel
        batches = step_batches(self.config, self.run, self.dataset, parallel, 0, drop_last=False)
        metrics = []
        for _ in range(self.steps):
            micro = batches.next_step()
            groups = [micro] if self.pipelined else [[m] for m in micro]
            rounds = 1 if self.pipelined else batches.step_micro_batches
            reports = []
            for i in range(rounds):
                if stop():
                    return None
                if i < len(groups):
                    reports += self._forward(groups[i])
            metrics.append(reduce_reports(reports, parallel.dp))
        return accumulate_metrics(m for m in metrics if m)

    def _forward(self, micro: list[MicroBatch]) -> list[dict]:
        if self.reference is not None:
            self.reference.attach(micro)
        return eval_reports(self.policy, micro, self.context)
