"""SIGTERM (Slurm preemption, ``scancel``): stop at the next bounded point, save, exit 0.

``Preemption`` only records the signal; stopping is decided collectively, because the ranks
receive it at different moments: every point where the run may stop asks all ranks at once
(``any_rank``: one MIN all-reduce of ``[not requested]``) and all stop together. The points:

- a training step, after its forward / backward and before the optimizer step
  (``step.train_step``, in the step's one agreement all-reduce): the step completes;
- every evaluation micro-batch, before its reference and policy forward (with pipeline
  parallelism every evaluation batch) (``evaluation.Evaluator``): the evaluation is
  abandoned, the checkpoint records it as pending and the resumed run evaluates first;
- after a periodic save: the run leaves at once (it has just saved; with
  ``checkpoint.async_save`` once the write in flight is published:
  ``run/state/checkpoint_writer.py``).

So the time from SIGTERM to exit is at most one training step (or one evaluation micro-batch),
one save and the teardown; ``docs/troubleshooting.md`` gives the measured numbers and the grace
time to ask of Slurm.
"""

from __future__ import annotations

import signal

import torch
import torch.distributed as dist

from megatron_adadpo.platform.machine import torch_device


class Preemption:
    """Records SIGTERM while installed (``with Preemption() as p``); ``p()`` is the flag."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self) -> Preemption:
        self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        previous = self._previous  # None: installed outside Python; restore the default
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)

    def __call__(self) -> bool:
        return self.requested

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def agreed(self) -> bool:
        """Collective: True when any rank has received SIGTERM."""
        return any_rank(self.requested)


def any_rank(flag: bool) -> bool:
    """Collective over every rank: True when ``flag`` is set on at least one."""
    keep_going = torch.tensor([0.0 if flag else 1.0], device=torch_device())
    dist.all_reduce(keep_going, op=dist.ReduceOp.MIN)
    return keep_going.item() == 0.0
