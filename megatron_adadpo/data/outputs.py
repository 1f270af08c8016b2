"""Where preprocessing writes: what an output directory may already hold, and partial writes.

A preprocessed directory holds only ``OWN_FILES``. ``check_output_dir`` (for
``tools/preprocess_data.py --output``) refuses a directory with anything else in it (a user's
``manifest.json``, the input files themselves), an output that is one of the inputs, and one
holding another preprocessed dataset (other inputs, tokenizer or settings) unless asked to
replace it; the same dataset with changed input contents is rebuilt. A run writes into a sibling
``<name>.partial-<host>-<pid>-<random>`` first; ``new_partial`` removes such siblings left by
writers on this host that are gone (a SIGKILL), never those of live writers.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import tempfile

from megatron_adadpo.platform.processes import pid_alive

from .config import DataConfig
from .indexed import FORMAT, MANIFEST, PREFIX, read_manifest

OWN_FILES = {f"{PREFIX}.bin", f"{PREFIX}.idx", "pair_ids.npy", MANIFEST, "data_report.json"}


def check_output_dir(
    output_dir: str, config: DataConfig, input_names: list[str], replace: bool
) -> None:
    """Raise ``ValueError`` naming ``--output`` and the fix when writing there would overwrite
    or read something that is not this tool's own output, or another dataset."""
    out = os.path.realpath(output_dir)
    for spec in config.inputs:
        if isinstance(spec, (str, os.PathLike)) and os.path.exists(spec):
            path = os.path.realpath(spec)
            if path == out or path.startswith(out + os.sep):
                raise ValueError(
                    f"--output {output_dir} is (or contains) the input {spec}: the next run would "
                    "read its own outputs; write to another directory"
                )
    if not os.path.isdir(out):
        return
    foreign = sorted(set(os.listdir(out)) - OWN_FILES)
    if foreign:
        raise ValueError(
            f"--output {output_dir} holds files that are not a preprocessed dataset's "
            f"({', '.join(foreign[:5])}); use an empty or new directory"
        )
    manifest = manifest_or_none(out)
    if os.path.exists(os.path.join(out, MANIFEST)) and manifest is None:
        if replace and not _parses(out):  # our damaged manifest: --force rewrites it
            return
        raise ValueError(
            f"--output {output_dir} holds a {MANIFEST} that is not a preprocessed dataset's; "
            "use an empty or new directory"
        )
    if manifest is None or replace:
        return
    recipe = {
        "names": list(input_names),
        "tokenizer": os.path.abspath(config.tokenizer),
        "settings": json.loads(json.dumps(config.identity_settings())),  # as in manifests
    }
    stored = {
        "names": [i.get("name") for i in manifest.get("inputs", [])],
        "tokenizer": manifest.get("tokenizer", {}).get("path"),
        "settings": manifest.get("settings"),
    }
    differ = [k for k in stored if stored[k] != recipe[k]]
    if differ:
        raise ValueError(
            f"--output {output_dir} holds another preprocessed dataset (its {', '.join(differ)} "
            f"differ: inputs {', '.join(map(str, stored['names']))[:160]}); use another "
            "--output, or --force to replace it"
        )


def manifest_or_none(directory: str) -> dict | None:
    """The manifest of a preprocessed ``directory``; None when absent, damaged or foreign."""
    try:
        manifest = read_manifest(directory)
    except (ValueError, OSError):  # not JSON, unreadable
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("format") == FORMAT else None


def _parses(directory: str) -> bool:
    try:
        read_manifest(directory)
    except ValueError:  # not JSON (UnicodeDecodeError included)
        return False
    return True


def new_partial(output_dir: str) -> str:
    """A new, empty ``<output_dir>.partial-<host>-<pid>-*`` directory (its parent created),
    after removing the partial directories of dead writers on this host."""
    parent, name = os.path.split(os.path.abspath(output_dir))
    os.makedirs(parent, exist_ok=True)
    host = socket.gethostname()
    pattern = re.compile(rf"^{re.escape(name)}\.partial-(.+)-(\d+)-[^-]+$")
    for entry in os.listdir(parent):
        match = pattern.match(entry)
        if match and match.group(1) == host and not pid_alive(int(match.group(2))):
            shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)
    return tempfile.mkdtemp(prefix=f"{name}.partial-{host}-{os.getpid()}-", dir=parent)
