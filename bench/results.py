"""Measured tables as files: docs/results/<name>.md, each saying when, where, on which code and how.

A number in the documentation is only as good as the command that produced it, so every
benchmark writes its tables here with its provenance (UTC time, machine, Python, torch, commit,
the exact command, the seconds it took) instead of someone pasting them by hand. Torch-free:
a benchmark parses its arguments, and may refuse them, before importing torch.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import re
import shlex
import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Sequence

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from provenance import git_commit, machine_summary, strict_json, utc_now  # noqa: E402
from report_files import write_text_atomically  # noqa: E402

RESULTS_DIR = REPO / "docs" / "results"
NO_RESULTS = "none"
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


@dataclass(frozen=True)
class Provenance:
    """Where a measurement comes from; `line()` is the sentence every results file opens with."""

    measured: str  # ISO 8601, UTC
    machine: str
    python: str
    torch: str
    commit: str
    command: str
    seconds: float

    def line(self) -> str:
        """'Measured <when> on <machine>, Python X, torch Y, commit Z, in N s' (the caller ends it)."""
        return (f"Measured {readable_utc(self.measured)} on {self.machine}, Python {self.python}, torch {self.torch}, "
                f"commit {self.commit}, in {self.seconds:.0f} s")

    def caption(self) -> str:
        """What was run and when, for a picture's caption."""
        return (f"{self.command}\nmeasured {readable_utc(self.measured)} on {self.machine}, torch {self.torch}, "
                f"commit {self.commit}")

    def as_dict(self) -> dict[str, Any]:
        return dict(vars(self))


def readable_utc(iso: str) -> str:
    """'2026-12-03 12:29 UTC' from provenance.utc_now()'s ISO form (a person reads it)."""
    return datetime.fromisoformat(iso).strftime("%Y-%m-%d %H:%M UTC")


def torch_version() -> str:
    """torch's version from its installed metadata: no import of torch (seconds) to read it."""
    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def command_text(argv: Sequence[str]) -> str:
    """The command as a user types it in the repository root: `python bench/x.py ARGS`, quoted for a
    shell; argv[0] is the script (absolute or relative), the rest its arguments."""
    script = Path(argv[0]).resolve()
    shown = script.relative_to(REPO) if script.is_relative_to(REPO) else script
    return shlex.join(["python", str(shown), *argv[1:]])


def script_argv(script: str, argv: Sequence[str] | None) -> list[str]:
    """[script, *arguments]: what a bench's main(argv) was run with (sys.argv when argv is None)."""
    return [script, *(sys.argv[1:] if argv is None else argv)]


def provenance(command_argv: Sequence[str], seconds: float) -> Provenance:
    return Provenance(utc_now(), machine_summary(), platform.python_version(), torch_version(), git_commit(),
                      command_text(command_argv), seconds)


def results_document(title: str, body_markdown: str, origin: Provenance) -> str:
    """The file's text: the title, the provenance line, the command in a code block, the tables."""
    return (f"# {title}\n\n{origin.line()}:\n\n```bash\n{origin.command}\n```\n\n"
            f"{body_markdown.strip()}\n")


def write_results(name: str, title: str, body_markdown: str, command_argv: Sequence[str], seconds: float,
                  folder: Path = RESULTS_DIR) -> Path:
    """Write `folder`/<name>.md (atomically: a reader sees the old file or the new one, never half)."""
    path = folder / f"{name}.md"
    atomic_write(path, results_document(title, body_markdown, provenance(command_argv, seconds)))
    return path


def write_json(path: Path, value: Any) -> Path:
    """Strict JSON (no NaN, no Infinity: every parser reads it), written atomically."""
    atomic_write(path, strict_json(value, indent=2) + "\n")
    return path


def atomic_write(path: Path, text: str) -> None:
    """Into `path`'s folder (made if missing), whole or not at all."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomically(path, text)


# --------------------------------------------------------------------------------------------
# The command-line options every benchmark shares


def results_name(text: str) -> str:
    """argparse type of --results: a file name without folders (or 'none')."""
    if not NAME.fullmatch(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a results name (letters, digits, '_', '-', '.')")
    return text


def add_results_options(parser: argparse.ArgumentParser, default: str) -> None:
    """--results NAME (default `default`; 'none' with --quick, so a smoke run overwrites nothing) and
    --results-dir DIR (default docs/results)."""
    parser.add_argument("--results", type=results_name, metavar="NAME",
                        help=f"write the tables to RESULTS_DIR/NAME.md too (default {default}; with --quick "
                             f"{NO_RESULTS}; {NO_RESULTS}: print only)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR,
                        help=f"folder of the results files (default {RESULTS_DIR.relative_to(REPO)})")
    parser.set_defaults(results_default=default)


def resolve_results(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Fill in --results's default (none for a quick run) and refuse a folder that cannot be written."""
    if args.results is None:
        args.results = NO_RESULTS if getattr(args, "quick", False) else args.results_default
    if args.results == NO_RESULTS:
        return
    folder = args.results_dir
    existing = next((p for p in (folder, *folder.parents) if p.exists()), None)
    if existing is None or not existing.is_dir() or not os.access(existing, os.W_OK):
        parser.error(f"--results-dir {folder} cannot be written")


def save_results(args: argparse.Namespace, title: str, body_markdown: str, command_argv: Sequence[str],
                 seconds: float) -> Path | None:
    """Write the tables where --results says (None when it says none), and say where."""
    if args.results == NO_RESULTS:
        return None
    path = write_results(args.results, title, body_markdown, command_argv, seconds, args.results_dir)
    print(f"\nresults: {path}")
    return path
