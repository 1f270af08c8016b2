#!/usr/bin/env python
"""This trainer vs TRL's ``DPOTrainer``: same tiny Llama, same token ids, same micro-batches.

DPO (beta 0.1, AdamW, constant learning rate, gradient clipping 1.0) on CPU, with a resident
reference model and with precomputed reference log-probs, each framework in a fresh process,
at three shapes (``--shapes``; ``SHAPES``): a small vocabulary (704), Llama-2's (32,000) and
Llama-3's (128,256), where the LM head goes from a small to the dominant share of the work:

- the model: a Llama-shaped ``LlamaForCausalLM`` with random weights, built offline from a
  ``LlamaConfig`` (no download), converted to Megatron with ``tools/convert_hf_to_megatron.py``
  for this trainer (``train.init_checkpoint``); TRL trains the HF model itself;
- the data: random word pairs (lengths per shape) with a word-level tokenizer; this trainer
  tokenizes them (BOS + prompt, completion + EOS), and TRL gets exactly those token ids
  (``prompt_ids`` / ``chosen_ids`` / ``rejected_ids``, its pre-tokenized format), in this
  trainer's micro-batch order (TRL's ``train_sampling_strategy="sequential"``, its batch size
  and gradient accumulation equal to ``train.micro_batch_size`` and ``global / micro``), so both
  pad the same micro-batches;
- the same precision: fp32 on both sides (TRL's ``DPOConfig`` defaults to ``bf16=True``, an
  autocast that a CPU without bf16 instructions emulates ~10x slower: set off);
- the same work: TRL 1.16's ``DPOTrainer`` always computes the per-token entropy and the
  arg-max hit (its ``entropy`` and ``mean_token_accuracy`` metrics) in its chunked LM head; this
  trainer computes the same two with ``logging.token_metrics: true`` (set here, vocab-parallel);
- step time: the interval between consecutive step ends (data, forward, backward, optimizer,
  logging), median over the measured steps; tokens/s = real (unpadded) tokens / step time, on
  the wall clock and per second of the process's CPU time (the robust figure on a machine that
  other jobs share: with one thread it equals the wall time of an idle machine);
- peak RSS: ``ru_maxrss`` of each framework's process at its end (imports included); the
  precomputation of reference log-probs (TRL's in its ``__init__``, this trainer's with
  ``tools/precompute_reference.py`` before the run) is not timed.

Runs alternate (this trainer, TRL; then TRL first) for ``--repeats`` rounds, so the machine's
noise hits both alike. TRL is a test-only dependency (``pip install -e .[test]``; never imported
by the package). ``--profile`` also runs each framework once more under ``torch.profiler``
(resident reference) and prints the operators with the most CPU time, to say where the time
goes where this trainer is not ahead. ``--ours-set KEY=VALUE`` adds a ``--set`` to this trainer's
runs (and its precomputation), e.g. ``execution.logprob_chunk_tokens=256``::

    python benchmarks/bench_vs_trl.py --steps 3 --warmup 1 --repeats 2 --threads 1 --profile 15
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LLAMA = dict(
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    tie_word_embeddings=False,
)
# name: (vocabulary, hidden, ffn, (prompt words lo, hi), (completion words lo, hi)). The larger
# vocabularies get shorter sequences so that a step stays within seconds on one CPU thread.
SHAPES = {
    "small": (704, 256, 688, (40, 100), (60, 180)),
    "32k": (32000, 512, 1376, (40, 100), (60, 180)),
    "128k": (128256, 512, 1376, (20, 50), (30, 90)),
}
LR, BETA, MICRO, GLOBAL = 1e-5, 0.1, 4, 8


def hf_model(shape: str) -> dict:
    vocab, hidden, ffn, _, _ = SHAPES[shape]
    return dict(LLAMA, vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn)


def make_inputs(work: Path, shape: str, pairs: int) -> None:
    """Word-level tokenizer + random HF Llama of ``shape`` in ``work/hf``,
    ``work/pairs.jsonl``, and the Megatron conversion in ``work/mg``."""
    import random

    import torch
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    model = hf_model(shape)
    special = dict(pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    vocab = {name: i for i, name in enumerate(special.values())}
    vocab |= {f"w{i}": i for i in range(len(vocab), model["vocab_size"])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, **special)
    fast.save_pretrained(str(work / "hf"))
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**model, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    transformers.LlamaForCausalLM(config).save_pretrained(str(work / "hf"))
    rng = random.Random(0)
    prompt, completion = SHAPES[shape][3:]

    def words(lo_hi: tuple[int, int]) -> str:
        n = rng.randint(*lo_hi)
        return " ".join(f"w{rng.randrange(4, model['vocab_size'])}" for _ in range(n))

    with open(work / "pairs.jsonl", "w") as f:
        for _ in range(pairs):
            row = dict(prompt=words(prompt), chosen=words(completion), rejected=words(completion))
            f.write(json.dumps(row) + "\n")
    convert = [sys.executable, "tools/convert_hf_to_megatron.py", "--hf-dir", str(work / "hf")]
    convert += ["--output", str(work / "mg"), "--dtype", "fp32", "--no-progress"]
    subprocess.run(convert, cwd=REPO, check=True, capture_output=True)


def our_config(work: Path, steps: int, mode: str, extra: list[str] = ()) -> list[str]:
    """``--config`` / ``--set`` arguments of this trainer's run (``extra``: ``--ours-set``)."""
    sets = [
        "execution.tp=1",
        "loss.name=dpo",
        "loss.adaptive=false",
        f"loss.beta={BETA}",
        f"data.inputs=[{work / 'pairs.jsonl'}]",
        f"data.tokenizer={work / 'hf'}",
        f"data.cache_dir={work / 'cache'}",
        "data.max_length=512",
        "data.max_prompt_length=256",
        "eval.interval=0",
        f"optimizer.lr={LR}",
        f"optimizer.min_lr={LR}",
        "optimizer.warmup_fraction=0.0",
        "optimizer.decay_style=constant",
        "optimizer.weight_decay=0.0",
        f"train.global_batch_size={GLOBAL}",
        f"train.micro_batch_size={MICRO}",
        f"train.train_iters={steps}",
        "train.init_method=megatron",
        f"train.init_checkpoint={work / 'mg'}",
        "checkpoint.save_at_end=false",
        "checkpoint.resume=false",
        f"logging.run_dir={work / 'run'}",
        "logging.progress=false",
        "logging.token_metrics=true",  # entropy, mean_token_accuracy: TRL always computes them
        f"reference.mode={mode}",
    ]
    if mode == "precomputed":
        sets.append(f"reference.path={work / 'ref'}")
    model = yaml_model(work / "mg")
    sets += [f"model.{k}={v}" for k, v in model.items()] + list(extra)
    args = ["--config", str(REPO / "examples/configs/quickstart.yaml")]
    for item in sets:
        args += ["--set", item]
    return args


def yaml_model(directory: Path) -> dict:
    import yaml

    model = yaml.safe_load((directory / "model.yaml").read_text())
    return {k: json.dumps(v) for k, v in model.items() if v is not None}


def trl_pairs(work: Path, steps: int) -> None:
    """This trainer's token ids in its training order -> ``work/trl_pairs.json``."""
    sys.path.insert(0, str(REPO))
    from megatron_adadpo.config import load_config
    from megatron_adadpo.data import PreferenceSampler, load_preference_dataset

    args = our_config(work, steps, "resident")
    config = load_config(args[1], args[3::2])
    dataset = load_preference_dataset(config.data)
    sampler = iter(PreferenceSampler(len(dataset), GLOBAL, MICRO, 0, 1, config.train.seed))
    rows = []
    for _ in range(steps * GLOBAL // MICRO):
        for i in next(sampler):
            pair = dataset[i]
            n = pair["prompt_length"]
            rows.append(
                dict(
                    prompt_ids=pair["chosen_ids"][:n].tolist(),
                    chosen_ids=pair["chosen_ids"][n:].tolist(),
                    rejected_ids=pair["rejected_ids"][n:].tolist(),
                )
            )
    (work / "trl_pairs.json").write_text(json.dumps(rows))


def run_ours(work: Path, steps: int, mode: str, extra: list[str]) -> list[float]:
    """This trainer's ``Trainer.train()`` (``extra``: ``--ours-set``); step-end times."""
    sys.path.insert(0, str(REPO))
    from megatron_adadpo import train
    from megatron_adadpo.config import load_config
    from megatron_adadpo.platform import cpu
    from megatron_adadpo.platform.distributed import init_distributed
    from megatron_adadpo.run.trainer import Trainer

    args = train.parse_args(our_config(work, steps, mode, extra))
    config = load_config(args.config, args.set)
    cpu.activate()
    init_distributed()
    trainer = Trainer(config)
    ends, step = [], trainer._step

    def timed_step(*a, **kw):
        out = step(*a, **kw)
        ends.append(_clocks())
        return out

    trainer._step = timed_step
    ends.append(_clocks())
    trainer.train()
    return ends


def run_trl(work: Path, steps: int, mode: str) -> list[float]:
    """TRL's ``DPOTrainer`` on the same token ids and micro-batches; step-end times."""
    import datasets
    import torch
    import transformers
    from trl import DPOConfig, DPOTrainer

    class PreTokenizedDPOTrainer(DPOTrainer):
        def _prepare_dataset(self, dataset, *args, **kwargs):
            return dataset  # already prompt_ids / chosen_ids / rejected_ids

    ends = []

    class StepEnds(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            ends.append(_clocks())

    rows = json.loads((work / "trl_pairs.json").read_text())
    hf = str(work / "hf")
    config = DPOConfig(
        output_dir=str(work / "trl_out"),
        per_device_train_batch_size=MICRO,
        gradient_accumulation_steps=GLOBAL // MICRO,
        max_steps=steps,
        learning_rate=LR,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        beta=BETA,
        loss_type=["sigmoid"],
        max_length=None,
        precompute_ref_log_probs=mode == "precomputed",
        train_sampling_strategy="sequential",
        use_cpu=True,
        bf16=False,  # TRL defaults to bf16 autocast; both frameworks train in fp32 here
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = PreTokenizedDPOTrainer(
        model=transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32),
        args=config,
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=transformers.AutoTokenizer.from_pretrained(hf),
        callbacks=[StepEnds()],
    )
    ends.append(_clocks())
    trainer.train()
    return ends


def _clocks() -> tuple[float, float]:
    """(wall time, CPU time of this process: what a step costs on a machine other jobs share)."""
    return time.perf_counter(), time.process_time()


def worker(args) -> None:
    """One framework, one mode, in this (fresh) process: prints one JSON line; with
    ``--profile`` the steps run under ``torch.profiler`` and the top operators are printed."""
    import contextlib
    import functools

    import torch

    torch.set_num_threads(args.threads)
    work = Path(args.work)
    run = functools.partial(run_ours, extra=args.ours_set) if args.worker == "ours" else run_trl
    profiler = contextlib.nullcontext()
    if args.profile:
        profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
    with profiler as prof:
        ends = run(work, args.steps, args.mode)
    if args.profile:
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.profile)
        print(f"PROFILE {args.worker}\n{table}", flush=True)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    wall = [b[0] - a[0] for a, b in zip(ends[:-1], ends[1:], strict=False)]
    cpu = [b[1] - a[1] for a, b in zip(ends[:-1], ends[1:], strict=False)]
    print("RESULT " + json.dumps(dict(step_s=wall, cpu_s=cpu, peak_rss_mib=peak_mib)), flush=True)


def spawn(work: Path, args, framework: str, mode: str, profile: int = 0) -> dict:
    cmd = [sys.executable, __file__, "--worker", framework, "--mode", mode, "--work", str(work)]
    cmd += ["--steps", str(args.steps), "--threads", str(args.threads)]
    cmd += ["--profile", str(profile)] + [f"--ours-set={item}" for item in args.ours_set]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false")
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode or not lines:
        raise RuntimeError(
            f"{framework}/{mode} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
        )
    if profile:
        print(out.stdout[out.stdout.index("PROFILE ") : out.stdout.index("RESULT ")], flush=True)
    return json.loads(lines[-1][len("RESULT ") :])


def real_tokens_per_step(work: Path) -> float:
    rows = json.loads((work / "trl_pairs.json").read_text())
    total = sum(
        2 * len(r["prompt_ids"]) + len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in rows
    )
    return total / (len(rows) / GLOBAL)


def run_shape(shape: str, args) -> dict:
    """Both frameworks at ``shape``, both reference modes, alternating; the shape's result."""
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        make_inputs(work, shape, pairs=args.steps * GLOBAL)
        trl_pairs(work, args.steps)
        precompute = [sys.executable, "tools/precompute_reference.py"]
        precompute += our_config(work, args.steps, "resident", args.ours_set)
        precompute += ["--output", str(work / "ref")]
        subprocess.run(precompute, cwd=REPO, check=True, capture_output=True)
        runs = {(f, m): [] for f in ("ours", "trl") for m in ("resident", "precomputed")}
        for r in range(args.repeats):
            for mode in ("resident", "precomputed"):
                for framework in ("ours", "trl") if r % 2 == 0 else ("trl", "ours"):
                    runs[framework, mode].append(spawn(work, args, framework, mode))
        result = summary(runs, real_tokens_per_step(work), args, shape)
        if args.profile:
            for framework in ("ours", "trl"):
                spawn(work, args, framework, "resident", profile=args.profile)
        return result


def summary(runs: dict, tokens: float, args, shape: str) -> dict:
    """Medians over the measured steps; this trainer / TRL ratios per reference mode."""
    result = dict(model=hf_model(shape), tokens_per_step=tokens, modes={})
    for mode in ("resident", "precomputed"):
        entry = {}
        for framework in ("ours", "trl"):
            entry[framework] = dict(
                peak_rss_mib=max(run["peak_rss_mib"] for run in runs[framework, mode])
            )
            for clock, key in (("step_s", "tokens_per_s"), ("cpu_s", "tokens_per_cpu_s")):
                times = [t for run in runs[framework, mode] for t in run[clock][args.warmup :]]
                entry[framework]["median_" + clock] = statistics.median(times)
                entry[framework][key] = tokens / statistics.median(times)
        for key in ("tokens_per_s", "tokens_per_cpu_s", "peak_rss_mib"):
            entry[key + "_ratio"] = entry["ours"][key] / entry["trl"][key]
        result["modes"][mode] = entry
        print(
            f"{shape:>6s} {mode:>11s}: tokens/CPU-s ours {entry['ours']['tokens_per_cpu_s']:.0f}"
            f" TRL {entry['trl']['tokens_per_cpu_s']:.0f} ratio "
            f"{entry['tokens_per_cpu_s_ratio']:.2f}x (wall {entry['tokens_per_s_ratio']:.2f}x); "
            f"peak RSS ratio {entry['peak_rss_mib_ratio']:.2f}",
            flush=True,
        )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=8, help="measured steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="steps not measured")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    parser.add_argument(
        "--profile", type=int, default=0, help="also profile; print this many operators"
    )
    parser.add_argument("--json", help="write the results here")
    parser.add_argument(
        "--ours-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="also --set this on this trainer's runs, e.g. execution.logprob_chunk_tokens=256",
    )
    parser.add_argument("--worker", choices=["ours", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=["resident", "precomputed"], help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    args.steps += args.warmup
    sys.path.insert(0, str(REPO))
    from benchmarks.machine import emit_result, machine_line

    result = dict(machine=machine_line(), threads=args.threads, ours_set=args.ours_set, shapes={})
    for shape in args.shapes:
        result["shapes"][shape] = run_shape(shape, args)
    emit_result(result, args.json)


if __name__ == "__main__":
    main()
