"""Reference log-probs: a resident frozen model, or values precomputed once to disk.

Precomputed files (``tools/precompute_reference.py``) hold per-pair summed completion log-probs
``[N, 2]`` (chosen, rejected) indexed by ``pair_id``, tied to the dataset's manifest identity:
a file made for other data or another tokenisation is refused.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from megatron_adadpo.checkpointing import _unwrap
from megatron_adadpo.model import ExecutionConfig, build_model
from megatron_adadpo.model_config import ModelConfig
from megatron_adadpo.step import attach_resident_reference

VALUES_FILE = "reference_logps.npy"
META_FILE = "meta.json"


class ResidentReference:
    """A frozen copy of the policy's initial weights with the same layout, forward-only."""

    def __init__(self, model: ModelConfig, run: ExecutionConfig, policy: list):
        self.vocab_size = model.vocab_size
        self.chunks = build_model(model, run)
        with torch.no_grad():
            for ref, pol in zip(self.chunks, policy, strict=True):
                ref.load_state_dict(_unwrap(pol).state_dict(), strict=True)
        for chunk in self.chunks:
            chunk.eval()
            chunk.requires_grad_(False)

    def attach(self, batches: list[dict]) -> None:
        attach_resident_reference(self.chunks, batches, self.vocab_size)


class PrecomputedReference:
    """Looks reference sums up by pair id; holds no model."""

    def __init__(self, path: str | Path, dataset_identity: str):
        path = Path(path)
        meta_path = path / META_FILE
        if not meta_path.is_file():
            raise FileNotFoundError(
                f"{meta_path} not found: run tools/precompute_reference.py --output {path} first"
            )
        meta = json.loads(meta_path.read_text())
        if meta["dataset_identity"] != dataset_identity:
            raise ValueError(
                f"{path} was precomputed for dataset {meta['dataset_identity'][:16]}..., but the "
                f"training data is {dataset_identity[:16]}... (another file, tokenizer or "
                "truncation setting); re-run tools/precompute_reference.py for this data"
            )
        self.meta = meta
        self.values = np.load(path / VALUES_FILE, mmap_mode="r")

    def attach(self, batches: list[dict]) -> None:
        for batch in batches:
            rows = self.values[batch["pair_ids"].cpu().numpy()]  # [B, 2] (chosen, rejected)
            ref = torch.from_numpy(np.ascontiguousarray(rows, dtype=np.float32)).reshape(-1)
            batch["reference_logps"] = ref.to(batch["tokens"].device)  # [c0, r0, c1, r1, ...]


def write_precomputed(
    path: str | Path, values: np.ndarray, dataset_identity: str, extra: dict
) -> None:
    """Write ``[N, 2]`` reference sums and their metadata (values first, meta last)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    np.save(path / VALUES_FILE, values.astype(np.float32))
    meta = {"dataset_identity": dataset_identity, "num_pairs": int(values.shape[0]), **extra}
    (path / META_FILE).write_text(json.dumps(meta, indent=2))
