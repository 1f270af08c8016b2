"""Reference log-probs: a resident frozen model, the policy with its LoRA adapters off, or
values precomputed once to disk.

Each attaches ``MicroBatch.reference_logps`` (``[2B]`` fp32, ``[c0, r0, c1, r1, ...]``) to the
micro-batches of a step, on the last pipeline stage where the policy loss is computed.
Precomputed files (``tools/precompute_reference.py``) hold per-pair summed completion log-probs
``[N, 2]`` (chosen, rejected) indexed by ``pair_id``, tied to the dataset's manifest identity
(a file made for other data or another tokenisation is refused here) and to the reference model
(``reference.checkpoint`` or the policy's start; checked by the trainer:
``run/state/consistency.py``).
"""

from __future__ import annotations

import json
import os
from functools import partial
from pathlib import Path

import numpy as np
import torch

from megatron_adadpo.model.lora import adapters_disabled
from megatron_adadpo.platform.megatron import unwrap_model
from megatron_adadpo.platform.safe_pickle import load_npy
from megatron_adadpo.run.microbatch import MicroBatch
from megatron_adadpo.run.sequences import sequence_sums
from megatron_adadpo.run.state.run_dir import durable_temp, fsync_directory
from megatron_adadpo.run.step import StepContext, output_layer_for, policy_forward, run_schedule

VALUES_FILE = "reference_logps.npy"
META_FILE = "meta.json"


def _reference_loss_func(
    context: StepContext, batch: MicroBatch, output_layer, output: torch.Tensor
):
    sums, _ = sequence_sums(output, batch, context, output_layer)
    zero = torch.zeros((), device=sums.device)
    return zero, torch.zeros((), dtype=torch.int), {"reference_logps": sums.detach()}


def _reference_forward_step(context: StepContext, data_iterator, model):
    batch = next(data_iterator)
    with torch.no_grad():
        output = policy_forward(model, batch, context)
    layer = output_layer_for(model, context)
    return output, partial(_reference_loss_func, context, batch, layer)


def attach_forward_logps(chunks: list, batches: list[MicroBatch], context: StepContext) -> None:
    """Run ``chunks`` forward-only (no saved activations) on ``batches`` through Megatron's
    schedule and store each micro-batch's sequence sums as its ``reference_logps`` (on the
    last pipeline stage; the reports are empty elsewhere)."""
    step = partial(_reference_forward_step, context)
    outputs = run_schedule(chunks, batches, step, forward_only=True)
    for batch, out in zip(batches, outputs, strict=False):
        batch.reference_logps = out["reference_logps"]


def freeze(chunks: list) -> list:
    """Eval mode, no gradients: a model that is only ever run forward."""
    for chunk in chunks:
        chunk.eval()
        chunk.requires_grad_(False)
    return chunks


class ResidentReference:
    """A frozen model with the policy's layout, forward-only: a copy of the policy's initial
    weights, or the weights already in ``chunks`` (``reference.checkpoint``)."""

    def __init__(self, chunks: list, policy: list | None, context: StepContext):
        """``chunks``: model chunks of the policy's layout; overwritten with ``policy``'s
        weights, or kept as they are when ``policy`` is None."""
        self.context = context
        with torch.no_grad():
            for ref, pol in zip(chunks, policy or (), strict=False):
                ref.load_state_dict(unwrap_model(pol).state_dict(), strict=True)
        self.chunks = freeze(chunks)

    def attach(self, batches: list[MicroBatch]) -> None:
        attach_forward_logps(self.chunks, batches, self.context)

    def sync(self, policy: list, alpha: float) -> None:
        """TR-DPO's update from the policy (``mix_parameters``); ``policy``'s parameters must be
        current (the caller forces overlapped parameter gathers first)."""
        for ref, pol in zip(self.chunks, policy, strict=True):
            mix_parameters(ref, unwrap_model(pol), alpha)


def mix_parameters(target: torch.nn.Module, source: torch.nn.Module, alpha: float) -> None:
    """TR-DPO (arXiv 2404.09656; TRL ``SyncRefModelCallback``): every parameter
    ``ref <- alpha * policy + (1 - alpha) * ref``, computed in fp32 or wider and stored in the
    parameter's dtype; ``alpha = 1`` is a hard copy. Shard-local: ``target`` and ``source``
    are the same model chunk at the same layout (TP / PP shards, the tied output weight's copy
    on the last stage), parameter for parameter by name.

    Shapes: every parameter of ``target`` has its ``source`` namesake's shape (this rank's
    shard).
    """
    sources = dict(source.named_parameters())
    with torch.no_grad():
        for name, ref in target.named_parameters():
            pol = sources[name]
            if alpha == 1.0:
                ref.copy_(pol)
                continue
            wide = torch.promote_types(ref.dtype, torch.float32)
            mixed = ref.to(wide).mul_(1.0 - alpha).add_(pol.to(wide), alpha=alpha)
            ref.copy_(mixed)


class AdaptersOffReference:
    """The base model for free: the policy's own chunks run forward-only (``no_grad``, eval
    mode) with every LoRA adapter off, on the step's micro-batches before its training pass.
    No second model; the frozen base is exactly the starting model."""

    def __init__(self, chunks: list, context: StepContext):
        """``chunks``: the policy's model chunks (DDP-wrapped or not) holding the adapters."""
        self.chunks, self.context = chunks, context

    def attach(self, batches: list[MicroBatch]) -> None:
        training = [chunk.training for chunk in self.chunks]
        for chunk in self.chunks:
            chunk.eval()
        try:
            with adapters_disabled(self.chunks):
                attach_forward_logps(self.chunks, batches, self.context)
        finally:
            for chunk, mode in zip(self.chunks, training, strict=True):
                chunk.train(mode)


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
        self.values = load_npy(path / VALUES_FILE, mmap_mode="r")

    def attach(self, batches: list[MicroBatch]) -> None:
        for batch in batches:
            rows = self.values[batch.pair_ids.cpu().numpy()]  # [B, 2] (chosen, rejected)
            ref = torch.from_numpy(np.ascontiguousarray(rows, dtype=np.float32)).reshape(-1)
            batch.reference_logps = ref.to(batch.tokens.device)  # [c0, r0, c1, r1, ...]


def write_precomputed(
    path: str | Path, values: np.ndarray, dataset_identity: str, extra: dict
) -> None:
    """Write ``[N, 2]`` reference sums and their metadata so that a reader finds the previous
    pair of files, the new pair, or no ``meta.json`` (refused), never a part or a mix: both are
    written to fsynced temporary files first, then the old ``meta.json`` is removed, the values
    renamed into place and ``meta.json`` last. A failed write (a full disk) raises ``ValueError``
    naming the file and leaves the previous files as they were.
    """
    path = Path(path)
    meta = {"dataset_identity": dataset_identity, "num_pairs": int(values.shape[0]), **extra}
    staged = []
    try:
        path.mkdir(parents=True, exist_ok=True)
        staged.append(durable_temp(path / VALUES_FILE, partial(_save_npy, values)))
        text = json.dumps(meta, indent=2).encode()
        staged.append(durable_temp(path / META_FILE, lambda handle: handle.write(text)))
        (path / META_FILE).unlink(missing_ok=True)
        for tmp, name in zip(staged, (VALUES_FILE, META_FILE), strict=True):
            os.replace(tmp, path / name)
        fsync_directory(path)
    except OSError as err:
        for tmp in staged:
            tmp.unlink(missing_ok=True)
        raise ValueError(
            f"cannot write {err.filename or path} ({err.strerror or err}); free space there or "
            "choose another --output, then run tools/precompute_reference.py again"
        ) from err


def _save_npy(values: np.ndarray, handle) -> None:
    np.save(handle, values.astype(np.float32), allow_pickle=False)
