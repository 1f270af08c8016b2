"""Preflight of the GPU checks: every dependency imports, one ``torch.compile`` function
compiles and runs, and the versions are printed. ``benchmarks/gpu/env.sh`` runs it before any
timed check, so a missing wheel costs seconds, not a timed-out check; exit status 1 names each
missing package and the fix (``benchmarks/gpu/README.md``).

    python3 benchmarks/gpu/preflight.py [--no-compile]
"""

from __future__ import annotations

import argparse
import importlib
import platform
import sys
import time
from importlib.metadata import PackageNotFoundError, requires, version
from pathlib import Path

# (module, distribution): what the checks import (runtime, data, HF conversion, tests)
DEPENDENCIES = [
    ("numpy", "numpy"),
    ("packaging", "packaging"),
    ("yaml", "pyyaml"),
    ("tqdm", "tqdm"),
    ("psutil", "psutil"),
    ("sentencepiece", "sentencepiece"),
    ("safetensors", "safetensors"),
    ("tokenizers", "tokenizers"),
    ("transformers", "transformers"),
    ("pytest", "pytest"),
    ("pytest_timeout", "pytest-timeout"),
    ("megatron.core", "megatron-core"),
]
REPO_MODULES = ["megatron_adadpo.train", "megatron_adadpo.platform.megatron", "tests.launcher"]


def missing_modules(names=DEPENDENCIES) -> list[str]:
    """``module (pip package): error`` for each dependency that fails to import."""
    failed = []
    for module, dist in names:
        try:
            importlib.import_module(module)
        except Exception as err:  # a broken install raises more than ImportError
            failed.append(f"{module} ({dist}): {type(err).__name__}: {err}")
    return failed


def triton_pin(torch_requires: list[str] | None) -> str | None:
    """The triton version torch was built against (``triton==X`` in its requirements)."""
    for line in torch_requires or []:
        name, _, rest = line.partition("==")
        if name.strip() == "triton":
            return rest.split(";")[0].strip()
    return None


def triton_error(found: str | None, pinned: str | None, where: str = "") -> str | None:
    """A carried triton must not shadow torch's own: torch's Inductor needs the pinned one."""
    if pinned is None or found is None or found == pinned:
        return None
    return (
        f"triton {found} ({where}) is not torch's triton {pinned}: a carried triton wheel "
        "shadows torch's; remove it from .whl/ (benchmarks/gpu/README.md)"
    )


def compile_once(device: str) -> float:
    """Compile and run one small function; seconds taken (first call: compile)."""
    import torch

    @torch.compile
    def swiglu(x, w):
        a, b = (x @ w).chunk(2, dim=-1)
        return torch.nn.functional.silu(a) * b

    x = torch.randn(64, 32, device=device)
    w = torch.randn(32, 64, device=device)
    start = time.monotonic()
    got = swiglu(x, w)
    a, b = (x @ w).chunk(2, dim=-1)
    torch.testing.assert_close(got, torch.nn.functional.silu(a) * b, rtol=1e-3, atol=1e-3)
    return time.monotonic() - start


def versions() -> dict:
    import torch

    out = {"python": platform.python_version(), "torch": torch.__version__}
    out["cuda"] = torch.version.cuda
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name()
        out["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
    for _, dist in [*DEPENDENCIES, ("", "triton"), ("", "transformer-engine")]:
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = "absent"
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile step")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    errors = missing_modules() + missing_modules([(m, "this repository") for m in REPO_MODULES])
    try:
        import triton

        found, where = triton.__version__, str(Path(triton.__file__).parent)
    except ImportError:
        found = where = None
    error = triton_error(found, triton_pin(requires("torch")), where)
    errors += [error] if error else []
    for key, value in versions().items():
        print(f"{key}: {value}")
    if not errors and not args.no_compile:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            print(f"torch.compile ({device}): {compile_once(device):.1f} s")
        except Exception as err:
            errors.append(f"torch.compile on {device} failed: {type(err).__name__}: {err}")
    for error in errors:
        print(f"PREFLIGHT FAILED: {error}")
    print("preflight:", "FAILED" if errors else "ok")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
