"""Batched generation on a Megatron ``GPTModel`` with Megatron-Core's KV cache.

Prompts of a batch differ in length. As Megatron-LM's static-batching generation does, the
batch is run from its shortest prompt: the first forward fills the KV cache
(``StaticInferenceContext``) with the first ``min(len)`` tokens of every row, then each step
feeds one token per row: the row's own next prompt token while its prompt lasts (its sampled
token is discarded), else the token just chosen. Causal attention makes every row's logits
exactly those of its own sequence, so greedy output equals a one-prompt-at-a-time decode (and
``transformers`` ``generate`` on the exported model). Prompts are sorted by length first so that
batches mix similar lengths. A row stops at EOS or after ``max_new_tokens``. Every forward runs
in Megatron's inference mode (``platform.megatron.inference_mode``), where the model computes
the logits of the last position only (``[b, 1, v]``), never the whole prompt's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm import tqdm

from megatron_adadpo.platform.megatron import StaticInferenceContext, inference_mode


@dataclass(frozen=True)
class SamplingConfig:
    """How to pick tokens. ``temperature == 0``: greedy (argmax), deterministic.

    ``temperature > 0``: sample from ``softmax(logits / temperature)`` with a generator seeded
    by ``seed`` (the same prompts, settings and seed give the same outputs).
    """

    max_new_tokens: int = 256
    temperature: float = 0.0
    seed: int = 1234
    batch_size: int = 16

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens {self.max_new_tokens}: use an int >= 1")
        if not self.temperature >= 0.0:
            raise ValueError(f"--temperature {self.temperature}: use 0 (greedy) or a float > 0")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size {self.batch_size}: use an int >= 1")


def generate(
    model: torch.nn.Module,
    prompts: list[list[int]],
    eos_id: int | None,
    vocab_size: int,
    sampling: SamplingConfig,
    progress: bool = False,
) -> list[list[int]]:
    """The generated token ids of every prompt (EOS excluded), in the order of ``prompts``.

    ``vocab_size``: the model's true vocabulary; the rows Megatron pads it with are never
    chosen. ``model``: one TP1 / PP1 ``GPTModel`` chunk (put in eval mode here). ``progress``:
    a progress bar over the prompts.
    """
    model.eval()
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(sampling.seed)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    outputs: list[list[int]] = [[] for _ in prompts]
    bar = tqdm(total=len(prompts), desc="generating", unit="prompt", disable=not progress)
    for begin in range(0, len(order), sampling.batch_size):
        rows = order[begin : begin + sampling.batch_size]
        batch = [prompts[i] for i in rows]
        done = _generate_batch(model, batch, eos_id, vocab_size, sampling, generator)
        for i, ids in zip(rows, done, strict=True):
            outputs[i] = ids
        bar.update(len(rows))
    bar.close()
    return outputs


@torch.no_grad()
def _generate_batch(model, prompts, eos_id, vocab_size, sampling, generator) -> list[list[int]]:
    """One static batch (module docstring). Shapes: tokens / positions ``[b, S]``."""
    device = next(model.parameters()).device
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    total = int(lengths.max()) + sampling.max_new_tokens
    tokens = torch.zeros(len(prompts), total, dtype=torch.long, device=device)
    for row, ids in enumerate(prompts):
        tokens[row, : len(ids)] = torch.tensor(ids, device=device)
    positions = torch.arange(total, device=device).expand(len(prompts), total)
    context = StaticInferenceContext(len(prompts), total)
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    fed = 0
    for pos in range(int(lengths.min()), total):
        with inference_mode():
            logits = model(
                tokens[:, fed:pos],
                positions[:, fed:pos],
                None,
                inference_context=context,
                runtime_gather_output=True,
            )  # [b, 1, padded vocab]: the last position's logits only
        context.increment_sequence_len_offset(pos - fed)
        context.enable_decode_mode()
        fed = pos
        chosen = _pick(logits[:, -1, :vocab_size].float(), sampling.temperature, generator)
        in_prompt = pos < lengths
        tokens[:, pos] = torch.where(in_prompt | done, tokens[:, pos], chosen)
        new = ~in_prompt & ~done
        if eos_id is not None:
            done |= new & (chosen == eos_id)
        done |= pos + 1 - lengths >= sampling.max_new_tokens
        if bool(done.all()):
            break
    limit = sampling.max_new_tokens
    return [
        _completion(tokens[row, n : n + limit], eos_id) for row, n in enumerate(lengths.tolist())
    ]


def _pick(logits: torch.Tensor, temperature: float, generator: torch.Generator) -> torch.Tensor:
    """Next token per row: argmax, or a sample at ``temperature``. Shapes: ``[b, v]`` -> ``[b]``."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def _completion(ids: torch.Tensor, eos_id: int | None) -> list[int]:
    """Generated ids up to (not including) the first EOS. Shapes: ``ids`` ``[n]``."""
    out = ids.tolist()
    if eos_id is not None and eos_id in out:
        out = out[: out.index(eos_id)]
    return out
