"""End-to-end checks of the paths only a GPU stack runs: fusions, bf16, Transformer Engine
checkpoints, FP8, context parallelism, parameter sync before a save (issue #11).

    bash benchmarks/gpu/run_stack_checks.sh                  # results under $OUT (./gpu_out)
    python benchmarks/gpu/stack_checks.py --out DIR [--work DIR] [--only NAME ...] [--cpu]

Each check runs what this machine allows and says why it skipped the rest: one GPU without TE
runs the Megatron seam tests, the fused bf16 step and (with ``--cpu``, on gloo) the parameter
sync; Transformer Engine adds the converted-checkpoint, FP8 and LoRA-on-TE steps; two GPUs add
CP2 = CP1 (also with LoRA) and the parameter sync on NCCL. Trainer runs go through the real launcher
(``torchrun -m megatron_adadpo.train``) on the bundled quickstart data, each in its own
process with a timeout, in ``--work`` (run directories and logs). ``OUT/stack_checks.json``
holds every result; the exit status is 1 when a check failed. The CPU tests that encode each
rule: docs/training.md, "GPU-only features".
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "examples/configs/quickstart.yaml"
TOKENIZER = REPO / "examples/data/tokenizer"
BODIES = str(Path(__file__).with_name("stack_bodies.py"))  # what runs inside launched processes
BASE = [  # tiny, fast, deterministic; every run starts from the same weights and data
    "execution.tp=1",
    "train.global_batch_size=8",
    "train.micro_batch_size=2",
    "train.train_iters=3",
    "optimizer.warmup_fraction=0.0",
    "eval.interval=0",
    "logging.progress=false",
    "checkpoint.save_at_end=false",
]
LN2 = math.log(2)


class CheckFailed(AssertionError):
    """A check's expectation did not hold (its message says which and by how much)."""


def machine() -> dict:
    """What this machine has: GPUs, compute capability, TE, apex kernels, library versions."""
    import torch

    from megatron_adadpo.platform.environment import module_available, te_available

    facts = {"torch": torch.__version__, "cuda": torch.version.cuda, "gpus": 0}
    if torch.cuda.is_available():
        facts["gpus"] = torch.cuda.device_count()
        facts["gpu"] = torch.cuda.get_device_name()
        facts["capability"] = list(torch.cuda.get_device_capability())
    facts["transformer_engine"] = te_available()
    facts["apex_grad_accum"] = module_available("fused_weight_gradient_mlp_cuda")
    facts["transformers"] = module_available("transformers")
    try:
        from megatron_adadpo.platform.megatron import MEGATRON_VERSION

        facts["megatron_core"] = MEGATRON_VERSION
    except ImportError as err:
        facts["megatron_core"] = f"import failed: {err}"
    return facts


def launch(args: list[str], nproc: int, log: Path, timeout: float, env: dict | None = None) -> None:
    """``python ARGS`` (one process) or ``torchrun --standalone`` with ``nproc`` processes."""
    cmd = [sys.executable, *args]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        cmd += [f"--nproc-per-node={nproc}", *args]
    env = os.environ | (env or {})
    with open(log, "w") as handle:
        try:
            rc = subprocess.run(cmd, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT,
                                timeout=timeout, env=env).returncode  # fmt: skip
        except subprocess.TimeoutExpired:
            rc = "timeout"
    if rc != 0:
        raise CheckFailed(f"{' '.join(cmd[1:4])} ... exited {rc}: {root_cause(log)} ({log})")


def root_cause(log: Path) -> str:
    """The last exception line a process printed (torchrun's own summary skipped)."""
    lines = log.read_text(errors="replace").splitlines()
    errors = [
        line for line in lines
        if re.match(r"^(\[rank\d+\]: )?[\w.]*(Error|Exception|Failed)\b", line)
        and "ChildFailedError" not in line
    ]  # fmt: skip
    return errors[-1] if errors else "\n".join(lines[-15:])


def train(work: Path, name: str, sets: list[str], nproc: int = 1, timeout: float = 300) -> list:
    """Run the trainer; its metrics rows (``metrics.jsonl``)."""
    run_dir = work / name
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run, never a resumed or appended one
    sets = [*BASE, f"logging.run_dir={run_dir}", f"data.cache_dir={work / 'cache'}", *sets]
    args = ["-m", "megatron_adadpo.train", "--config", str(QUICKSTART)]
    for item in sets:
        args += ["--set", item]
    launch(args, nproc, work / f"{name}.log", timeout)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("split") == "train"]


def expect(condition: bool, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


def close(a: float, b: float, rel: float) -> bool:
    return abs(a - b) <= rel * max(abs(a), abs(b), 1e-12)


# --- checks: each returns its details (dict) or raises CheckFailed -------------------------


def check_megatron_seam(work: Path, facts: dict) -> dict:
    """The seam's wrappers and the CP split against this megatron-core's own functions."""
    tests = [
        "tests/unit/test_megatron_seam.py",
        "tests/unit/test_gpu_options.py",
        "tests/distributed/test_context_parallel.py::test_split_equals_megatron_get_batch_on_this_cp_rank",
        "tests/distributed/test_context_parallel.py::test_pipeline_buffers_match_the_local_sequence",
    ]
    args = ["-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=", *tests]
    # A forked rank cannot use CUDA once pytest's process touched it: the ranks are spawned.
    spawn = {"ADADPO_RANK_START": "spawn"}
    launch(args, 1, work / "megatron_seam.log", timeout=300, env=spawn)
    return {"pytest": (work / "megatron_seam.log").read_text().strip().splitlines()[-1]}


def check_fusions_bf16(work: Path, facts: dict) -> dict:
    """Fused kernels on where they exist; a bf16 step with them equals one without."""
    from megatron_adadpo.layout import ExecutionConfig
    from megatron_adadpo.model.build import kernel_fusions
    from megatron_adadpo.platform.machine import probe_machine
    from megatron_adadpo.resolve.kernels import resolve_kernels

    run = ExecutionConfig(transformer_impl="local", bf16=True)
    flags = kernel_fusions(resolve_kernels(run, probe_machine()))
    expect(flags["bias_activation_fusion"] and flags["bias_dropout_fusion"], f"fusions {flags}")
    expect(flags["gradient_accumulation_fusion"] == facts["apex_grad_accum"], f"{flags}")
    sets = ["execution.bf16=true", "execution.transformer_impl=local"]
    fused = train(work, "bf16_fused", sets)
    unfused = train(work, "bf16_unfused", [*sets, "execution.fusions=false"])
    expect(close(fused[0]["loss"], LN2, 1e-6), f"step-1 loss {fused[0]['loss']} != ln 2")
    for a, b in zip(fused, unfused, strict=True):
        expect(close(a["loss"], b["loss"], 2e-2), f"fused {a['loss']} vs unfused {b['loss']}")
        expect(math.isfinite(a["grad_norm"]), f"grad norm {a['grad_norm']}")
    return {
        "fusions": flags,
        "loss_fused": [r["loss"] for r in fused],
        "loss_unfused": [r["loss"] for r in unfused],
        "step_time_s_fused_unfused": [fused[-1]["step_time_s"], unfused[-1]["step_time_s"]],
    }


def check_param_sync(work: Path, facts: dict) -> dict:
    """DP2, distributed optimizer, overlapped param all-gather: the saved weights are the live
    (updated) ones, not last step's for the shards other ranks own."""
    nproc = 2
    args = [BODIES, "param_sync", "--work", str(work)]
    launch(args, nproc, work / "param_sync.log", 300)
    result = json.loads((work / "param_sync.json").read_text())
    expect(result["max_rel_diff"] <= 1e-6, f"saved != live weights: {result}")
    return result


def converted_checkpoint(work: Path) -> tuple[Path, list[str]]:
    """A tiny random HF Llama converted with tools/convert_hf_to_megatron.py (made once)."""
    ckpt = work / "converted"
    if not (ckpt / "model.yaml").exists():
        launch([BODIES, "make_hf", "--work", str(work)], 1, work / "hf.log", 120)
        args = ["tools/convert_hf_to_megatron.py", "--hf-dir", str(work / "hf"), "--output"]
        launch([*args, str(ckpt), "--dtype", "fp32", "--no-progress"], 1, work / "cv.log", 300)
    import yaml

    model = yaml.safe_load((ckpt / "model.yaml").read_text())
    sets = [f"model.{k}={json.dumps(v)}" for k, v in model.items()]
    return ckpt, [*sets, f"train.init_checkpoint={ckpt}", "data.max_length=64"]


def check_te_checkpoint(work: Path, facts: dict) -> dict:
    """A TE-spec model loads a converted (local-template) checkpoint; its step-1 log-probs equal
    the local spec's from the same checkpoint, and the loss is ln 2 (policy == reference)."""
    _, sets = converted_checkpoint(work)
    sets += ["data.max_prompt_length=32", "train.train_iters=1"]
    te = train(work, "te_fp32", [*sets, "execution.transformer_impl=transformer_engine"])[0]
    local = train(work, "local_fp32", [*sets, "execution.transformer_impl=local"])[0]
    expect(close(te["loss"], LN2, 1e-6), f"TE step-1 loss {te['loss']}")
    for key in ("logps/chosen", "logps/rejected"):
        expect(close(te[key], local[key], 5e-3), f"{key}: TE {te[key]} vs local {local[key]}")
    return {k: [te[k], local[k]] for k in ("loss", "logps/chosen", "logps/rejected")}


def check_fp8(work: Path, facts: dict) -> dict:
    """FP8 (hybrid, delayed scaling, Megatron-LM's amax settings) from the converted checkpoint."""
    _, sets = converted_checkpoint(work)
    sets += ["data.max_prompt_length=32", "execution.bf16=true", "execution.fp8=hybrid"]
    rows = train(work, "fp8", [*sets, "execution.transformer_impl=transformer_engine"])
    expect(close(rows[0]["loss"], LN2, 1e-3), f"FP8 step-1 loss {rows[0]['loss']}")
    expect(all(math.isfinite(r["loss"] + r["grad_norm"]) for r in rows), f"{rows}")
    return {"loss": [r["loss"] for r in rows], "grad_norm": [r["grad_norm"] for r in rows]}


def check_cp2(work: Path, facts: dict) -> dict:
    """CP2 (TE attention, bf16) against CP1: step-1 log-probs, gradient norm, tokens counted."""
    sets = ["execution.bf16=true", "execution.transformer_impl=transformer_engine"]
    one = train(work, "cp1", [*sets, "execution.cp=1"])
    two = train(work, "cp2", [*sets, "execution.cp=2"], nproc=2)
    for key, rel in (("logps/chosen", 2e-2), ("logps/rejected", 2e-2), ("grad_norm", 5e-2)):
        expect(close(one[0][key], two[0][key], rel), f"{key}: CP1 {one[0][key]} CP2 {two[0][key]}")
    tokens = [r["throughput/tokens_per_s"] * r["step_time_s"] for r in (one[0], two[0])]
    expect(close(*tokens, 1e-6), f"tokens per step CP1 {tokens[0]} vs CP2 {tokens[1]}")
    keys = ("loss", "logps/chosen", "grad_norm")
    return {k: [[r[k] for r in one], [r[k] for r in two]] for k in keys}


LORA = ["lora.rank=8", "reference.mode=null"]  # adapters on every layer linear; adapters_off


def check_lora_te(work: Path, facts: dict) -> dict:
    """LoRA on the TE spec (fused linear_qkv / linear_fc1 split from their norms) from the
    converted checkpoint: step 1 at ln 2, it learns, and it follows LoRA on the local spec."""
    _, sets = converted_checkpoint(work)
    sets += ["data.max_prompt_length=32", *LORA]
    te = train(work, "lora_te", [*sets, "execution.transformer_impl=transformer_engine"])
    local = train(work, "lora_local", [*sets, "execution.transformer_impl=local"])
    expect(close(te[0]["loss"], LN2, 1e-6) and te[-1]["loss"] < te[0]["loss"], f"TE {te}")
    for key in ("logps/chosen", "logps/rejected", "loss"):
        expect(close(te[0][key], local[0][key], 5e-3), f"{key}: TE {te[0][key]} vs local")
    expect(close(te[-1]["loss"], local[-1]["loss"], 5e-3), f"last loss: TE {te} vs {local}")
    return {k: [[r[k] for r in te], [r[k] for r in local]] for k in ("loss", "grad_norm")}


def check_lora_cp2(work: Path, facts: dict) -> dict:
    """LoRA with CP2 (TE, bf16) vs CP1: step 1 at ln 2, log-probs, the adapters' grad norm."""
    sets = ["execution.bf16=true", "execution.transformer_impl=transformer_engine", *LORA]
    one = train(work, "lora_cp1", [*sets, "execution.cp=1"])
    two = train(work, "lora_cp2", [*sets, "execution.cp=2"], nproc=2)
    expect(close(two[0]["loss"], LN2, 1e-6), f"LoRA CP2 step-1 loss {two[0]['loss']}")
    for key, rel in (("logps/chosen", 2e-2), ("logps/rejected", 2e-2), ("grad_norm", 5e-2)):
        expect(close(one[0][key], two[0][key], rel), f"{key}: CP1 {one[0][key]} CP2 {two[0][key]}")
    return {k: [[r[k] for r in one], [r[k] for r in two]] for k in ("loss", "grad_norm")}


def needs(cuda: int = 1, te: bool = False, fp8: bool = False, hf: bool = False, cpu_ok=False):
    """The check's requirements -> ``reason(facts, cpu)``: why it cannot run here, or None.
    ``cpu_ok``: with ``--cpu`` it runs on CPU processes (gloo) when GPUs are missing."""

    def reason(facts: dict, cpu: bool) -> str | None:
        if facts["gpus"] < cuda and not (cpu and cpu_ok):
            why = " (with --cpu it runs on gloo)" if cpu_ok else ""
            return f"needs {cuda} CUDA GPU(s), this machine has {facts['gpus']}{why}"
        if te and not facts["transformer_engine"]:
            return "needs Transformer Engine (not installed, or it fails to import)"
        if fp8 and facts.get("capability", [0, 0]) < [8, 9]:
            return "needs FP8 tensor cores (compute capability >= 8.9: H100, H200, L40S ...)"
        if hf and not facts["transformers"]:
            return "needs the transformers package (the HF model to convert)"
        return None

    return reason


CHECKS = {  # name -> (check, requirements), in running order
    "megatron_seam": (check_megatron_seam, needs(cuda=0)),
    "fusions_bf16_step": (check_fusions_bf16, needs(cuda=1)),
    "param_sync_before_save": (check_param_sync, needs(cuda=2, cpu_ok=True)),
    "te_converted_checkpoint": (check_te_checkpoint, needs(te=True, hf=True)),
    "fp8_step": (check_fp8, needs(te=True, fp8=True, hf=True)),
    "cp2_equals_cp1": (check_cp2, needs(cuda=2, te=True)),
    "lora_te_spec": (check_lora_te, needs(te=True, hf=True)),
    "lora_cp2_equals_cp1": (check_lora_cp2, needs(cuda=2, te=True)),
}


def run_checks(work: Path, only: list[str], cpu: bool) -> list[dict]:
    facts = machine()
    print(f"machine: {json.dumps(facts)}", flush=True)
    results = [{"check": "machine", "status": "INFO", "details": facts}]
    for name, (check, reason) in CHECKS.items():
        if only and name not in only:
            continue
        why = reason(facts, cpu)
        start = time.monotonic()
        if why:
            status, details = "SKIP", why
        else:
            try:
                status, details = "PASS", check(work, facts)
            except CheckFailed as err:
                status, details = "FAIL", str(err)
        seconds = round(time.monotonic() - start, 1)
        results.append({"check": name, "status": status, "seconds": seconds, "details": details})
        print(f"[{status}] {name} ({seconds} s): {details}", flush=True)
        (work / "stack_checks.json").write_text(json.dumps(results, indent=1))  # so far
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "gpu_out"), help="results")
    parser.add_argument("--work", default=None, help="runs and logs (default: OUT/work)")
    parser.add_argument("--only", nargs="*", default=[], choices=sorted(CHECKS))
    parser.add_argument("--cpu", action="store_true", help="run cpu_ok checks on gloo")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    work = Path(args.work).resolve() if args.work else out / "work"
    work.mkdir(parents=True, exist_ok=True)
    results = run_checks(work, args.only, args.cpu)
    (out / "stack_checks.json").write_text(json.dumps(results, indent=1))
    return int(any(r["status"] == "FAIL" for r in results))


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
