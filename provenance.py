"""Where a measurement comes from: the code's commit, the machine, the moment, and strict JSON.

Every report and every benchmark table says which code produced it on which machine, so that a
number can be cited and reproduced. Nothing here imports torch: the command lines use it before
deciding whether there is any work to do.
"""
from __future__ import annotations

import json
import math
import os
import platform
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent
SCHEMA_VERSION = 2  # of the report's JSON twin: 2 adds schema_version, run.commit, typed run.options


def git_commit(folder: Path = REPO) -> str:
    """The checkout's commit, with '+changes' when its Python code differs from it, or 'unknown'."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True, timeout=5,
                              check=True).stdout.strip()
    try:
        commit = git("rev-parse", "--short=12", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", "*.py")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + ("+changes" if dirty else "")


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (or what the platform says)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def cpu_features() -> str:
    """The vector extensions that decide matmul speed here ('AVX-512', 'AMX'), or 'AVX2' / ''."""
    try:
        flags = next((line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("flags")), [])
    except OSError:
        return ""
    found = [name for flag, name in (("avx512f", "AVX-512"), ("amx_tile", "AMX")) if flag in flags]
    return " with ".join(found) if found else ("AVX2" if "avx2" in flags else "")


def machine_summary() -> str:
    """'<CPU> with <extensions>, N cores, M GiB': the machine a figure was measured on, in one phrase."""
    try:
        ram = int(Path("/proc/meminfo").read_text().split()[1]) * 1024
        memory = f", {ram / 2 ** 30:.0f} GiB"
    except (OSError, ValueError, IndexError):
        memory = ""
    features = cpu_features()
    return f"{cpu_name()}{' with ' + features if features else ''}, {os.cpu_count()} cores{memory}"


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def strict_json(value: Any, **dumps_options: Any) -> str:
    """JSON that every parser accepts: a float that is NaN or infinite is refused, never written as
    `NaN`/`Infinity` (the caller must say null and why). Paths and tuples become strings and lists."""
    return json.dumps(_plain(value), allow_nan=False, **dumps_options)


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{value} is not JSON: write null with the reason beside it")
    return value
