"""What a test asserts about a command-line run that must refuse its input."""

import subprocess


def one_error_line(out: subprocess.CompletedProcess) -> str:
    """The single ``error: ...`` line of a run that exited with status 2 and no traceback."""
    lines = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert out.returncode == 2 and len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    return lines[0]
