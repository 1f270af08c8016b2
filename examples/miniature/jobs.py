"""The miniature's runs, in one process each share: the SFT warm start, then preference runs.

    python examples/miniature/jobs.py sft  --out DIR
    python examples/miniature/jobs.py grid --out DIR --part K --parts N

Every run is the real trainer (``megatron_adadpo.run.trainer.Trainer``) in this process (a world
of one gloo process, TP=1), then the held-out evaluation of ``evaluate.py``. ``sft`` trains on
``DIR/data/sft.jsonl``, saves the model to ``DIR/sft/checkpoint`` and writes the start's
held-out log-probs and answers. ``grid`` runs the K-th of N shares of :func:`grid` from that
checkpoint and writes one ``DIR/results/<name>.json`` per run (``run.py`` shows them as they
come). Each run's trainer output goes to ``<run_dir>/train.log``.
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


def grid() -> list[dict]:
    """Every preference run: method x beta x seed, in a fixed order."""
    runs = []
    for method, (family, adaptive) in METHODS.items():
        for beta in BETAS[family]:
            for seed in SEEDS:
                sets = [f"loss.name={family}", f"loss.adaptive={str(adaptive).lower()}"]
                sets += [f"loss.beta={beta}", f"train.seed={seed}"]
                if family == "simpo":
                    sets.append(f"loss.simpo_gamma={beta / 2}")  # gamma / beta = 0.5 (SimPO)
                name = f"{method}_beta{beta:g}_seed{seed}"
                runs.append(dict(name=name, method=method, beta=beta, seed=seed, sets=sets))
    return runs


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


def run_grid(out: Path, part: int, parts: int) -> None:
    from evaluate import HeldOut, pair_summary

    start_logps = np.load(out / "sft/heldout_logps.npy")
    heldout = None
    for run in grid()[part::parts]:
        begin = time.monotonic()
        sets = [*PREFERENCE, f"train.init_checkpoint={out / 'sft/checkpoint'}", *run["sets"]]
        config = _config(out, out / "data/prefs.jsonl", out / "runs" / run["name"], sets)
        trainer = _train(config, out / "runs" / run["name"])
        heldout = heldout or HeldOut(config, out / "data/heldout.jsonl")
        logps = heldout.pair_logps(trainer.policy, trainer.context, trainer.run)
        answers = heldout.greedy_answers(trainer.policy)
        result = {k: run[k] for k in ("name", "method", "beta", "seed")}
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
        run_grid(args.out, args.part, args.parts)
    destroy()


if __name__ == "__main__":  # dist_checkpointing starts a multiprocessing Manager
    from megatron_adadpo import cli

    sys.exit(cli.run(main))
