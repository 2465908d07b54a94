"""Regenerate every measured table: docs/results/*.md and the README's generated blocks, in one command.

Runs the default demo and each benchmark as a subprocess, one after the other (never two at once:
they would slow each other down), printing each one's elapsed time and the total. Each benchmark
writes its own docs/results/<name>.md. From the demo's output this script writes
docs/results/demo.md and rewrites two blocks of README.md, between marker comments:

    <!-- results:first-screen --> ... <!-- /results:first-screen -->   the demo's first screen, as printed
    <!-- results:headline --> ... <!-- /results:headline -->           a table from the demo's JSON twin

Those blocks are never edited by hand. A missing marker stops the run before anything runs, and
the README is written atomically and only once the demo has succeeded: a failure leaves it as it was.

What runs, and how long each step was expected to take on a 2-core AMD EPYC (estimated from the
phase times measured there, not from one whole run; about 57 minutes in all; rerun on a quiet
machine, other load moves the numbers):

  demo         the default demo (4 device threads, 512-token context, 3 repeats)          ~2.5 min
  engine       float32 only (the default compute dtype), lengths 128 512, 3 repeats      ~5 min
               then a decode step on processes, threads and bare gloo (tiny and the 1B) ~3 min
               then many requests in flight at batch 1 8 32, each side in its own process,
               3 repeats, and batch invariance over 8 requests                          ~9 min
  load_memory  both dtypes, one fresh process each; the first load after a fresh write   ~2 min
  detection    both backends and detectors, 3 hangs each, 10 load windows of 512 tokens ~3.5 min
  recovery     lengths 128 512 2048, 4 devices, threads and processes, timeout detector,
               random reassignment, 1 rebuild per strategy (the full matrix takes an hour) ~7 min
               then the batch section, 1 8 32 requests of up to 512 tokens (scaled from a run
               at 32 tokens, not yet run whole)                                        ~25 min

    python bench/regenerate_results.py                    # everything
    python bench/regenerate_results.py --only demo        # the demo and the README blocks
    python bench/regenerate_results.py --dry-run          # list what would run
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from common import REPO, Parser
from report_files import json_path, picture_path
from results import RESULTS_DIR, Provenance, atomic_write, provenance, results_document

README = REPO / "README.md"
DOCS = REPO / "docs"
DEMO_REPORT = Path(tempfile.gettempdir()) / "kv_reuse_results" / "report.txt"
FIRST_SCREEN, HEADLINE = "first-screen", "headline"
GENERATED = "<!-- written by python bench/regenerate_results.py from the demo's output: never edit by hand -->"


@dataclass(frozen=True)
class Step:
    name: str
    argv: tuple[str, ...]  # the script, relative to the repository root, and its arguments
    estimate_s: int        # expected seconds on the 2-core machine it was sized on
    writes: str

    def command(self) -> list[str]:
        return [sys.executable, *self.argv]


STEPS = (
    Step("demo", ("execution_optimization_algorithm_demo.py", "--quiet", "--report", str(DEMO_REPORT)), 150,
         f"docs/results/demo.md, docs/timeline.png, docs/phases.png and README.md's blocks {FIRST_SCREEN} and "
         f"{HEADLINE}"),
    Step("engine", ("bench/bench_engine.py", "--dtype", "float32"), 1020, "docs/results/engine.md"),
    Step("load_memory", ("bench/bench_load_memory.py", "--first-load"), 120, "docs/results/load_memory.md"),
    Step("detection", ("bench/bench_detection.py", "--repeats", "3", "--load-windows", "10", "--load-context", "512"),
         210, "docs/results/detection.md"),
    Step("recovery", ("bench/bench_recovery.py", "--lengths", "128", "512", "2048", "--devices", "4", "--backend",
                      "threads", "processes", "--reassign", "random", "--repeats", "1"), 1920,
         "docs/results/recovery.md, docs/recovery_vs_context.png, docs/interruption_vs_context.png"),
    Step("serving", ("bench/bench_serving.py",), 600, "docs/results/serving.md"),
)


class MarkerError(Exception):
    """README.md lacks a generated block's pair of markers (or has them twice, or in the wrong order)."""


# --------------------------------------------------------------------------------------------
# The README's generated blocks


def markers(name: str) -> tuple[str, str]:
    return f"<!-- results:{name} -->", f"<!-- /results:{name} -->"


def check_markers(text: str, names: Sequence[str]) -> None:
    """Each block's opening marker once, then its closing marker once; else MarkerError, saying which."""
    for name in names:
        start, end = markers(name)
        if text.count(start) != 1 or text.count(end) != 1 or text.index(start) > text.index(end):
            raise MarkerError(f"README.md must hold {start} once, then {end} once (found {text.count(start)} and "
                              f"{text.count(end)})")


def replace_block(text: str, name: str, content: str) -> str:
    """`text` with what lies between the block's markers replaced by `content` (the markers stay)."""
    check_markers(text, [name])
    start, end = markers(name)
    head, rest = text.split(start)
    _, tail = rest.split(end)
    return f"{head}{start}\n{content.strip()}\n{end}{tail}"


def rewrite_readme(path: Path, blocks: Mapping[str, str]) -> None:
    """Replace every named block, then write the file atomically: any missing marker raises
    before anything is written, so the README is either wholly updated or untouched."""
    text = path.read_text()
    for name, content in blocks.items():
        text = replace_block(text, name, content)
    atomic_write(path, text)


# --------------------------------------------------------------------------------------------
# What the demo printed and saved


def first_screen(stdout: str) -> str:
    """The block `--quiet` prints (the first screen and the rebuild table), without the report's path line."""
    lines = stdout.rstrip().splitlines()
    while lines and (lines[-1].startswith("report: ") or not lines[-1].strip()):
        lines.pop()
    if not lines:
        raise ValueError("the demo printed no first screen")
    return "\n".join(lines)


def describe_run(report: Mapping[str, Any]) -> str:
    """What the demo ran, in one phrase, from its JSON twin."""
    model, failure = report["model"], report["failure"]
    kind = "random weights" if model["synthetic"] else "real weights"
    return (f"{model.get('name', Path(model['path']).name)} ({kind}), {report['system']['devices']} devices on "
            f"{report['run']['backend']}, Device-{failure['device']} crashing after {failure['after_tokens']} tokens, "
            f"{report['comparison_meta']['context_tokens']}-token context, {failure['detector']} detector, "
            f"{model['compute_dtype']}")


def headline_table(report: Mapping[str, Any]) -> str:
    """Per strategy: the whole interruption, the rebuild's median, the saving against full
    recompute and whether every lossless check passed (a strategy that could not run says why)."""
    lines = ["| strategy | crash to next token s | KV rebuild s (median) | saved against full recompute | lossless |",
             "|---|---:|---:|---:|---|"]
    full = next((row for row in report["comparison"] if row["name"] == "full-recompute"), None)
    for row in report["comparison"]:
        if row.get("interruption_s") is None:
            lines.append(f"| {row['name']} | could not run: {row.get('error') or row.get('verdict')} | | | |")
            continue
        saved = row.get("interruption_saved_fraction")
        saving = "-" if row is full or saved is None else \
            f"{full['interruption_s'] - row['interruption_s']:.3f} s ({saved:.0%})"
        lines.append(f"| {row['name']} | {row['interruption_s']:.3f} | {row['median_s']:.4f} | {saving} | "
                     f"{'yes' if row['lossless'] else 'NO'} |")
    return "\n".join(lines)


def demo_documents(stdout: str, report: Mapping[str, Any], origin: Provenance,
                   peak_rss_bytes: int) -> tuple[str, dict[str, str]]:
    """docs/results/demo.md's text, and the README's two blocks."""
    screen, table, run = first_screen(stdout), headline_table(report), describe_run(report)
    link = f"[{RESULTS_DIR.relative_to(REPO)}/demo.md]({RESULTS_DIR.relative_to(REPO)}/demo.md)"
    said = (f"{origin.line()}, peak resident memory {peak_rss_bytes / 1e9:.1f} GB: `{origin.command}` ({run})")
    page = results_document(
        "The demo: what losing a device cost", f"{run}.\n\nThe first screen and the rebuild table, as printed:\n\n"
        f"```\n{screen}\n```\n\n## Headline\n\n{table}\n", origin)
    blocks = {FIRST_SCREEN: f"{GENERATED}\n{said}; also in {link}:\n\n```\n{screen}\n```",
              HEADLINE: f"{GENERATED}\n{table}\n\n{said}; the whole output in {link}."}
    return page, blocks


def publish_demo(stdout: str, seconds: float, peak_rss_bytes: int) -> None:
    """Write demo.md and rewrite the README's blocks from the demo's stdout and JSON twin; everything
    is composed before the first write, and each file is replaced atomically."""
    step = STEPS[0]
    report = json.loads(json_path(DEMO_REPORT).read_text())
    page, blocks = demo_documents(stdout, report, provenance([str(REPO / step.argv[0]), *step.argv[1:]], seconds),
                                  peak_rss_bytes)
    rewrite_readme(README, blocks)
    atomic_write(RESULTS_DIR / "demo.md", page)
    for picture in ("timeline", "phases"):  # the README's picture and docs/benchmarks.md's
        copy_atomically(picture_path(DEMO_REPORT, picture), DOCS / f"{picture}.png")


def copy_atomically(source: Path, target: Path) -> None:
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        shutil.copyfile(source, tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------


def minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min"


def peak_child_rss_bytes() -> int:
    """The largest resident memory any finished child reached (Linux counts KiB): the demo runs
    first, so right after it this is the demo's own peak."""
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024


def run_step(step: Step) -> tuple[int, float]:
    """Run one step in the repository root; the demo's stdout is kept (it is what is published),
    every other output goes straight to the terminal. Returns (exit status, seconds)."""
    started = time.perf_counter()
    if step.name == "demo":
        DEMO_REPORT.parent.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(step.command(), cwd=REPO, stdout=subprocess.PIPE, text=True, check=False)
        seconds = time.perf_counter() - started
        print(done.stdout, end="", flush=True)
        if done.returncode:
            return done.returncode, seconds
        try:
            publish_demo(done.stdout, seconds, peak_child_rss_bytes())
        except (OSError, KeyError, ValueError, MarkerError) as bad:
            print(f"error: the demo's output could not be published ({bad!r}); README.md left as it was",
                  file=sys.stderr)
            return 1, seconds
        return 0, seconds
    done = subprocess.run(step.command(), cwd=REPO, check=False)
    return done.returncode, time.perf_counter() - started


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = Parser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                    epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--only", nargs="+", choices=[step.name for step in STEPS], metavar="NAME",
                        help="regenerate only these: " + ", ".join(step.name for step in STEPS))
    parser.add_argument("--dry-run", action="store_true", help="list what would run, and how long it should take")
    args = parser.parse_args(argv)
    args.steps = [step for step in STEPS if not args.only or step.name in args.only]
    if any(step.name == "demo" for step in args.steps):
        try:
            check_markers(README.read_text(), [FIRST_SCREEN, HEADLINE])
        except (MarkerError, OSError) as bad:
            parser.error(str(bad))
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    expected = sum(step.estimate_s for step in args.steps)
    print(f"{len(args.steps)} steps, expected {minutes(expected)} in all on a 2-core machine", flush=True)
    if args.dry_run:
        for step in args.steps:
            print(f"  {step.name:<12} ~{minutes(step.estimate_s):>8}  python {' '.join(step.argv)}\n"
                  f"  {'':<12} {'':>9}  writes {step.writes}")
        return 0
    started, failed = time.perf_counter(), []
    for i, step in enumerate(args.steps, 1):
        print(f"\n[{i}/{len(args.steps)}] {step.name}: python {' '.join(step.argv)} (expected ~{minutes(step.estimate_s)})",
              flush=True)
        code, seconds = run_step(step)
        if code:
            failed.append(step.name)
        print(f"[{i}/{len(args.steps)}] {step.name} {'FAILED (exit ' + str(code) + ')' if code else 'done'} in "
              f"{minutes(seconds)}; {minutes(time.perf_counter() - started)} so far", flush=True)
    print(f"\nall done in {minutes(time.perf_counter() - started)}"
          + (f"; FAILED: {', '.join(failed)} (their results files are as they were)" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
