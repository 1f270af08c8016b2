"""Periodic loss metrics on held-out pairs (every pair once, in a fixed order)."""

from __future__ import annotations

from megatron_adadpo.config import Config
from megatron_adadpo.losses import accumulate_metrics
from megatron_adadpo.run.batches import step_batches
from megatron_adadpo.run.step import StepContext, evaluate


class Evaluator:
    """Forward-only loss metrics of ``min(len(dataset), eval.max_pairs)`` held-out pairs."""

    def __init__(
        self,
        config: Config,
        policy: list,
        reference,
        dataset,
        context: StepContext,
        dp: tuple[int, int],
        cp: tuple[int, int] = (0, 1),
    ):
        self.config, self.policy, self.reference = config, policy, reference
        self.dataset, self.context = dataset, context
        self.dp, self.cp = dp, cp  # (rank, size)
        pairs = min(len(dataset), config.eval.max_pairs or len(dataset))
        self.steps = max(1, pairs // config.train.global_batch_size)

    def __call__(self) -> dict:
        """``[sum, count]`` metric tensors over the evaluated pairs (last stage; else {})."""
        batches = step_batches(self.config, self.dataset, self.dp, 0, drop_last=False, cp=self.cp)
        metrics = []
        for _ in range(self.steps):
            micro = batches.next_step()
            if self.reference is not None:
                self.reference.attach(micro)
            metrics.append(evaluate(self.policy, micro, self.context))
        return accumulate_metrics(m for m in metrics if m)
