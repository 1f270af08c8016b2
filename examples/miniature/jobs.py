"""The miniature's runs, in one process each share: the SFT warm start, then preference runs.

    python examples/miniature/jobs.py sft  --out DIR
    python examples/miniature/jobs.py grid --out DIR --part K --parts N [--jobs grid|lora]

Every run is the real trainer (``megatron_adadpo.run.trainer.Trainer``) in this process (a world
of one gloo process, TP=1), then the held-out evaluation of ``evaluate.py``. ``sft`` trains on
``DIR/data/sft.jsonl``, saves the model to ``DIR/sft/checkpoint`` and writes the start's
held-out log-probs and answers. ``grid`` runs the K-th of N shares of a job list (``--jobs``:
:func:`grid`, the default 24 runs; :func:`paper_grid`, the paper's 128; :func:`lora_grid`, 12
runs with LoRA adapters) from that checkpoint and writes one ``DIR/results/<name>.json`` per
run (``run.py`` shows them as they come). Each run's trainer output goes to ``<run_dir>/train.log``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
BASE_CONFIG = HERE / "miniature.yaml"
SEEDS = (1, 2)
# method: (loss family, adaptive). adaptive is always explicit (see docs/miniature.md).
METHODS = {
    "DPO": ("dpo", False),
    "AdaDPO": ("dpo", True),
    "SimPO": ("simpo", False),
    "AdaSimPO": ("simpo", True),
}
BETAS = {"dpo": (0.01, 0.1, 0.5), "simpo": (1.0, 2.0, 5.0)}  # SimPO scores are per token
PREFERENCE = ["optimizer.lr=1e-4", "optimizer.min_lr=1e-5"]
SFT = ["loss.name=sft", "loss.adaptive=false", "train.epochs=3", "logging.progress=true"]
# The paper's grid (run.py --grid): its shape, 4 learning rates x 4 betas x 2 seeds, around the
# default runs' lr 1e-4 and betas, for DPO, AdaDPO and the two published guards against the
# falling chosen likelihood. SFT term: weight 1.0 (RPO, arXiv 2404.19733, and TRL's rpo_alpha
# docs recommend 1.0). DPOP: lambda 50 (the DPOP paper's value, arXiv 2402.13228).
GRID_LRS = (5e-5, 1e-4, 2e-4, 5e-4)
GRID_BETAS = (0.01, 0.05, 0.1, 0.5)
GRID_METHODS = {
    "DPO": ["loss.adaptive=false"],
    "AdaDPO": ["loss.adaptive=true"],
    "DPO+SFT": ["loss.adaptive=false", "loss.sft_weight=1.0"],
    "DPOP": ["loss.adaptive=false", "loss.dpop_lambda=50"],
}
# LoRA (run.py --lora): rank 8, alpha 16 on the default targets; reference.mode unset resolves
# to adapters_off (the SFT start itself). lr 1e-3: about 10x the full-parameter lr (the usual
# rule for adapters; docs/miniature.md "With LoRA" has the quick comparison that chose it).
LORA = ["lora.rank=8", "lora.alpha=16", "reference.mode=null"]
LORA_LR = 1e-3


def _lr(lr: float) -> list[str]:
    return [f"optimizer.lr={lr:g}", f"optimizer.min_lr={lr / 10:g}"]  # cosine to lr / 10


def grid() -> list[dict]:
    """Every preference run of the default miniature: method x beta x seed, in a fixed order."""
    runs = []
    for method, (family, adaptive) in METHODS.items():
        for beta in BETAS[family]:
            for seed in SEEDS:
                sets = [*PREFERENCE, f"loss.name={family}"]
                sets.append(f"loss.adaptive={str(adaptive).lower()}")
                sets += [f"loss.beta={beta}", f"train.seed={seed}"]
                if family == "simpo":
                    sets.append(f"loss.simpo_gamma={beta / 2}")  # gamma / beta = 0.5 (SimPO)
                name = f"{method}_beta{beta:g}_seed{seed}"
                runs.append(dict(name=name, method=method, beta=beta, seed=seed, sets=sets))
    return runs


def paper_grid() -> list[dict]:
    """The paper's grid: method x lr x beta x seed (4 x 4 x 4 x 2 = 128 runs), DPO family."""
    runs = []
    for method, options in GRID_METHODS.items():
        for lr in GRID_LRS:
            for beta in GRID_BETAS:
                for seed in SEEDS:
                    sets = [*_lr(lr), "loss.name=dpo", *options]
                    sets += [f"loss.beta={beta}", f"train.seed={seed}"]
                    name = f"{method}_lr{lr:g}_beta{beta:g}_seed{seed}"
                    runs.append(
                        dict(name=name, method=method, lr=lr, beta=beta, seed=seed, sets=sets)
                    )
    return runs


def lora_grid() -> list[dict]:
    """DPO and AdaDPO with LoRA adapters: method x beta x seed (2 x 3 x 2 = 12 runs)."""
    runs = []
    for method in ("DPO", "AdaDPO"):
        for beta in BETAS["dpo"]:
            for seed in SEEDS:
                sets = [*_lr(LORA_LR), *LORA, "loss.name=dpo", *GRID_METHODS[method]]
                sets += [f"loss.beta={beta}", f"train.seed={seed}"]
                name = f"LoRA-{method}_beta{beta:g}_seed{seed}"
                runs.append(
                    dict(name=name, method=method, lr=LORA_LR, beta=beta, seed=seed, sets=sets)
                )
    return runs


JOBS = {"default": grid, "grid": paper_grid, "lora": lora_grid}


def _config(out: Path, inputs: Path, run_dir: Path, sets: list[str]):
    from megatron_adadpo.config import load_config

    common = [f"data.inputs=[{inputs}]", f"data.cache_dir={out / 'cache'}"]
    return load_config(BASE_CONFIG, [*common, f"logging.run_dir={run_dir}", *sets])


def _train(config, run_dir: Path):
    """The trainer, trained, its console output in ``run_dir/train.log``."""
    from megatron_adadpo.run.trainer import Trainer

    run_dir.mkdir(parents=True, exist_ok=True)
    with (run_dir / "train.log").open("w") as log, contextlib.redirect_stdout(log):
        trainer = Trainer(config)
        trainer.train()
    return trainer


def run_sft(out: Path) -> None:
    from evaluate import HeldOut, pair_summary

    from megatron_adadpo.run.state.checkpoints import save_model

    config = _config(out, out / "data/sft.jsonl", out / "sft", SFT)
    start = time.monotonic()
    trainer = _train(config, out / "sft")
    save_model(trainer.policy, out / "sft/checkpoint", config.model)
    heldout = HeldOut(config, out / "data/heldout.jsonl")
    start_logps = heldout.pair_logps(trainer.policy, trainer.context, trainer.run)
    np.save(out / "sft/heldout_logps.npy", start_logps)
    answers = heldout.greedy_answers(trainer.policy)
    result = {"name": "SFT", "method": "SFT", **pair_summary(start_logps, start_logps, "sft")}
    result["exact_match"] = heldout.exact_match(answers)
    result["answers"] = answers
    result["seconds"] = time.monotonic() - start
    _write(out / "results/SFT.json", result)


def run_grid(out: Path, part: int, parts: int, jobs: str = "default") -> None:
    from evaluate import HeldOut, pair_summary

    start_logps = np.load(out / "sft/heldout_logps.npy")
    heldout = None
    for run in JOBS[jobs]()[part::parts]:
        if (out / f"results/{run['name']}.json").exists():
            continue  # finished by an earlier, interrupted invocation (run.py --resume)
        begin = time.monotonic()
        sets = [f"train.init_checkpoint={out / 'sft/checkpoint'}", *run["sets"]]
        config = _config(out, out / "data/prefs.jsonl", out / "runs" / run["name"], sets)
        trainer = _train(config, out / "runs" / run["name"])
        heldout = heldout or HeldOut(config, out / "data/heldout.jsonl")
        logps = heldout.pair_logps(trainer.policy, trainer.context, trainer.run)
        answers = heldout.greedy_answers(trainer.policy)
        result = {k: v for k, v in run.items() if k != "sets"}
        result.update(pair_summary(logps, start_logps, config.loss.name))
        result["exact_match"] = heldout.exact_match(answers)
        result["answers"] = answers
        result["seconds"] = time.monotonic() - begin
        _write(out / f"results/{run['name']}.json", result)


def _write(path: Path, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(path)  # run.py polls for complete files


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("phase", choices=["sft", "grid"])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--part", type=int, default=0)
    parser.add_argument("--parts", type=int, default=1)
    parser.add_argument("--jobs", choices=sorted(JOBS), default="default")
    args = parser.parse_args(argv)
    import torch

    from megatron_adadpo.platform import cpu
    from megatron_adadpo.platform.distributed import destroy, init_distributed

    # One thread: a 0.9M-parameter model gains nothing from intra-op threads, and on a busy
    # machine they crawl (each op waits for its slowest thread). run.py runs processes in parallel.
    torch.set_num_threads(1)
    cpu.activate()  # a no-op where CUDA exists
    init_distributed()
    if args.phase == "sft":
        run_sft(args.out)
    else:
        run_grid(args.out, args.part, args.parts, args.jobs)
    destroy()


if __name__ == "__main__":  # dist_checkpointing starts a multiprocessing Manager
    from megatron_adadpo import cli

    sys.exit(cli.run(main))
