"""The benchmarks: each answers --help and a bad argument without torch, runs its quick mode on the
tiny preset, writes its results file with its provenance, and writes only strict JSON; and
regenerate_results.py rewrites the README's generated blocks (and nothing else) or fails loudly.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

import bench_detection  # noqa: E402
import bench_engine  # noqa: E402
import bench_load_memory  # noqa: E402
import bench_recovery  # noqa: E402
import regenerate_results  # noqa: E402
from provenance import strict_json  # noqa: E402
from recovery_plots import readable_log_ticks  # noqa: E402
from report_files import json_path, write_report  # noqa: E402
from results import Provenance  # noqa: E402

BENCHES = {"engine": bench_engine, "load_memory": bench_load_memory, "detection": bench_detection,
           "recovery": bench_recovery}
SCRIPTS = [*(f"bench/bench_{name}.py" for name in BENCHES), "bench/regenerate_results.py"]
TORCH_IMPORTED = re.compile(r"\|\s+torch$", re.MULTILINE)  # python -X importtime's line for the torch package


def refuse(constant: str):
    raise ValueError(f"{constant} is not JSON")


def strict_load(text: str):
    """json.loads that refuses NaN, Infinity and -Infinity (Python's json accepts them by default)."""
    return json.loads(text, parse_constant=refuse)


def run_script(script: str, *args: str) -> subprocess.CompletedProcess:
    """The script as a user runs it, with -X importtime: stderr then says whether torch was imported."""
    return subprocess.run([sys.executable, "-X", "importtime", script, *args], cwd=REPO, capture_output=True,
                          text=True, timeout=60)


def messages(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip() and not line.startswith("import time:")]


# --------------------------------------------------------------------------------------------
# Answers before torch


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_is_answered_without_importing_torch(script):
    done = run_script(script, "--help")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage:")
    assert not TORCH_IMPORTED.search(done.stderr), "--help imported torch"


@pytest.mark.parametrize("script, args", [(s, ("--no-such-option",)) for s in SCRIPTS]
                         + [(f"bench/bench_{name}.py", ("--model-dir", "/no/such/folder")) for name in BENCHES]
                         + [(f"bench/bench_{name}.py", ("--results", "../elsewhere")) for name in BENCHES])
def test_a_bad_argument_is_one_line_and_exit_2_without_torch(script, args):
    done = run_script(script, *args)
    assert done.returncode == 2
    [line] = messages(done.stderr)
    assert "error:" in line
    assert not TORCH_IMPORTED.search(done.stderr)


def test_a_model_dir_without_config_is_refused_before_torch(tmp_path):
    done = run_script("bench/bench_recovery.py", "--model-dir", str(tmp_path))
    assert done.returncode == 2
    [line] = messages(done.stderr)
    assert "no config.json" in line
    assert not TORCH_IMPORTED.search(done.stderr)


@pytest.mark.parametrize("name", BENCHES)
def test_a_quick_run_writes_no_results_file_unless_asked(name):
    parse = BENCHES[name].parse_args
    assert parse([]).results == name
    assert parse(["--quick"]).results == "none"
    assert parse(["--quick", "--results", "smoke"]).results == "smoke"


# --------------------------------------------------------------------------------------------
# Quick runs on the tiny preset: a results file with its provenance, strict JSON


def assert_results_file(path: Path, script: str) -> str:
    """The file opens with its title, then when/where/which code, then the exact command."""
    text = path.read_text()
    title, measured, fence, command = text.splitlines()[0], text.splitlines()[2], *text.splitlines()[4:6]
    assert title.startswith("# ")
    assert re.match(r"Measured \d{4}-\d\d-\d\d \d\d:\d\d UTC on .+, Python \S+, torch \S+, commit \S+, in \d+ s:$",
                    measured), measured
    assert fence == "```bash" and command.startswith(f"python {script} --quick")
    assert "|---" in text  # a table
    return text


def test_engine_quick(tiny_checkpoint, tmp_path):
    assert bench_engine.main(["--quick", "--model-dir", str(tiny_checkpoint), "--dtype", "float32",
                              "--results", "engine", "--results-dir", str(tmp_path)]) == 0
    text = assert_results_file(tmp_path / "engine.md", "bench/bench_engine.py")
    assert "prefill 32 tokens, threads" in text and "same argmax: True" in text
    assert "### decode step: processes against threads against bare gloo" in text
    for row in ("threads", "device code on gloo", "bare gloo calls"):
        assert re.search(rf"^\| tiny \| {row} \|( [\d.]+ \|){{3}}  \|  \|  \|$", text, re.MULTILINE), row
    assert re.search(r"^\| tiny \| processes \|( [\d.]+ \|){5} (yes|no) \|$", text, re.MULTILINE)
    assert re.search(r"^- tiny: \d+ calls: .*allgather\(", text, re.MULTILINE)  # recorded from a real step
    assert "### many requests in flight: decode throughput by batch size" in text
    for batch, targets in ((1, "-"), (4, r"prefill >= 90%: (yes|no)")):  # batch 32's targets: not in a quick run
        assert re.search(rf"^\| {batch} \|( [\d.]+ \|){{6}} [\d.]+x \|( [\d.]+ \|){{2}} \d+% \| {targets} \|$",
                         text, re.MULTILINE), batch
    invariance = re.search(r"(\d+) tokens compared, (\d+) requests differ, (\d+) of them first at a near-tie", text)
    assert invariance and int(invariance[1]) == 4 * 6 and invariance[2] == invariance[3]


def test_a_step_s_recorded_calls_are_written_with_their_repeats_folded():
    from step_costs import folded

    assert folded(["a", "b"] * 3 + ["a", "c"]) == "3 x [a, b], then a, c"
    assert folded(["x"] * 4 + ["y"], period=1) == "4 x x, then y"
    assert folded(["a", "b"]) == "a, b"


def test_load_memory_quick(tiny_checkpoint, tmp_path):
    assert bench_load_memory.main(["--quick", "--model-dir", str(tiny_checkpoint), "--devices", "2",
                                   "--results", "load_memory", "--results-dir", str(tmp_path)]) == 0
    text = assert_results_file(tmp_path / "load_memory.md", "bench/bench_load_memory.py")
    assert "| float32 |" in text and "| bfloat16 |" not in text


def test_load_memory_child_writes_strict_json(tiny_checkpoint):
    measured = strict_load(strict_json(bench_load_memory.measure_load(tiny_checkpoint, "float32", 2)))
    assert measured["devices"] == 2 and measured["after"]["VmHWM"] >= measured["before"]["VmRSS"]


def test_detection_quick(tiny_checkpoint, tmp_path):
    # one detector: the load test's burner processes cost seconds each to start
    assert bench_detection.main(["--quick", "--model-dir", str(tiny_checkpoint), "--detector", "phi",
                                 "--load-windows", "1", "--results", "detection", "--results-dir", str(tmp_path)]) == 0
    text = assert_results_file(tmp_path / "detection.md", "bench/bench_detection.py")
    assert "| threads | phi |" in text and "in 1 windows" in text


def test_detection_of_a_wedge_quick(tiny_checkpoint, tmp_path, capsys):
    assert bench_detection.main(["--quick", "--model-dir", str(tiny_checkpoint), "--detector", "timeout",
                                 "--fault", "wedge", "--load-windows", "0"]) == 0
    out = capsys.readouterr().out
    assert "Detecting a wedged device" in out and "(declared by no-progress)" in out and "| threads | timeout |" in out


def test_recovery_quick_writes_its_tables_pictures_and_strict_json(tiny_checkpoint, tmp_path):
    plot, data = tmp_path / "pictures" / "recovery_vs_context.png", tmp_path / "recovery.json"
    assert bench_recovery.main(["--quick", "--model-dir", str(tiny_checkpoint), "--heartbeat-interval", "0.05",
                                "--heartbeat-timeout", "0.25", "--lengths", "16", "--reassign", "random",
                                "--plot", str(plot), "--json", str(data), "--batch-requests", "1", "4",
                                "--results", "recovery", "--results-dir", str(tmp_path)]) == 0
    text = assert_results_file(tmp_path / "recovery.md", "bench/bench_recovery.py")
    assert "](pictures/recovery_vs_context.png)" in text and "](pictures/interruption_vs_context.png)" in text
    assert plot.is_file() and (plot.parent / "interruption_vs_context.png").is_file()
    saved = strict_load(data.read_text())
    assert saved["provenance"]["command"].startswith("python bench/bench_recovery.py --quick")
    rows = {row["strategy"]: row for trial in saved["trials"] for row in trial["rows"]}
    assert rows["replicate"]["flop_ratio"] is None  # it does no FLOPs: null, never Infinity
    assert rows["full-recompute"]["flop_ratio"] == 1.0
    assert "## The interruption against the tokens in flight (many requests)" in text
    batch_rows = re.findall(r"^\| (1|4) \| (\d+|-) \| ([a-z-]+) \| (\d+) \| (.*) \|$", text, re.MULTILINE)
    assert {(requests, strategy) for requests, _, strategy, _, _ in batch_rows} == {
        (n, s) for n in ("1", "4") for s in ("full-recompute", "reuse-replay", "reuse-hidden", "replicate")}
    for requests, tokens, strategy, holds, rest in batch_rows:
        if (requests, strategy) == ("4", "reuse-hidden"):  # its layer inputs leave room for 2 such requests
            assert tokens == "-" and rest.startswith("does not fit: the budget holds 2") and holds == "2"
        else:
            assert int(tokens) > 0 and rest.endswith("| yes"), (requests, strategy, rest)  # lossless


def test_the_demo_writes_strict_json(tiny_demo_run, tmp_path):
    _, report, _ = tiny_demo_run
    path = tmp_path / "report.txt"
    write_report(path, report)
    assert strict_load(json_path(path).read_text())["comparison"]


# --------------------------------------------------------------------------------------------
# regenerate_results.py: the README's generated blocks


README_TEXT = """# Title

Some text that stays.

<!-- results:first-screen -->
old screen
<!-- /results:first-screen -->

More text, with a `code span`.

<!-- results:headline -->
| old | table |
<!-- /results:headline -->

The end.
"""


def test_rewriting_the_readme_replaces_only_the_blocks(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(README_TEXT)
    regenerate_results.rewrite_readme(readme, {"first-screen": "new screen", "headline": "| new | table |"})
    text = readme.read_text()
    assert "old" not in text and "new screen" in text and "| new | table |" in text
    assert text == (README_TEXT.replace("old screen", "new screen").replace("| old | table |", "| new | table |"))


@pytest.mark.parametrize("damage", ["<!-- /results:headline -->", "<!-- results:first-screen -->"])
def test_a_missing_marker_fails_loudly_and_leaves_the_readme_untouched(tmp_path, damage):
    readme = tmp_path / "README.md"
    readme.write_text(README_TEXT.replace(damage, ""))
    before = readme.read_text()
    with pytest.raises(regenerate_results.MarkerError, match="results:"):
        regenerate_results.rewrite_readme(readme, {"first-screen": "new", "headline": "new"})
    assert readme.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["README.md"]  # no temporary file left


def test_a_doubled_marker_fails(tmp_path):
    with pytest.raises(regenerate_results.MarkerError):
        regenerate_results.replace_block(README_TEXT + "<!-- results:headline -->\n", "headline", "new")


def test_the_demo_output_becomes_demo_md_and_the_readme_blocks(tiny_demo_run, tmp_path, capsys):
    import execution_optimization_algorithm_demo as demo

    _, report, _ = tiny_demo_run
    demo.print_summary(report, tmp_path / "report.txt")  # what --quiet prints
    stdout = capsys.readouterr().out
    origin = Provenance("2026-12-03T12:00:00+00:00", "a test machine", "3.11", "2.x", "abc123",
                        "python execution_optimization_algorithm_demo.py --quiet", 12.0)
    page, blocks = regenerate_results.demo_documents(stdout, report, origin, peak_rss_bytes=6_700_000_000)
    screen = regenerate_results.first_screen(stdout)
    assert "report: " not in screen and screen in page and screen in blocks["first-screen"]
    for block in blocks.values():
        assert "2026-12-03 12:00 UTC on a test machine" in block and "commit abc123" in block
        assert "`python execution_optimization_algorithm_demo.py --quiet`" in block
        assert "peak resident memory 6.7 GB" in block
    header, _, *rows = [line for line in blocks["headline"].splitlines() if line.startswith("|")]
    assert "crash to next token s" in header
    assert [row.split(" | ")[0].lstrip("| ") for row in rows] == [row["name"] for row in report["comparison"]]
    assert all(row.endswith("| yes |") for row in rows)  # the tiny run is lossless


def test_dry_run_lists_the_steps_without_running_them():
    done = run_script("bench/regenerate_results.py", "--dry-run")
    assert done.returncode == 0, done.stderr
    for step in regenerate_results.STEPS:
        assert f"python {' '.join(step.argv)}" in done.stdout
    assert "min in all" in done.stdout and not TORCH_IMPORTED.search(done.stderr)
    only = run_script("bench/regenerate_results.py", "--only", "engine", "--dry-run")
    assert "bench_engine.py" in only.stdout and "bench_recovery.py" not in only.stdout


# --------------------------------------------------------------------------------------------
# The pictures' log axes


@pytest.mark.parametrize("low, high", [(0.9, 45), (0.01, 42), (0.247, 0.297), (1.05, 2.95), (5.3, 5.9),
                                       (0.2501, 0.2509)])
def test_a_log_axis_always_has_ticks_to_read_values_from(low, high):
    ticks, (bottom, top) = readable_log_ticks(low, high)
    assert bottom <= low and top >= high
    inside = [t for t in ticks if bottom <= t <= top]
    assert len(inside) >= 2 and len({f"{t:g}" for t in ticks}) == len(ticks)
    assert len(inside) >= 4 or (bottom, top) != (low, high)  # values can be read off between two ticks
    assert len(ticks) <= 13  # readable, not a comb
