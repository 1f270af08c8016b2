"""The resolved run (issue 20): one resolver between the config and everything that runs.

- every reason a config cannot run is reported in one error, not the first;
- each rule is written once in the package (the context-parallel attention rule's text, the
  places that settle the kernels, the batching policy and the ``auto`` chunk);
- the planner and the trainer resolve the same config on the same machine to the same run;
- ``torch.cuda.is_available`` is asked only in ``platform/`` and ``resolve/`` imports no torch;
- the probe on this machine is what torch reports.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_adadpo.config import ConfigError, from_dict, read_yaml
from megatron_adadpo.layout import AUTO_CHUNK_MULTIPLE, chunk_bytes_per_logit
from megatron_adadpo.planner.inputs import make_cluster, plan_input
from megatron_adadpo.platform.hardware import gpu_spec
from megatron_adadpo.platform.machine import probe_machine
from megatron_adadpo.resolve import CPU, Machine, resolve, run_errors

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "megatron_adadpo"
QUICKSTART = REPO / "examples/configs/quickstart.yaml"
R70B = REPO / "examples/recipes/llama3_70b_adadpo.yaml"


def _sources(under: Path = PACKAGE):
    return {p: p.read_text() for p in under.rglob("*.py")}


def test_every_reason_is_reported_at_once():
    """Independent mistakes (field checks, layout rules): one error names every one."""
    sets = ["optimizer.lr=0", "train.nan_policy=ignore", "execution.tp=3", "execution.pp=3"]
    with pytest.raises(ConfigError) as err:
        from_dict(read_yaml(QUICKSTART, sets))
    message = str(err.value)
    count = int(re.match(r"(\d+) reasons this config cannot run: \(1\) ", message).group(1))
    assert count >= 4 and f"({count}) " in message and "\n" not in message
    for reason in (
        "optimizer.lr=0.0 must be > 0",
        "train.nan_policy='ignore'",
        "execution.tp=3 must divide model.num_attention_heads",
        "model.num_layers=4 must be divisible by execution.pp*vpp = 3",
    ):
        assert reason in message, (reason, message)


def test_world_and_machine_reasons_are_reported_together():
    """On 3 processes of this CPU: the world's rule and the kernel rule, in one error."""
    sets = ["execution.cp=2", "execution.tp=1", "execution.transformer_impl=auto"]
    config = from_dict(read_yaml(QUICKSTART, sets))
    assert run_errors(config) == []  # without a machine TE attention is possible
    reasons = run_errors(config, 3, CPU)
    assert len(reasons) == 2, reasons
    with pytest.raises(ConfigError) as err:
        resolve(config, 3, CPU)
    assert all(r in str(err.value) for r in reasons)
    assert "3 processes are not divisible by execution.tp*pp*cp = 2" in str(err.value)
    assert "execution.cp > 1 needs Transformer Engine attention" in str(err.value)


def test_the_context_parallel_attention_rule_is_written_once():
    """The rule was written 5 times in four rooms; its text now stands in one place."""
    rule = re.compile(r"cp > 1 needs Transformer Engine")
    places = [p for p, text in _sources().items() for _ in rule.finditer(text)]
    assert [p.relative_to(PACKAGE).as_posix() for p in places] == ["resolve/kernels.py"]


@pytest.mark.parametrize(
    "call, home",
    [
        ("uses_transformer_engine(", "resolve/kernels.py"),
        ("attention_impl(", "resolve/kernels.py"),
        ("batching_policy(", "resolve/resolver.py"),
        ("logprob_chunk_tokens(", "resolve/resolver.py"),
        ("resolve_kernels(", None),  # the resolver, and model/build.py's default
    ],
)
def test_each_choice_is_settled_in_one_place(call, home):
    """Callers of each deciding function (definitions aside) sit in its one place."""
    callers = {
        p.relative_to(PACKAGE).as_posix()
        for p, text in _sources().items()
        for line in text.splitlines()
        if call in line and not line.lstrip().startswith("def ")
    }
    if home is None:
        assert callers == {"resolve/resolver.py", "model/build.py"}, callers
    else:
        assert callers == {home}, callers


def test_cuda_is_probed_only_in_platform():
    sites = [
        p.relative_to(PACKAGE).as_posix()
        for p, text in _sources().items()
        if "torch.cuda.is_available" in text
    ]
    assert sites and all(s.startswith("platform/") for s in sites), sites


def test_resolve_imports_no_torch():
    code = "import sys, megatron_adadpo.resolve; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr


def test_the_probe_is_what_torch_reports():
    machine = probe_machine()
    assert machine.has_cuda == torch.cuda.is_available()
    if not machine.has_cuda:
        stack = {"megatron_core": machine.megatron_core, "packed_pad_flag": machine.packed_pad_flag}
        assert machine == Machine(**stack) and machine.device == "cpu"


@pytest.mark.parametrize(
    "recipe, sets, gpu, nodes",
    [
        (R70B, [], "h100", 8),
        (R70B, ["execution.logprob_chunk_tokens=auto", "execution.fp8=null"], "a100", 8),
        (QUICKSTART, ["data.batching=packed", "data.max_tokens_per_micro_batch=512"], "h100", 1),
    ],
)
def test_planner_and_trainer_resolve_the_same_run(recipe, sets, gpu, nodes):
    """The planner's request (``PlanInput.request``) and the trainer's config give the same
    ``ResolvedRun`` on the machine the planner describes."""
    config = from_dict(read_yaml(recipe, sets))
    cluster = make_cluster(gpu, nodes=nodes)
    machine = Machine.of_gpu(gpu_spec(gpu))
    trainer_run = resolve(config, cluster.world_size, machine)
    planner_run = resolve(plan_input(config).request(), cluster.world_size, cluster.machine)
    assert planner_run == trainer_run
    assert trainer_run.parallel.world_size == cluster.world_size
    assert trainer_run.device == "cuda"
    te = config.execution.transformer_impl != "local"
    assert trainer_run.kernels.transformer_engine == te


def test_auto_chunk_is_settled_from_the_budget():
    """``auto``: the largest multiple of 256 tokens whose fp32/bf16 transients fit 512 MiB
    (computed here from the rule, not by the package's function)."""
    config = from_dict(read_yaml(R70B, ["execution.logprob_chunk_tokens=auto"]))
    run = resolve(config, 64, Machine.of_gpu(gpu_spec("h100")))
    e, model = config.execution, config.model
    per_token = model.padded_vocab_size(e.tp) // e.tp * chunk_bytes_per_logit(e.bf16)
    expected = max(512 * 2**20 // per_token // 256 * 256, AUTO_CHUNK_MULTIPLE)
    assert run.step.logprob_chunk_tokens == expected
    assert run.step.reference == config.reference_mode and run.step.loss == config.loss.name


def test_packing_format_follows_the_resolved_attention():
    sets = ["data.batching=packed", "data.max_tokens_per_micro_batch=512", "execution.bf16=true"]
    sets += ["execution.transformer_impl=auto"]
    config = from_dict(read_yaml(QUICKSTART, sets))
    assert resolve(config, 2, CPU).batching.packing == "mask"  # SDPA on the local spec
    te = Machine(has_cuda=True, has_te=True)
    assert resolve(config, 2, te).batching.packing == "thd"
    fixed = from_dict(read_yaml(QUICKSTART, []))
    assert resolve(fixed, 2, te).batching.packing is None
