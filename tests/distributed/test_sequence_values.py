"""The step's per-token -> per-sequence values (``run/sequences.py``) against an fp64 reference
written here from the raw pairs (no batch layout, full vocabulary): LD-DPO's weighted sums
(TRL's ``shared + ld_alpha * tail``) and their weight gradient, WPO's per-sequence mean of
``log p_t - log sum_v p_v^2``, ``entropy`` and ``mean_token_accuracy`` (TRL's definitions) -- on
every layout the log-probs run on: TP1, TP2 (vocab-parallel logits), TP2 + sequence parallel
chunked, CP2 (zigzag split), packed rows, packed + CP2, chunked packed."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist

from megatron_adadpo.chunked_logprobs import OutputLayer
from megatron_adadpo.data.collate import collate_pairs
from megatron_adadpo.data.packing import collate_packed
from megatron_adadpo.layout import ExecutionConfig
from megatron_adadpo.losses import LossConfig
from megatron_adadpo.platform import distributed as parallel
from megatron_adadpo.run.microbatch import MicroBatch
from megatron_adadpo.run.sequences import (
    logit_metrics,
    sequence_values,
    step_stats,
    wpo_weight_logps,
)
from tests.launcher import run_ranks

pytestmark = pytest.mark.distributed

VOCAB, PADDED, H, ALPHA = 50, 64, 16, 0.3
# (prompt, chosen, rejected) completion lengths: longer chosen, longer rejected, equal
SHAPES = [(3, 7, 4), (2, 3, 9), (4, 5, 5), (1, 1, 6)]


def _weights():
    g = torch.Generator().manual_seed(4)
    embedding = torch.randn(VOCAB, H, generator=g, dtype=torch.float64)  # hidden = E[token]
    weight = torch.randn(PADDED, H, generator=g, dtype=torch.float64) * 0.8
    upstream = torch.randn(2 * len(SHAPES), generator=g, dtype=torch.float64)  # d obj / d sums
    return embedding, weight, upstream


def _examples():
    rng = np.random.default_rng(8)
    embedding, weight, _ = _weights()
    top = (embedding @ weight[:VOCAB].t()).argmax(-1).numpy()  # next token = arg-max: hits
    out = []
    for i, (p, c, r) in enumerate(SHAPES):
        ids = [rng.integers(1, VOCAB, p + c).tolist(), rng.integers(1, VOCAB, p + r).tolist()]
        ids[1][:p] = ids[0][:p]
        for seq in ids:
            for t in range(p, len(seq), 3):
                seq[t] = int(top[seq[t - 1]])
        out.append({"chosen_ids": ids[0], "rejected_ids": ids[1], "prompt_length": p, "pair_id": i})
    return out


def _reference():
    """Per sequence ``[c0, r0, ...]``: LD sums, WPO mean, entropy and hit sums; dW of
    ``sum_i upstream_i * ld_sum_i``; all fp64 over the true vocabulary."""
    embedding, weight, upstream = _weights()
    w = weight.clone().requires_grad_()
    rows = {"ld": [], "wpo": [], "entropy": [], "hits": [], "counts": []}
    for ex in _examples():
        p = ex["prompt_length"]
        n = [len(ex["chosen_ids"]) - p, len(ex["rejected_ids"]) - p]
        shared = min(n)
        for ids in (ex["chosen_ids"], ex["rejected_ids"]):
            ids = torch.tensor(ids)
            logits = embedding[ids[p - 1 : -1]] @ w[:VOCAB].t()  # predicts ids[p:]
            logp_all = torch.log_softmax(logits, -1)
            logp = logp_all.gather(-1, ids[p:, None])[:, 0]
            scale = torch.tensor([1.0 if k < shared else ALPHA for k in range(len(logp))])
            rows["ld"].append((logp * scale.double()).sum())
            prob = logp_all.detach().exp()
            rows["wpo"].append((logp.detach() - prob.square().sum(-1).log()).mean())
            rows["entropy"].append(-(prob * logp_all.detach()).sum())
            rows["hits"].append((logits.detach().argmax(-1) == ids[p:]).double().sum())
            rows["counts"].append(float(len(logp)))
    ref = {k: torch.stack(v) if k != "counts" else torch.tensor(v) for k, v in rows.items()}
    (ref["ld"] * upstream).sum().backward()
    ref["ld"] = ref["ld"].detach()
    ref["grad"] = w.grad
    return ref


def _rank(rank, world, tp, cp, packed, chunk, sequence_parallel):
    groups = parallel.init_model_parallel(
        ExecutionConfig(tp=tp, cp=cp, sequence_parallel=sequence_parallel)
    )  # the Parallel value
    embedding, weight, upstream = _weights()
    examples = _examples()
    whole = collate_packed(examples, 0, 1, 2 * cp) if packed else collate_pairs(examples, 0, 8)
    batch = MicroBatch.from_collated(whole, "mask" if packed else None)
    batch = batch.on_cp_rank(groups.cp_rank, cp)
    tp_rank = groups.tp_rank
    w = weight.float().chunk(tp, 0)[tp_rank].clone().requires_grad_()
    hidden = embedding.float()[batch.tokens].transpose(0, 1)  # [s, b, h]
    if chunk:
        if sequence_parallel:
            hidden = hidden.chunk(tp, 0)[tp_rank]
        output, layer = hidden, OutputLayer(w, sequence_parallel)
    else:
        output, layer = torch.einsum("sbh,vh->bsv", hidden, w), None
    loss = LossConfig(name="dpo", ld_alpha=ALPHA, use_weighting=True)
    context = SimpleNamespace(
        loss=loss, vocab_size=VOCAB, parallel=groups, logprob_chunk_tokens=chunk, token_metrics=True
    )
    values = sequence_values(output, batch, context, layer, step_stats(context))
    (values.sums * upstream.float()).sum().backward()
    grad = w.grad.clone()
    dist.all_reduce(grad, group=groups.cp)  # each CP rank: cp x its tokens' share
    return {
        "ld": values.sums.detach(),
        "counts": values.counts,
        "wpo": wpo_weight_logps(values, batch, context),
        "metrics": logit_metrics(values, batch, context),
        "grad": grad / cp,
    }


LAYOUTS = {  # name: (tp, cp, packed, chunk tokens, sequence parallel)
    "tp1": (1, 1, False, 0, False),
    "tp2": (2, 1, False, 0, False),
    "tp2_sp_chunked": (2, 1, False, 5, True),
    "cp2": (1, 2, False, 0, False),
    "packed": (1, 1, True, 0, False),
    "packed_cp2": (1, 2, True, 0, False),
    "packed_chunked_tp2": (2, 1, True, 7, False),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_layout_matches_fp64_reference(layout):
    tp, cp, packed, chunk, sp = LAYOUTS[layout]
    ref = _reference()
    plain = torch.tensor([float(n) for n in ref["counts"]])
    assert ref["hits"].sum() > 0 and (ref["hits"] < plain).any()  # accuracy strictly in (0, 1)
    assert (ref["ld"] - _plain_sums()).abs().min() == 0  # equal lengths: nothing scaled
    assert (ref["ld"] - _plain_sums()).abs().max() > 0.1  # the longer answers' tails scaled
    for rank, got in enumerate(run_ranks(_rank, tp * cp, tp, cp, packed, chunk, sp)):
        assert torch.equal(got["counts"], ref["counts"].float())
        torch.testing.assert_close(got["ld"].double(), ref["ld"], atol=2e-5, rtol=1e-6)
        torch.testing.assert_close(got["wpo"].double(), ref["wpo"], atol=2e-6, rtol=1e-6)
        grad_ref = ref["grad"].chunk(tp, 0)[rank % tp]
        torch.testing.assert_close(got["grad"].double(), grad_ref, atol=2e-5, rtol=1e-5)
        entropy = got["metrics"]["entropy"].double()
        counts = ref["counts"]
        want = torch.stack([ref["entropy"].sum(), counts.sum()])
        torch.testing.assert_close(entropy, want, atol=2e-5, rtol=1e-6)
        accuracy = got["metrics"]["mean_token_accuracy"].double()
        assert torch.equal(accuracy, torch.stack([ref["hits"][0::2].sum(), counts[0::2].sum()]))


def _plain_sums():
    """The unweighted completion sums ``[c0, r0, ...]`` (fp64)."""
    embedding, weight, _ = _weights()
    out = []
    for ex in _examples():
        p = ex["prompt_length"]
        for ids in (ex["chosen_ids"], ex["rejected_ids"]):
            ids = torch.tensor(ids)
            logits = embedding[ids[p - 1 : -1]] @ weight[:VOCAB].t()
            out.append(torch.log_softmax(logits, -1).gather(-1, ids[p:, None]).sum())
    return torch.stack(out)


def _loss_func_rank(rank, world):
    """``step.loss_func`` with ``preference_loss`` recorded: what it is handed."""
    from megatron_adadpo.run import step

    groups = parallel.init_model_parallel(ExecutionConfig())
    embedding, weight, _ = _weights()
    batch = MicroBatch.from_collated(collate_pairs(_examples(), 0, 8))
    logits = embedding.float()[batch.tokens] @ weight.float().t()  # [b, s, v]
    loss = LossConfig(name="cpo", ld_alpha=ALPHA, use_weighting=True)
    context = step.StepContext(loss, VOCAB, groups)
    seen = {}

    def recorded(config, chosen, rejected, chosen_lengths, rejected_lengths, **kwargs):
        seen.update(kwargs, chosen=chosen, rejected=rejected)
        return torch.zeros_like(chosen), {
            "loss": torch.stack([chosen.sum() * 0, chosen_lengths.sum()])
        }

    step.preference_loss = recorded  # this forked rank only
    step.loss_func(context, batch, logits)
    return {k: v.detach() if v is not None else None for k, v in seen.items()}


def test_loss_func_hands_the_loss_ld_sums_plain_nll_and_wpo_weights():
    """The pair scores are LD-DPO's sums, CPO's NLL the unweighted per-token mean (TRL's
    ``sft`` term uses the raw per-token log-probs), WPO's weights the per-sequence means."""
    ref = _reference()
    got = run_ranks(_loss_func_rank, 1)[0]
    counts = ref["counts"]
    torch.testing.assert_close(got["chosen"].double(), ref["ld"][0::2], atol=2e-5, rtol=1e-6)
    torch.testing.assert_close(got["rejected"].double(), ref["ld"][1::2], atol=2e-5, rtol=1e-6)
    nll = -_plain_sums()[0::2] / counts[0::2]
    torch.testing.assert_close(got["chosen_nll"].double(), nll, atol=2e-6, rtol=1e-6)
    for side, rows in (("chosen", slice(0, None, 2)), ("rejected", slice(1, None, 2))):
        want = ref["wpo"][rows]
        torch.testing.assert_close(got[f"{side}_weight_logps"].double(), want, atol=2e-6, rtol=0)
