"""Held-out evaluation of a policy in the running process: per-pair log-probs and greedy answers.

``HeldOut(config, path)`` tokenizes the held-out pairs once. ``pair_logps(policy, context, run)``
scores every pair with the policy through Megatron's schedule (the trainer's forward-only path,
``run.reference.attach_forward_logps``); ``greedy_answers(policy)`` decodes every held-out
prompt greedily (``megatron_adadpo.generation``, the code behind ``tools/generate.py``), and
``exact_match`` compares them with the ground-truth chosen answers.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from megatron_adadpo.config import Config
from megatron_adadpo.data import load_preference_dataset
from megatron_adadpo.data.tokenize import load_tokenizer
from megatron_adadpo.generation.decode import SamplingConfig, generate
from megatron_adadpo.generation.prompts import prompt_token_ids, read_prompts
from megatron_adadpo.platform.megatron import unwrap_model
from megatron_adadpo.run.batches import step_batches
from megatron_adadpo.run.reference import attach_forward_logps
from megatron_adadpo.run.step import StepContext

MAX_NEW_TOKENS = 24


class HeldOut:
    """The held-out pairs of ``path`` (jsonl: ``prompt``, ``chosen``, ``rejected``, ``task``)."""

    def __init__(self, config: Config, path: str | Path):
        self.config = config
        self.dataset = load_preference_dataset(config.data.replace(inputs=(str(path),)))
        self.prompts = read_prompts(path)
        self.tokenizer = load_tokenizer(config.data.tokenizer)
        self.prompt_ids = prompt_token_ids(self.tokenizer, self.prompts, config.data.chat_template)
        self.answers = [p.row["chosen"].strip() for p in self.prompts]
        self.tasks = [p.row["task"] for p in self.prompts]

    def pair_logps(self, policy: list, context: StepContext, run) -> np.ndarray:
        """``[N, 4]``: chosen / rejected summed log-probs and token counts, by pair id, batched
        as the resolved ``run`` (``Trainer.run``)."""
        batches = step_batches(self.config, run, self.dataset, context.parallel, 0, drop_last=False)
        out = np.full((len(self.dataset), 4), np.nan)
        for _ in range(math.ceil(len(self.dataset) / self.config.train.global_batch_size)):
            micro = batches.next_step()
            attach_forward_logps(policy, micro, context)
            for batch in micro:
                sums = batch.reference_logps.view(-1, 2).double().numpy()
                counts = batch.loss_mask.sum(1).view(-1, 2).double().numpy()
                out[batch.pair_ids.numpy()] = np.concatenate([sums, counts], axis=1)
        return out

    def greedy_answers(self, policy: list) -> list[str]:
        model = unwrap_model(policy[0])
        ids = generate(
            model,
            self.prompt_ids,
            self.tokenizer.eos_id,
            self.config.model.vocab_size,
            SamplingConfig(max_new_tokens=MAX_NEW_TOKENS, batch_size=64),
        )
        model.train()
        return [self.tokenizer.decode(x).strip() for x in ids]

    def exact_match(self, answers: list[str]) -> dict[str, float]:
        """Fraction of exact answers, overall (``all``) and per task."""
        hits = [a == b for a, b in zip(answers, self.answers, strict=True)]
        result = {"all": float(np.mean(hits))}
        for task in sorted(set(self.tasks)):
            mine = [h for h, t in zip(hits, self.tasks, strict=True) if t == task]
            result[task] = float(np.mean(mine))
        return result


def pair_summary(logps: np.ndarray, start: np.ndarray, family: str) -> dict[str, float]:
    """How a run moved the held-out pairs away from the SFT start.

    ``delta_*``: mean change of the per-token log-prob ``l / n`` of the chosen / rejected
    answers; ``both_fell``: fraction of pairs whose chosen and rejected log-probs both fell;
    ``reward_accuracy``: fraction of pairs whose chosen reward beats the rejected one, with the
    family's reward (DPO: ``h = l - l_sft``; SimPO: ``l / n``; SFT start: ``l / n``).

    Shapes: ``logps``, ``start`` ``[N, 4]`` (chosen sum, rejected sum, chosen n, rejected n).
    """
    per_token = logps[:, :2] / logps[:, 2:]
    delta = per_token - start[:, :2] / start[:, 2:]
    reward = logps[:, :2] - start[:, :2] if family == "dpo" else per_token
    return {
        "chosen_per_token": float(per_token[:, 0].mean()),
        "rejected_per_token": float(per_token[:, 1].mean()),
        "delta_chosen": float(delta[:, 0].mean()),
        "delta_rejected": float(delta[:, 1].mean()),
        "both_fell": float((delta < 0).all(axis=1).mean()),
        "reward_accuracy": float((reward[:, 0] > reward[:, 1]).mean()),
    }
