"""Planner: memory model sanity, refusals with reasons, recipes, CLI exit codes and JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_adadpo.planner import (
    GIB,
    LayoutError,
    check_layout,
    forward_flops,
    layer_activation_bytes,
    load,
    make_plan,
    suggest,
)
from megatron_adadpo.platform.hardware import GPUS, find_gpu, peak_tflops

REPO = Path(__file__).resolve().parents[2]
RECIPES = REPO / "examples" / "recipes"
R8B, R70B, R70B_FP8 = (
    RECIPES / f
    for f in ("llama3_8b_adadpo.yaml", "llama3_70b_adadpo.yaml", "llama3_70b_adadpo_fp8.yaml")
)


def _plan(recipe=R70B, sets=(), gpu="h100", nodes=8, **kw):
    p, cluster = load(str(recipe), list(sets), gpu, nodes, **kw)
    return make_plan(p, cluster)


def test_hardware_table():
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_tflops("NVIDIA H100 80GB HBM3", "fp8") == 1979.0
    assert peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops("NVIDIA H200") == 989.0
    assert peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_tflops("NVIDIA A100-SXM4-80GB", "fp8") is None
    assert peak_tflops("Some Future GPU") is None
    assert find_gpu("NVIDIA A100-SXM4-40GB").memory_gib < 40
    assert GPUS["h200"].peak_tflops("bf16") == 989.0 and GPUS["h200"].memory_gib > 139


def test_recipe_plans_fit_their_clusters():
    for recipe, nodes in ((R8B, 1), (R70B, 8), (R70B_FP8, 8)):
        plan = _plan(recipe, nodes=nodes)
        assert plan.fits, recipe
        assert plan.input.global_batch_size == 128 and plan.input.seq_length == 2048
    assert _plan(R70B, gpu="h200", nodes=8).fits
    assert _plan(R70B, gpu="a100", nodes=8).fits


def test_micro_batch_grows_activations_and_logits():
    unchunked = [
        "data.batching=fixed",
        "data.max_tokens_per_micro_batch=null",
        "execution.logprob_chunk_tokens=0",
    ]
    small = _plan(R8B, unchunked, nodes=1)
    big = _plan(R8B, [*unchunked, "train.micro_batch_size=2"], nodes=1)
    assert big.peak.activations == pytest.approx(2 * small.peak.activations)  # PP1: 1 in flight
    assert big.peak.logits == pytest.approx(2 * small.peak.logits)
    assert big.peak.workspace == pytest.approx(2 * small.peak.workspace)
    p, c = load(
        str(R70B), ["data.batching=fixed", "data.max_tokens_per_micro_batch=null"], "h100", 8
    )
    last = [make_plan(p.replace(micro_batch_size=b), c).stages[-1] for b in (1, 2, 4)]
    assert last[0].reserved < last[1].reserved < last[2].reserved


def test_chunked_logprobs_hold_one_chunk_of_logits():
    """8B recipe (TP2, bf16, seq 2048, one pair = 4096 tokens per micro-batch)."""
    plans = {
        c: _plan(
            R8B,
            [
                "data.batching=fixed",
                "data.max_tokens_per_micro_batch=null",
                f"execution.logprob_chunk_tokens={c}",
            ],
            nodes=1,
        ).stages[-1]
        for c in (0, 1024, 1280, 100_000, "auto")
    }
    vocab, h, tokens = 128256 / 2, 4096, 2048 * 2  # 128256 divides 128 * TP: no padding
    assert plans[0].logits == tokens * vocab * 6  # bf16 logits + their fp32 copy
    hidden = 3 * 2 * tokens * h  # gathered input, selected tokens, their gradient
    dummy_dw = 2 * vocab * h  # DDP's dummy weight gradient after the last chunk
    assert plans[1024].logits == max(1024 * vocab * 6, dummy_dw) + hidden
    assert plans[100_000].logits == tokens * vocab * 6 + hidden  # one chunk: all tokens
    assert plans["auto"].logits == plans[1280].logits  # 512 MiB / (64128 x 6 B) = 1395 -> 1280
    assert plans[1024].logits < 0.5 * plans[0].logits
    assert plans[1024].activations == plans[0].activations


def test_distributed_optimizer_divides_optimizer_state_by_dp():
    # overlap_param_gather needs the distributed optimizer: off with it.
    plain_sets = [
        "optimizer.use_distributed_optimizer=false",
        "optimizer.overlap_param_gather=false",
    ]
    plain = _plan(R70B, plain_sets, nodes=16)
    dist = _plan(R70B, nodes=16)
    assert plain.dp == 4
    assert dist.peak.optimizer == pytest.approx(plain.peak.optimizer / 4)
    assert plain.peak.optimizer == pytest.approx(12 * plain.peak.params)  # fp32 master + m + v
    assert dist.peak.gradients == plain.peak.gradients  # the grad buffer is never sharded


def test_recompute_reduces_activations():
    none = _plan(R70B, ["execution.recompute=null"])
    sel = _plan(R70B, ["execution.recompute=selective"])
    full = _plan(R70B, ["execution.recompute=full"])
    assert full.peak.activations < sel.peak.activations <= none.peak.activations
    # Without fused attention (Megatron's local attention), selective recompute drops the s^2
    # attention scores.
    local_none = _plan(R70B, ["execution.recompute=null", "execution.attention=megatron_local"])
    local_sel = _plan(R70B, ["execution.attention=megatron_local"])
    assert local_sel.peak.activations < 0.5 * local_none.peak.activations
    assert full.cost.recompute_flops > 0 and sel.cost.recompute_flops == 0


def test_activation_formula_reduces_to_korthikanti_for_gpt_shapes():
    # A SwiGLU MLP with f = 8h/3 stores what GPT's 4h GeLU MLP stores (16 sbh) and MHA (groups
    # = heads) matches GPT's attention. TP + SP + selective, bf16: sbh * 32 / t, which is
    # Korthikanti et al.'s 34 less the 2 sbh of dropout masks (Llama has no dropout).
    gpt = [
        "model.hidden_size=6144",
        "model.ffn_hidden_size=16384",
        "model.num_attention_heads=48",
        "model.num_query_groups=48",
        "execution.transformer_impl=local",
        "data.batching=fixed",
        "data.max_tokens_per_micro_batch=null",
        "execution.attention=megatron_local",
    ]
    p, _ = load(str(R70B), gpt)
    s, b, h, t, a = 2048, 2, 6144, 8, 48
    assert layer_activation_bytes(p) == pytest.approx(s * b * h * 32 / t)
    p = p.with_execution(recompute=None, sequence_parallel=False)
    expected = s * b * h * (8 + 24 / t) + 5 * a * s * s * b / t  # their eq. 2 without masks
    assert layer_activation_bytes(p) == pytest.approx(expected)


def test_pipeline_first_stage_holds_pp_micro_batches():
    plan = _plan(R70B, ["execution.vpp=null"])
    first, last = plan.stages[0], plan.stages[-1]
    assert first.in_flight_layers == 80  # PP micro-batches x L/PP layers
    assert last.in_flight_layers == 20
    vpp = _plan(R70B)  # VPP 5: L * (1 + (p - 1) / (p * v))
    assert vpp.stages[0].in_flight_layers == pytest.approx(80 * (1 + 3 / 20))
    assert last.logits > 0 and first.logits == 0


def test_reference_modes():
    pre = _plan(R70B)
    res = _plan(R70B, ["reference.mode=resident"])
    assert pre.peak.reference == 0 and pre.cost.reference_flops == 0
    assert res.stages[0].reference == pytest.approx(2 * res.stages[0].params)
    assert res.cost.reference_flops == pytest.approx(res.cost.policy_flops / 3)
    assert res.cost.step_time_s == pytest.approx(pre.cost.step_time_s * 4 / 3)


def test_flops_match_megatron_lm_formula():
    # megatron/training/training.py num_floating_point_operations (dense, gated MLP, GQA):
    # 12 * s * L * h^2 * [(1 + g/a + s/h) * q/h + 1.5 * f/h + V / (2 L h)] for fwd + bwd.
    p, _ = load(str(R70B))
    m, s = p.model, 2048
    L, h, f, a, g, V = 80, 8192, 28672, 64, 8, m.padded_vocab_size(p.execution.tp)
    megatron = 12 * s * L * h**2 * ((1 + g / a + s / h) + 1.5 * f / h + V / (2 * L * h))
    assert 3 * forward_flops(p, s) == pytest.approx(megatron)
    # GPT shapes: the Megatron-LM paper's 72 * s * L * h^2 * (1 + s/(6h) + V/(12 L h)).
    p, _ = load(
        str(R70B),
        [
            "model.hidden_size=6144",
            "model.ffn_hidden_size=16384",
            "model.num_attention_heads=48",
            "model.num_query_groups=48",
        ],
    )
    h, L = 6144, 80
    V = p.model.padded_vocab_size(p.execution.tp)
    assert 3 * forward_flops(p, s) == pytest.approx(
        72 * s * L * h**2 * (1 + s / (6 * h) + V / (12 * L * h))
    )


def test_time_scales_with_mfu_and_gpus():
    base = _plan(R70B)
    assert _plan(R70B, nodes=16).cost.step_time_s == pytest.approx(base.cost.step_time_s / 2)
    p, c = load(str(R70B), [], "h100", 8)
    assert make_plan(p, c, mfu=0.2).cost.step_time_s == pytest.approx(2 * base.cost.step_time_s)


@pytest.mark.parametrize(
    "sets,kw,reason",
    [
        (["execution.tp=3"], {}, "must divide model.num_attention_heads"),
        (["execution.tp=16"], {"nodes": 8}, "must divide model.num_attention_heads"),
        (
            ["execution.pp=3", "execution.vpp=null"],
            {"nodes": 9},
            "model.num_layers=80 must be divisible by execution.pp*vpp",
        ),
        (["execution.vpp=3"], {}, "model.num_layers=80 must be divisible by execution.pp*vpp"),
        ([], {"nodes": 8, "gpus": 72}, "72 GPUs requested but 8 nodes x 8"),
        ([], {"nodes": 1, "gpus_per_node": 12}, "not divisible by execution.tp*pp*cp = 32"),
        (["train.global_batch_size=127"], {}, "train.global_batch_size=127 must be divisible"),
        (["execution.sequence_parallel=true", "execution.tp=1"], {}, "needs execution.tp > 1"),
        (["execution.recompute=everything"], {}, "execution.recompute='everything'"),
        (
            ["data.batching=token_budget", "data.max_tokens_per_micro_batch=4000"],
            {},
            "data.max_tokens_per_micro_batch=4000 is smaller than the longest pair",
        ),
        (["execution.fp8=hybrid"], {"gpu": "a100"}, "needs FP8 tensor cores"),
        (  # TE check_mxfp8_support: compute capability >= 10.0 (test_fp8_recipes.py)
            ["execution.fp8=hybrid", "execution.fp8_recipe=mxfp8"],
            {"gpu": "h100"},
            "fp8_recipe=mxfp8 needs compute capability >= 10.0 .Blackwell.; H100 SXM 80GB has 9.0",
        ),
    ],
)
def test_bad_layouts_are_refused_with_reasons(sets, kw, reason):
    # Rules that need no cluster refuse at load (the recipe's validation), the others on it.
    with pytest.raises(LayoutError, match=reason.replace("*", r"\*").replace("(", r"\(")):
        p, cluster = load(str(R70B), sets, kw.pop("gpu", "h100"), **({"nodes": 8} | kw))
        check_layout(p, cluster)


def test_planner_refusals_agree_with_config_validation():
    from megatron_adadpo.config import ConfigError, from_dict, read_yaml
    from megatron_adadpo.platform.hardware import gpu_spec
    from megatron_adadpo.resolve import Machine, resolve

    cases = [
        ["execution.tp=3"],
        ["execution.vpp=3"],
        ["train.global_batch_size=100"],
        ["execution.sequence_parallel=true", "execution.tp=1"],
        [],
    ]
    for sets in cases:
        try:
            p, cluster = load(str(R70B), sets, "h100", 8)
            check_layout(p, cluster)
            planner_ok = True
        except LayoutError:
            planner_ok = False
        try:
            resolve(from_dict(read_yaml(R70B, sets)), 64, Machine.of_gpu(gpu_spec("h100")))
            config_ok = True
        except ConfigError:
            config_ok = False
        assert planner_ok == config_ok, sets


def test_suggest_finds_a_fitting_layout_when_the_recipe_does_not_fit():
    p, cluster = load(
        str(R70B),
        [
            "execution.tp=1",
            "execution.pp=8",
            "execution.vpp=null",
            "execution.sequence_parallel=false",
        ],
        "h100",
        8,
    )
    plan = make_plan(p, cluster)
    assert not plan.fits
    found = suggest(p, cluster)
    assert found and all(s.fits for s in found)
    assert all(s.input.execution.tp <= 8 and s.peak.reserved <= 79.1 * GIB for s in found)


def test_small_config_for_gpu_calibration():
    """A ~1B config the lead can run on one GPU and compare with max_memory_allocated."""
    sets = [
        "model.num_layers=16",
        "model.hidden_size=2048",
        "model.ffn_hidden_size=8192",
        "model.num_attention_heads=32",
        "execution.tp=1",
        "execution.sequence_parallel=false",
        "train.global_batch_size=8",
        "reference.mode=resident",
    ]
    p, cluster = load(str(R8B), sets, "h100", 1, gpus=1)
    plan = make_plan(p, cluster)
    assert plan.fits and 1.0e9 < plan.total_params < 1.6e9


def _cli(*args):
    return subprocess.run(
        [sys.executable, str(REPO / "tools" / "plan.py"), *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )


def test_cli_text_json_and_exit_codes():
    ok = _cli("--recipe", str(R70B), "--gpu", "h100", "--nodes", "8", "--pairs", "61135")
    assert ok.returncode == 0, ok.stderr
    assert "verdict: FITS" in ok.stdout and "one epoch of 61,135 pairs" in ok.stdout
    js = _cli("--recipe", str(R8B), "--gpu", "h200", "--json")
    data = json.loads(js.stdout)
    assert js.returncode == 0 and data["fits"] and data["layout"]["dp"] == 4
    assert set(data["memory_per_stage"][0]) >= {"weights", "optimizer", "activations", "logits"}
    bad = _cli("--recipe", str(R70B), "--nodes", "8", "--set", "execution.tp=3")
    assert bad.returncode == 2 and "must divide model.num_attention_heads" in bad.stderr
    tight = _cli(
        "--recipe",
        str(R8B),
        "--gpu",
        "a100-40",
        "--set",
        "execution.tp=1",
        "--set",
        "execution.sequence_parallel=false",
    )
    assert tight.returncode == 1 and "DOES NOT FIT" in tight.stdout
    assert "layouts that fit" in tight.stdout and "--set execution.tp=" in tight.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["--nodes", "0"], "--nodes=0 must be an integer >= 1"),
        (["--gpus-per-node", "-2"], "--gpus-per-node=-2 must be an integer >= 1"),
        (["--gpus", "0"], "--gpus=0 must be an integer >= 1"),
        (["--gpus", "16"], "16 GPUs requested but 1 nodes x 8 GPUs per node = 8"),
        # one rule for every numeric option (were: negative FLOPs and "FITS", a -1 pair epoch)
        (["--avg-seq-len", "-5"], "--avg-seq-len=-5 must be an integer >= 1"),
        (["--avg-seq-len", "0"], "--avg-seq-len=0 must be an integer >= 1"),  # was: ignored
        (["--avg-seq-len", "4096"], "--avg-seq-len=4096 is more than data.max_length=2048"),
        (["--pairs", "-1"], "--pairs=-1 must be an integer >= 1"),
        (["--mfu", "nan"], "--mfu=nan must be a fraction in (0, 1]"),
        (["--mfu", "1.5"], "--mfu=1.5 must be a fraction in (0, 1]"),
        # were tracebacks: a 14.6 TiB array, a KeyError
        (["--set", "train.global_batch_size=1000000000000"],
         "train.global_batch_size=1000000000000 is more pairs than the planner simulates"),
        (["--lengths", "{jsonl}"], "length profile {jsonl} is not a data manifest (not one JSON"),
    ],
)  # fmt: skip
def test_cli_refuses_impossible_clusters_and_bad_numbers_in_one_line(args, message, tmp_path):
    jsonl = tmp_path / "lengths.jsonl"
    jsonl.write_text('{"chosen": 12, "rejected": 20}\n{"chosen": 7, "rejected": 9}\n')
    args = [a.format(jsonl=jsonl) for a in args]
    message = message.format(jsonl=jsonl)
    out = _cli("--recipe", str(R8B), *args)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    (line,) = [x for x in out.stderr.splitlines() if x.startswith("error:")]
    assert message in line, out.stderr


def test_recipes_load_with_the_training_config():
    from megatron_adadpo.config import ConfigError, load_config

    unset = ["train.init_checkpoint=null"]  # the recipes' placeholder path is refused here:
    with pytest.raises(ConfigError, match=r"train.init_checkpoint=/path/to/.* does not exist"):
        load_config(R8B)
    for recipe in (R8B, R70B):
        c = load_config(recipe, unset)
        assert c.train.global_batch_size == 128 and c.optimizer.warmup_fraction == 0.1
        assert c.data.max_length == 2048 and c.data.max_prompt_length == 1800
        assert c.loss.adaptive and c.loss.clip_max == 2.0 and c.optimizer.decay_style == "cosine"
    assert load_config(R70B, unset).reference.mode == "precomputed"
    # FP8 needs Transformer Engine on a GPU: refused here with the reason, loads without FP8.
    with pytest.raises(ConfigError, match="Transformer Engine"):
        load_config(R70B_FP8, unset)
    c = load_config(R70B_FP8, [*unset, "execution.fp8=null", "execution.transformer_impl=auto"])
    assert c.execution.tp == 8 and c.execution.vpp == 5


def test_peak_flops_per_device(monkeypatch):
    import torch

    from megatron_adadpo.platform.hardware import peak_flops_per_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert peak_flops_per_device() != peak_flops_per_device()  # NaN without CUDA
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=None: "NVIDIA H100 80GB HBM3")
    assert peak_flops_per_device() == 989e12
