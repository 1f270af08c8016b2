"""AdaDPO / DPO-family training with Megatron-Core.

    torchrun --nproc-per-node N -m megatron_adadpo.train --config FILE.yaml [--set a.b=c ...]

Parse -> validate the config (before any allocation) -> start the process group -> open the
run (``megatron_adadpo.run.trainer.open_run``: resolved once on this world size and machine,
``megatron_adadpo.resolve``; a ``Trainer``, or the finished run) -> train. A config or data
error prints one line and exits with status 2.
"""

from __future__ import annotations

import argparse
import sys

from megatron_adadpo import cli
from megatron_adadpo.config import load_config


def main(argv: list[str] | None = None) -> None:
    # Torch and Megatron are imported here, not with the module: the checkpoint writer's
    # helper process (a ``multiprocessing`` spawn, started by the first save) re-imports this
    # module, and must start in a moment even when that save is the one SIGTERM asked for.
    from megatron_adadpo.platform import cpu
    from megatron_adadpo.platform.distributed import destroy, init_distributed
    from megatron_adadpo.run.trainer import open_run

    args = parse_args(argv)
    config = load_config(args.config, args.set)  # every config check before any allocation
    cpu.activate()  # Megatron on a machine without CUDA; a no-op on GPU hosts
    init_distributed(config.train.distributed_timeout_minutes)
    run = open_run(config)  # resolved once; a Trainer, or the FinishedRun that says so
    run.train()
    destroy()
    if run.preempted:  # saved on SIGTERM: leave inside the grace time (cli.leave_now)
        cli.leave_now()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="YAML run configuration")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set loss.beta=0.05 (repeatable)",
    )
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(cli.run(main))
