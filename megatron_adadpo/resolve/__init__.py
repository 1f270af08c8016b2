"""The resolve room: between the config and everything that runs (torch-free).

``resolve(config, world_size, machine) -> ResolvedRun`` (``resolver.py``) settles every rule
and every ``auto`` once; ``Machine`` (``platform/hardware.py``) is what a machine offers, probed
once by ``platform/machine.probe_machine`` or described by the planner. Rules, each written once:
``layout.py`` (layout and batch sizes), ``kernels.py`` (Transformer Engine, attention, FP8,
context parallelism), ``batching.py`` (micro-batching policy, packing format, token budget).
"""

from megatron_adadpo.platform.hardware import CPU, Machine
from megatron_adadpo.resolve.resolver import resolve, run_errors
from megatron_adadpo.resolve.run import ResolvedRun, RunRequest

__all__ = ["CPU", "Machine", "ResolvedRun", "RunRequest", "resolve", "run_errors"]
