#!/usr/bin/env python
"""Precompute reference log-probs for a run config (same launch as training: torchrun works).

    python tools/precompute_reference.py --config RUN.yaml --output DIR [--set key=value ...]

Then train with ``--set reference.mode=precomputed --set reference.path=DIR``.
"""

import sys

from megatron_adadpo.precompute import precompute

if __name__ == "__main__":
    precompute(sys.argv[1:])
