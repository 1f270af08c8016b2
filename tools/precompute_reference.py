#!/usr/bin/env python
"""Precompute reference log-probs for a run config (same launch as training: torchrun works).

    python tools/precompute_reference.py --config RUN.yaml --output DIR [--set key=value ...]

Then train with ``--set reference.mode=precomputed --set reference.path=DIR``. The reference
model is ``reference.checkpoint`` when set (a reference other than the policy's start), else
the policy's initial weights; DIR records which, and training checks it.
"""

import sys

from megatron_adadpo import cli
from megatron_adadpo.run.precompute import main

if __name__ == "__main__":
    sys.exit(cli.run(main))
