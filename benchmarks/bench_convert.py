"""HF <-> Megatron conversion throughput and peak RSS on a synthetic Llama-shaped checkpoint.

    python benchmarks/bench_convert.py [--layers 12] [--hidden 2048] [--shard-gb 0.4]

Writes random bf16 safetensors shards (Llama 2 style: GQA, untied, vocab 32000; ~1.3 GB with
the defaults, nothing downloaded), then runs both CLIs as child processes and reports wall
time, GB/s (weight bytes / wall time, process start included) and each child's peak RSS
(``getrusage(RUSAGE_CHILDREN).ru_maxrss`` measured by a fresh wrapper per run), next to the
RSS of a child that only imports the converter (the interpreter baseline). Finally checks that
HF -> Megatron -> HF returned every tensor bit-identical.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
_MEASURE = (
    "import resource, subprocess, sys, time; t = time.perf_counter(); "
    "rc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode; "
    "dt = time.perf_counter() - t; "
    "print(rc, dt, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
)


def hf_names_shapes(a) -> list[tuple[str, tuple[int, ...]]]:
    h, f, v, d = a.hidden, a.ffn, a.vocab, a.hidden // a.heads
    q, kv = a.heads * d, a.groups * d
    out = [("model.embed_tokens.weight", (v, h))]
    for i in range(a.layers):
        p = f"model.layers.{i}."
        out += [
            (p + "input_layernorm.weight", (h,)),
            (p + "self_attn.q_proj.weight", (q, h)),
            (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.v_proj.weight", (kv, h)),
            (p + "self_attn.o_proj.weight", (h, q)),
            (p + "post_attention_layernorm.weight", (h,)),
            (p + "mlp.gate_proj.weight", (f, h)),
            (p + "mlp.up_proj.weight", (f, h)),
            (p + "mlp.down_proj.weight", (h, f)),
        ]
    return out + [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]


def write_synthetic(a, directory: Path) -> tuple[int, int]:
    """Random bf16 shards of at most ``a.shard_gb``; returns (total bytes, largest shard bytes)."""
    directory.mkdir(parents=True)
    limit = int(a.shard_gb * 1e9)
    groups, current, size = [], [], 0
    for name, shape in hf_names_shapes(a):
        nbytes = 2 * torch.Size(shape).numel()
        if current and size + nbytes > limit:
            groups.append((current, size))
            current, size = [], 0
        current.append((name, shape))
        size += nbytes
    groups.append((current, size))
    g = torch.Generator().manual_seed(0)
    weight_map = {}
    for i, (items, _) in enumerate(groups):
        file = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {n: (torch.randn(s, generator=g) * 0.02).bfloat16() for n, s in items}
        save_file(tensors, str(directory / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file))
        del tensors
    total = sum(s for _, s in groups)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": a.hidden,
        "intermediate_size": a.ffn,
        "num_hidden_layers": a.layers,
        "num_attention_heads": a.heads,
        "num_key_value_heads": a.groups,
        "vocab_size": a.vocab,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_act": "silu",
    }
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    sys.path.insert(0, str(ROOT))
    from tests.convert_models import make_tokenizer

    make_tokenizer(directory, size=1000)
    return total, max(s for _, s in groups)


def measure(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS GB) of ``cmd`` run as a child of a fresh wrapper process."""
    out = subprocess.run(
        [sys.executable, "-c", _MEASURE, *cmd], capture_output=True, text=True, check=True
    )
    rc, seconds, kib = out.stdout.split()
    if rc != "0":
        raise RuntimeError(f"{cmd} exited with {rc}")
    return float(seconds), int(kib) * 1024 / 1e9


def identical(a: Path, b: Path) -> bool:
    index = json.loads((a / "model.safetensors.index.json").read_text())["weight_map"]
    index_b = json.loads((b / "model.safetensors.index.json").read_text())["weight_map"]
    if sorted(index) != sorted(index_b):
        return False
    for name, file in index.items():
        with safe_open(a / file, "pt") as fa, safe_open(b / index_b[name], "pt") as fb:
            if not torch.equal(fa.get_tensor(name), fb.get_tensor(name)):
                return False
    return True


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--ffn", type=int, default=5632)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--groups", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--shard-gb", type=float, default=0.4)
    p.add_argument("--workdir", default=None)
    a = p.parse_args()
    work = Path(a.workdir or tempfile.mkdtemp(prefix="bench_convert_"))
    total, largest = write_synthetic(a, work / "hf")
    py = sys.executable
    base_s, base_gb = measure([py, "-c", "import megatron_adadpo.convert"])
    to_mg = [py, str(ROOT / "tools/convert_hf_to_megatron.py"), "--hf-dir", str(work / "hf"),
             "--output", str(work / "mg"), "--no-progress"]  # fmt: skip
    to_hf = [py, str(ROOT / "tools/convert_megatron_to_hf.py"), "--checkpoint", str(work / "mg"),
             "--output", str(work / "hf_back"), "--no-progress",
             "--max-shard-size-gb", str(a.shard_gb * 1e9 / 1024**3)]  # fmt: skip
    mg_s, mg_gb = measure(to_mg)
    hf_s, hf_gb = measure(to_hf)
    ok = identical(work / "hf", work / "hf_back")
    print(f"synthetic checkpoint: {total / 1e9:.2f} GB bf16, largest shard {largest / 1e9:.2f} GB")
    print(f"interpreter (import megatron_adadpo.convert): {base_s:.1f} s, {base_gb:.2f} GB RSS")
    print("| direction | wall s | GB/s | peak RSS GB | RSS - interpreter GB | x largest shard |")
    print("|---|---|---|---|---|---|")
    for name, s, gb in (("HF -> Megatron", mg_s, mg_gb), ("Megatron -> HF", hf_s, hf_gb)):
        extra = gb - base_gb
        print(
            f"| {name} | {s:.1f} | {total / 1e9 / s:.2f} | {gb:.2f} | {extra:.2f} | "
            f"{extra / (largest / 1e9):.2f} |"
        )
    print(f"round trip bit-identical: {ok}")
    print(f"work dir: {work} (delete it when done)")
    started = time.strftime("%Y-%m-%d %H:%M")
    print(f"torch {torch.__version__}, {started}")


if __name__ == "__main__":
    main()
