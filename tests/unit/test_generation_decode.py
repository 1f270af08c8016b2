"""Generation asks the model for the last position's logits only, and greedy decoding with the KV
cache equals decoding without it.

Upstream rule: ``GPTModel`` given an ``inference_context`` whose config says
``materialize_only_last_token_logits`` (``StaticInferenceContext`` sets it: megatron-core 0.19.2
``inference/contexts/static_context.py`` line 20) runs its output layer on the last position
only, ``hidden_states[-1:]`` (0.19.2 ``models/gpt/gpt_model.py`` lines 739-745), but in 0.19.2
only while ``InferenceMode.is_active()`` (line 648); 0.16.1 asks ``inference_context is not None
and not self.training`` instead (``models/gpt/gpt_model.py`` lines 584 and 664). Without the
mode, 0.19.2 builds ``[b, s, v]`` logits for a whole prompt at every prefill.
"""

from __future__ import annotations

import pytest
import torch

from tests.launcher import run_ranks

PROMPTS = [[5, 17, 3, 99, 42, 8], [7, 7], [120, 4, 56], [9, 31, 2, 77]]
NEW_TOKENS = 5


def _greedy_without_cache(model, prompt: list[int], vocab_size: int) -> list[int]:
    """The reference: the whole sequence through the model at every step, argmax of the last
    position's logits (no inference context, no KV cache)."""
    ids = list(prompt)
    for _ in range(NEW_TOKENS):
        tokens = torch.tensor([ids])
        logits = model(tokens, torch.arange(len(ids))[None], None)
        ids.append(int(logits[0, -1, :vocab_size].argmax()))
    return ids[len(prompt) :]


def _decode(rank, world):
    from megatron_adadpo.generation.decode import SamplingConfig, generate
    from megatron_adadpo.layout import ExecutionConfig
    from tests.megatron_helpers import TINY, tiny_model

    (model,) = tiny_model(ExecutionConfig(transformer_impl="local"))
    shapes = []
    hook = model.register_forward_hook(lambda m, args, out: shapes.append(tuple(out.shape)))
    sampling = SamplingConfig(max_new_tokens=NEW_TOKENS, batch_size=len(PROMPTS))
    with torch.no_grad():
        batched = generate(model, PROMPTS, None, TINY.vocab_size, sampling)
        hook.remove()
        reference = [_greedy_without_cache(model, p, TINY.vocab_size) for p in PROMPTS]
    return {"batched": batched, "reference": reference, "shapes": shapes}


@pytest.mark.distributed
def test_generation_computes_last_position_logits_and_greedy_equals_no_cache_decoding():
    out = run_ranks(_decode, 1, timeout=240)[0]
    assert out["batched"] == out["reference"]
    b = len(PROMPTS)
    assert out["shapes"] and {(rows, seq) for rows, seq, _ in out["shapes"]} == {(b, 1)}
    first_feed = min(len(p) for p in PROMPTS)  # the prefill feeds this many positions
    assert first_feed > 1
