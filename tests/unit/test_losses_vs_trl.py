"""TRL 1.16.0 as the oracle: for every loss option both have, the per-pair losses, the metrics
(rewards, margins, accuracies, log-probs) and the gradients w.r.t. the per-token log-probs equal
TRL's ``DPOTrainer._compute_loss`` on the same inputs.

TRL's loss is called unbound, on a stand-in ``self`` (the attributes ``_compute_loss`` reads) and
a stand-in model whose fused LM head returns the given per-token log-probs (and WPO's
``log sum_v p_v^2``), with precomputed reference log-probs: TRL's own loss code runs, nothing of
it is copied here. TRL is a test-only dependency; without it these tests skip with the reason.
"""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from megatron_adadpo.losses import LossConfig, preference_loss

trl_dpo = pytest.importorskip(
    "trl.trainer.dpo_trainer", reason="trl (test-only oracle) is not installed"
)

F64, B, S = torch.float64, 5, 24
TRL_NAMES = {"sigmoid": "dpo"}  # TRL loss_type -> loss.name (the others share TRL's name)
F_DIVERGENCE_TYPES = ("sigmoid", "ipo", "hinge", "robust", "exo_pair", "discopop", "sigmoid_norm")
LABEL_SMOOTHING = {"robust": 0.1, "exo_pair": 1e-3, "aot": 0.1, "aot_unpaired": 0.1}


def make_batch(seed, equal_chosen_lengths=False, dtype=F64):
    """Token-level inputs: ``[chosen x B; rejected x B]`` rows of length S, completion masks after
    a prompt, per-token log-probs (a leaf: the gradients are compared w.r.t. it)."""
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(2, 6, (2 * B,), generator=g)
    length = torch.randint(3, S - 7, (2 * B,), generator=g)
    if equal_chosen_lengths:
        length[:B] = 9
    pos = torch.arange(S)
    completion = (pos >= prompt[:, None]) & (pos < (prompt + length)[:, None])
    shift = completion[:, 1:].to(dtype)  # TRL scores token t+1 from position t
    leaf = (-(0.2 + 2 * torch.rand(2 * B, S - 1, generator=g, dtype=F64))).to(dtype)
    leaf.requires_grad_()
    logps = leaf * shift  # a model's log-prob of an ignored label (-100) is a constant 0
    ref = (logps.detach().sum(1) + torch.randn(2 * B, generator=g, dtype=F64)).to(dtype)
    lssp = (-0.3 - torch.rand(2 * B, S - 1, generator=g, dtype=F64)).to(dtype)
    return {
        "completion_mask": completion.long(),
        "shift": shift,
        "leaf": leaf,
        "logps": logps,
        "ref": ref,
        "log_sum_sq_probs": lssp,
    }


def stand_in_trainer(model, loss_types, beta, weights=None, **args):
    """The attributes TRL 1.16.0's ``DPOTrainer._compute_loss`` reads, with precomputed
    reference log-probs and one process (the accelerator's gathers are identities)."""
    return SimpleNamespace(
        model=model,
        accelerator=SimpleNamespace(
            device=torch.device("cpu"), gather_for_metrics=lambda t: t, gather=lambda t: t
        ),
        aux_loss_enabled=False,
        precompute_ref_logps=True,
        ld_alpha=None,
        f_divergence_type=args.get("f_divergence_type", "reverse_kl"),
        f_alpha_divergence_coef=args.get("f_alpha_divergence_coef", 0.5),
        beta=beta,
        loss_types=list(loss_types),
        loss_weights=weights or [1.0] * len(loss_types),
        label_smoothing=args.get("label_smoothing", 0.0),
        use_weighting=args.get("use_weighting", False),
        args=SimpleNamespace(discopop_tau=args.get("discopop_tau", 0.05)),
        _metrics={"train": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )


def trl_loss(loss_types, batch, beta=0.1, weights=None, **args):
    """TRL 1.16.0's ``_compute_loss`` on ``batch``: ``(loss, metrics)``."""
    n = batch["logps"].shape[0] // 2
    seq = batch["logps"]
    outputs = SimpleNamespace(
        log_probs=seq,
        entropy=torch.zeros_like(seq),
        mean_logits=torch.zeros_like(seq),
        is_top1=torch.zeros_like(seq, dtype=torch.bool),
        log_sum_sq_probs=batch["log_sum_sq_probs"],
    )
    this = stand_in_trainer(SimpleNamespace(training=True), loss_types, beta, weights, **args)
    mask = batch["completion_mask"]
    inputs = {
        "input_ids": torch.ones_like(mask),
        "attention_mask": torch.ones_like(mask),
        "completion_mask": mask,
        "ref_chosen_logps": batch["ref"][:n],
        "ref_rejected_logps": batch["ref"][n:],
    }
    call = lambda **kw: outputs  # noqa: E731  the fused LM head's outputs
    loss = trl_dpo.DPOTrainer._compute_loss(this, call, inputs, False)
    return loss, {k: v[-1] for k, v in this._metrics["train"].items()}


def our_loss(config, batch):
    """``preference_loss`` on the same inputs: ``(per-pair losses, metric means)``."""
    n = batch["logps"].shape[0] // 2
    shift, logps = batch["shift"], batch["logps"]
    sums, counts = logps.sum(1), shift.sum(1)
    extra = {}
    if config.use_weighting:  # WPO's per-sequence mean of log p_t - log sum_v p_v^2
        mean = ((logps - batch["log_sum_sq_probs"]) * shift).sum(1) / counts
        extra = {"chosen_weight_logps": mean[:n], "rejected_weight_logps": mean[n:]}
    losses, metrics = preference_loss(
        config,
        sums[:n],
        sums[n:],
        counts[:n],
        counts[n:],
        reference_chosen_logps=batch["ref"][:n],
        reference_rejected_logps=batch["ref"][n:],
        chosen_nll=-sums[:n] / counts[:n],
        **extra,
    )
    return losses, {k: v[0] / v[1] for k, v in metrics.items()}


def assert_same(trl_types, config, batch, atol=1e-10, **trl_args):
    """Mean loss, gradients w.r.t. the per-token log-probs and metrics equal TRL's.

    exo_pair: TRL takes ``log(1 - eps)`` of an fp32 tensor, so it agrees to ~1e-8 only."""
    if "exo_pair" in trl_types:
        atol = 1e-7
    want, trl_metrics = trl_loss(trl_types, batch, beta=config.beta, **trl_args)
    losses, metrics = our_loss(config, batch)
    got = losses.mean()  # every pair valid: the mean over pairs
    if config.normalizer == "tokens":  # sft: over the chosen completion tokens
        got = losses.sum() / batch["shift"][: batch["shift"].shape[0] // 2].sum()
    torch.testing.assert_close(got, want, rtol=atol, atol=atol)
    (g_want,) = torch.autograd.grad(want, batch["leaf"], retain_graph=True)
    (g_got,) = torch.autograd.grad(got, batch["leaf"], retain_graph=True)
    torch.testing.assert_close(g_got, g_want, rtol=1e-8, atol=atol)
    if config.normalizer == "tokens":
        return losses  # TRL's rewards for ["sft"] are beta * h; ours are the per-token means
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert float(metrics[name]) == pytest.approx(trl_metrics[name], rel=1e-9, abs=1e-12)
    accuracy = trl_metrics["rewards/accuracies"]  # TRL averages it in fp32
    assert float(metrics["rewards/accuracies"]) == pytest.approx(accuracy, abs=1e-7)
    for name in ("logps/chosen", "logps/rejected"):
        assert float(metrics[name]) == pytest.approx(trl_metrics[name], rel=1e-9)
    return losses


ALL_TYPES = [
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sigmoid_norm",
    "sft",
]


def config_for(loss_type, **kw):
    eps = LABEL_SMOOTHING.get(loss_type, 0.0)
    return LossConfig(name=TRL_NAMES.get(loss_type, loss_type), label_smoothing=eps, **kw), {
        "label_smoothing": eps
    }


@pytest.mark.parametrize("loss_type", ALL_TYPES)
def test_every_trl_loss_type(loss_type):
    batch = make_batch(seed=1)
    config, trl_args = config_for(loss_type, adaptive=False)
    losses = assert_same([loss_type], config, batch, **trl_args)
    if loss_type in ("aot", "aot_unpaired", "sft"):
        return  # sorted across pairs / a batch-level token mean: no per-pair TRL value
    for i in range(B):  # per pair: TRL on a batch of that pair alone
        rows = [i, B + i]
        one = {k: v[rows].detach() for k, v in batch.items()}
        one["logps"] = one["leaf"] * one["shift"]
        want, _ = trl_loss([loss_type], one, **trl_args)
        tol = 1e-7 if loss_type == "exo_pair" else 1e-12
        torch.testing.assert_close(losses[i].detach(), want, rtol=1e-9, atol=tol)


@pytest.mark.parametrize("loss_type", F_DIVERGENCE_TYPES)
@pytest.mark.parametrize("kind", ["forward_kl", "js_divergence", "alpha_divergence"])
def test_f_divergences(loss_type, kind):
    alpha = 0.3 if kind == "alpha_divergence" else 0.5
    dtype = torch.float32 if kind == "alpha_divergence" else F64  # TRL's clamp table: no fp64
    batch = make_batch(seed=2, dtype=dtype)
    config, trl_args = config_for(
        loss_type, adaptive=False, f_divergence_type=kind, f_alpha_divergence_coef=alpha
    )
    trl_args |= {"f_divergence_type": kind, "f_alpha_divergence_coef": alpha}
    atol = 1e-5 if dtype == torch.float32 else 1e-10
    if dtype == torch.float32:
        want, _ = trl_loss([loss_type], batch, **trl_args)
        got = our_loss(config, batch)[0].mean()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=atol)
        (g_want,) = torch.autograd.grad(want, batch["leaf"], retain_graph=True)
        (g_got,) = torch.autograd.grad(got, batch["leaf"], retain_graph=True)
        torch.testing.assert_close(g_got, g_want, rtol=1e-4, atol=atol)
    else:
        assert_same([loss_type], config, batch, **trl_args)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "robust", "nca_pair", "discopop"])
def test_wpo_weighting(loss_type):
    # (TRL 1.16.0 cannot weight its "sft" type: an in-place product on an expanded tensor)
    batch = make_batch(seed=3)
    config, trl_args = config_for(loss_type, adaptive=False, use_weighting=True)
    assert_same([loss_type], config, batch, use_weighting=True, **trl_args)


def test_sft_term_is_trls_loss_type_list_with_loss_weights():
    batch = make_batch(seed=4, equal_chosen_lengths=True)  # TRL: a batch-level token mean
    config = LossConfig(name="dpo", sft_weight=0.6)
    assert_same(["sigmoid", "sft"], config, batch, weights=[1.0, 0.6])


def test_discopop_tau():
    batch = make_batch(seed=5)
    assert_same(
        ["discopop"], LossConfig(name="discopop", discopop_tau=0.3), batch, discopop_tau=0.3
    )


# ----------------------------------------------------------------------------- tiny Llama
def tiny_llama():
    import transformers

    from tests.convert_models import hf_config

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(hf_config("llama2")).to(F64)
    outputs = ("log_probs", "entropy", "mean_logits", "is_top1", "log_sum_sq_probs")
    trl_utils = pytest.importorskip("trl.trainer.utils", reason="trl is not installed")
    trl_utils.add_fused_lm_head(model, outputs=outputs)
    return model


def token_batch(model):
    """``[chosen x B; rejected x B]`` token ids with right padding and completion masks."""
    g = torch.Generator().manual_seed(9)
    ids = torch.randint(3, model.config.vocab_size, (2 * B, S), generator=g)
    prompt = torch.randint(3, 7, (2 * B,), generator=g)
    total = prompt + torch.randint(4, S - 8, (2 * B,), generator=g)
    pos = torch.arange(S)
    attention = (pos < total[:, None]).long()
    completion = ((pos >= prompt[:, None]) & (pos < total[:, None])).long()
    return ids * attention, attention, completion


def ours_from_hf_logits(model, ids, attention, completion, config, ref):
    """Per-token log-probs from the full-vocabulary logits, summed over completion tokens
    (this project's convention), into ``preference_loss``: the mean loss."""
    logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1]
    logp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    shift = completion[:, 1:].to(F64)
    sums, counts = (logp * shift).sum(1), shift.sum(1)
    extra = {}
    if config.use_weighting:
        lssp = torch.logsumexp(2 * logits, -1) - 2 * torch.logsumexp(logits, -1)
        mean = ((logp - lssp) * shift).sum(1) / counts
        extra = {"chosen_weight_logps": mean[:B], "rejected_weight_logps": mean[B:]}
    losses, _ = preference_loss(
        config,
        sums[:B],
        sums[B:],
        counts[:B],
        counts[B:],
        ref[:B],
        ref[B:],
        chosen_nll=-sums[:B] / counts[:B],
        **extra,
    )
    return losses.mean()


@pytest.mark.parametrize(
    ("trl_types", "config", "trl_args"),
    [
        (["sigmoid"], LossConfig(name="dpo"), {}),
        (["ipo"], LossConfig(name="ipo"), {}),
        (["sigmoid"], LossConfig(name="dpo", use_weighting=True), {"use_weighting": True}),
        (
            ["hinge"],
            LossConfig(name="hinge", f_divergence_type="js_divergence"),
            {"f_divergence_type": "js_divergence"},
        ),
    ],
)
def test_tiny_llama_through_trls_full_forward(trl_types, config, trl_args):
    """TRL's concatenated forward (its fused LM head on a tiny random Llama, token ids in,
    ``completion_mask`` selecting the scored tokens) gives the loss and parameter gradients
    that this project's per-sequence sums of the same model's log-probs give."""
    model = tiny_llama()
    ids, attention, completion = token_batch(model)
    ref = -40.0 + torch.randn(2 * B, generator=torch.Generator().manual_seed(3), dtype=F64)
    this = stand_in_trainer(model, trl_types, config.beta, **trl_args)
    inputs = {
        "input_ids": ids,
        "attention_mask": attention,
        "completion_mask": completion,
        "ref_chosen_logps": ref[:B],
        "ref_rejected_logps": ref[B:],
    }
    params = [p for p in model.parameters() if p.requires_grad]
    want = trl_dpo.DPOTrainer._compute_loss(this, model, inputs, False)
    g_want = torch.autograd.grad(want, params)
    got = ours_from_hf_logits(model, ids, attention, completion, config, ref)
    g_got = torch.autograd.grad(got, params)
    # TRL's fused LM head accumulates the logits in fp32 (trl/kernels/chunked_logprob.py
    # `acc.addmm_(a.float(), b.float())`): agreement to fp32 precision
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    for a, b in zip(g_got, g_want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()))
