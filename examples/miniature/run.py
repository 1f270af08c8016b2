#!/usr/bin/env python
"""The paper in miniature, in one command: SFT warm start, then DPO / AdaDPO / SimPO /
adaptive SimPO from that start, judged by ground truth on held-out prompts.

    python examples/miniature/run.py [--out runs/miniature] [--workers 2]
    python examples/miniature/run.py --sft-only --bundle examples/checkpoints/sft_tiny
    python examples/miniature/run.py --grid [--start runs/miniature]   # the paper's grid
    python examples/miniature/run.py --lora [--start runs/miniature]   # DPO / AdaDPO with LoRA

1. data: the bundled generator's tasks (examples/data/make_prefs.py), held-out prompts apart
   (examples/miniature/data.py);
2. SFT of the quickstart's model on the chosen answers (``loss.name: sft``), saved as a model
   checkpoint; the start's held-out log-probs and greedy answers;
3. the grid of jobs.py (4 methods x 3 betas x 2 seeds) from that checkpoint, in ``--workers``
   processes, one line per finished run;
4. ``OUT/report.md`` (tables), ``OUT/results.json``, ``OUT/miniature.png``.

Prints the wall time, the CPU time of the runs and the machine's load. ``--sft-only`` stops after
step 2; ``--bundle DIR`` copies the SFT checkpoint and its tokenizer to DIR (the quickstart's
start, examples/checkpoints/sft_tiny, is made this way). docs/miniature.md has the results.

``--grid`` runs jobs.py's ``paper_grid`` instead of step 3 (DPO, AdaDPO, DPO + SFT term, DPOP;
4 lr x 4 beta x 2 seeds, 128 runs; default ``--out runs/miniature_grid``); ``--lora`` runs
``lora_grid`` (DPO and AdaDPO with LoRA adapters, 12 runs; ``runs/miniature_lora``). Both write
their report with ``grid_report.py``. ``--start DIR`` reuses the SFT start of an earlier run's
``DIR`` (``DIR/sft`` and ``DIR/results/SFT.json``) instead of step 2.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))

DATA_SEED, SFT_PAIRS, PREF_PAIRS, HELDOUT = 7, 4000, 2000, 500


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env.setdefault("PYTHONWARNINGS", "ignore")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def _jobs(out: Path, *args: str, log: Path | None = None) -> subprocess.Popen:
    cmd = [sys.executable, str(HERE / "jobs.py"), *args, "--out", str(out)]
    stdout = log.open("w") if log else None
    return subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=stdout, stderr=subprocess.STDOUT)


def _wait(proc: subprocess.Popen, what: str, log: Path | None = None) -> None:
    if proc.wait() != 0:
        tail = "".join(log.read_text().splitlines(True)[-20:]) if log else ""
        raise SystemExit(f"{what} failed (exit {proc.returncode})\n{tail}")


def _line(result: dict) -> str:
    return (
        f"Δ chosen {result['delta_chosen']:+.3f}  Δ rejected {result['delta_rejected']:+.3f}  "
        f"both fell {result['both_fell']:.0%}  reward acc {result['reward_accuracy']:.0%}  "
        f"exact match {result['exact_match']['all']:.1%}  ({result['seconds']:.0f} s)"
    )


def run_grid(out: Path, workers: int, mode: str = "default") -> None:
    import json

    from jobs import JOBS

    names = [r["name"] for r in JOBS[mode]()]
    width, count = max(26, *map(len, names)), len(str(len(names)))
    logs = [out / f"logs/grid_{k}.log" for k in range(workers)]
    procs = [
        _jobs(out, "grid", "--part", str(k), "--parts", str(workers), "--jobs", mode, log=log)
        for k, log in enumerate(logs)
    ]
    shown: set[str] = set()
    while len(shown) < len(names):
        for name in names:
            path = out / f"results/{name}.json"
            if name not in shown and path.is_file():
                shown.add(name)
                line = _line(json.loads(path.read_text()))
                print(f"[{len(shown):{count}d}/{len(names)}] {name:{width}s} {line}", flush=True)
        for proc, log in zip(procs, logs, strict=True):
            if proc.poll() not in (None, 0):
                _wait(proc, f"grid worker ({log})", log)
        if all(p.poll() == 0 for p in procs) and len(shown) < len(names):
            raise SystemExit(f"the workers finished without results for {set(names) - shown}")
        time.sleep(1.0)


def _fresh(out: Path, start: Path | None) -> dict | None:
    """Empty ``out``'s results, runs, sft and logs; with ``start`` (an earlier OUT), put its SFT
    start back in ``out`` and return its result (nothing to copy when ``start`` is ``out``)."""
    import json

    sft = None
    if start:
        needed = [start / "sft/checkpoint", start / "sft/heldout_logps.npy"]
        missing = [str(p) for p in [*needed, start / "results/SFT.json"] if not p.exists()]
        if missing:
            raise SystemExit(f"--start {start}: no SFT start there (missing {', '.join(missing)})")
        sft = json.loads((start / "results/SFT.json").read_text())
    for sub in ("results", "runs", "sft", "logs"):
        if not (sub == "sft" and start == out):
            shutil.rmtree(out / sub, ignore_errors=True)
    (out / "logs").mkdir(parents=True)
    if start:
        if start != out:
            shutil.copytree(start / "sft", out / "sft")
        (out / "results").mkdir()
        (out / "results/SFT.json").write_text(json.dumps(sft, indent=1))
    return sft


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="default runs/miniature[_grid|_lora]")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--grid", action="store_true", help="the paper's grid (128 runs)")
    mode.add_argument("--lora", action="store_true", help="DPO / AdaDPO with LoRA (12 runs)")
    parser.add_argument("--start", type=Path, help="reuse the SFT start of this earlier OUT")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--sft-only", action="store_true")
    parser.add_argument(
        "--resume", action="store_true", help="keep OUT's finished runs, run the missing ones"
    )
    parser.add_argument("--bundle", type=Path, help="copy the SFT checkpoint here")
    args = parser.parse_args(argv)
    if args.bundle and args.bundle.exists():
        raise SystemExit(f"--bundle {args.bundle} exists: remove it first (never overwritten)")
    import data

    mode = "grid" if args.grid else "lora" if args.lora else "default"
    default_out = {"default": "runs/miniature", "grid": "runs/miniature_grid"}
    out = (args.out or REPO / default_out.get(mode, "runs/miniature_lora")).resolve()
    start = args.start.resolve() if args.start else None
    begin, load_begin = time.monotonic(), os.getloadavg()
    if args.resume:  # keep OUT (its SFT start and finished runs); run only what is missing
        import json

        sft = json.loads((out / "results/SFT.json").read_text())
    else:
        sft = _fresh(out, start)
    paths = data.write_data(out / "data", DATA_SEED, SFT_PAIRS, PREF_PAIRS, HELDOUT)
    print(f"data: {', '.join(f'{k} {sum(1 for _ in open(p))}' for k, p in paths.items())}")
    if sft:
        print(f"SFT start reused from {(start or out) / 'sft'}", flush=True)
    else:
        print("SFT warm start (trainer log: sft/train.log)", flush=True)
        _wait(_jobs(out, "sft"), "SFT")
        import json

        sft = json.loads((out / "results/SFT.json").read_text())
    print(f"SFT start: exact match {sft['exact_match']}  ({sft['seconds']:.0f} s)", flush=True)
    if args.bundle:
        shutil.copytree(out / "sft/checkpoint", args.bundle)  # refuses an existing directory
        shutil.copytree(REPO / "examples/data/tokenizer", args.bundle / "tokenizer")
        print(f"copied the SFT checkpoint to {args.bundle}")
    if not args.sft_only:
        run_grid(out, args.workers, mode)
        if mode == "default":
            from report import write_report

            print(f"wrote {write_report(out)}, {out / 'miniature.png'}")
        else:
            from grid_report import write_report

            print(f"wrote {', '.join(map(str, write_report(out, mode)))}")
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_s = used.ru_utime + used.ru_stime
    print(
        f"wall {time.monotonic() - begin:.0f} s, CPU of the runs {cpu_s:.0f}"
        f" s on {os.cpu_count()} cores; load average (1 min) {load_begin[0]:.1f} at the start, "
        f"{os.getloadavg()[0]:.1f} at the end"
    )


if __name__ == "__main__":
    main()
