"""Specifications for recovery_report.py and report_files.py: what the text report shows, in which
order, and how it is written.

The report comes from a real run of the demo's scenario on the tiny preset (the session fixture
`tiny_demo_run` in conftest.py runs it once).
"""
from __future__ import annotations

import copy
import json
import platform
import re
from pathlib import Path

import pytest
import torch

import report_files
from kv_cache_reused import STRATEGIES
from recovery_report import render
from report_files import check_writable, json_path, write_report

def refuse_non_finite(constant: str):
    raise ValueError(f"{constant} is not JSON")


SECTIONS = ["Model loading", "System initialisation", "Failure detection and recovery", "KV-cache rebuild",
            "Device-level comparison", "Lossless checks", "Generated text", "Environment"]


@pytest.fixture(scope="module")
def report(tiny_demo_run) -> dict:
    return tiny_demo_run[1]


@pytest.fixture(scope="module")
def text(report) -> str:
    return render(report)


def section(text: str, title: str) -> str:
    """The body of the section whose heading contains `title` (up to the next numbered heading)."""
    match = re.search(rf"^\d+\. {re.escape(title)}[^\n]*\n-+\n(.*?)(?=^\d+\. [^\n]*\n-+\n|\Z)", text,
                      re.M | re.S)
    assert match, f"no section {title!r} in the report"
    return match.group(1)


# --------------------------------------------------------------------------------------------
# render()


def test_every_section_is_there_in_order(text):
    positions = []
    for title in SECTIONS:
        match = re.search(rf"^\d+\. {re.escape(title)}", text, re.M)
        assert match, f"section {title!r} is missing"
        positions.append(match.start())
    assert positions == sorted(positions), "sections out of order"
    numbers = [int(n) for n in re.findall(r"^(\d+)\. .*\n-+$", text, re.M)]
    assert numbers == sorted(numbers) and len(numbers) == len(set(numbers))


def test_model_loading_section(text, report, tiny_checkpoint):
    body, m = section(text, "Model loading"), report["model"]
    assert str(tiny_checkpoint) in body
    assert re.search(r"synthetic|real", body, re.I)
    c = m["config"]
    for figure in (f"{c['num_hidden_layers']} layers", f"hidden {c['hidden_size']}",
                   f"{c['num_attention_heads']} query heads", f"{c['num_key_value_heads']} KV heads",
                   f"head_dim {c['head_dim']}", f"MLP {c['intermediate_size']}", f"vocab {c['vocab_size']}"):
        assert figure in body, figure
    assert m["tensor_count"] == 3 * 9 + 2 and str(m["tensor_count"]) in body
    assert "float32" in body and m["stored_dtype"] in body
    assert f"{m['load_seconds']:.2f} s" in body


def test_system_initialisation_section(text, report):
    body, s = section(text, "System initialisation"), report["system"]
    for d in s["assignment"]:
        assert re.search(rf"Device-{d['device']}: query heads {re.escape(d['heads'])}, KV heads", body), d
    prefill_line = next(line for line in body.splitlines() if line.startswith("KV cache filled by the prefill"))
    assert f"{s['prefill_seconds']:.3f} s" in prefill_line and "cold" in prefill_line  # the KV cache filling time
    assert "keeping" not in prefill_line  # a warm prefill that keeps state is not set beside the cold one
    assert f"{s['context_tokens']} tokens" in body


def test_failure_detection_and_recovery_section(text, report):
    body, f = section(text, "Failure detection and recovery"), report["failure"]
    assert f"Device-{f['device']}" in body
    assert f"{f['heartbeat_timeout_s']} s" in body and f"{f['heartbeat_interval_s']} s" in body
    assert f"{f['detection_latency_s']:.3f} s" in body
    assert 0 < f["detection_latency_s"] <= f["heartbeat_timeout_s"] + f["heartbeat_interval_s"] + 0.3
    assert f["plan"] and all(line in body for line in f["plan"])
    assert f"{f['weight_load_seconds']:.3f} s" in body


def test_comparison_table_has_one_row_per_strategy(text, report):
    body = section(text, "KV-cache rebuild")
    rows = [line for line in body.splitlines() if line.split(" ")[0] in STRATEGIES]
    assert [r.split()[0] for r in rows] == [row["name"] for row in report["comparison"]] == list(STRATEGIES)
    for line, row in zip(rows, report["comparison"]):
        assert f"{row['median_s']:.4f}" in line and line.rstrip().endswith("yes" if row["lossless"] else "NO")
    assert "median" in body and "speedup" in body and "GFLOP" in body


def test_the_first_screen_is_the_whole_interruption_phase_by_phase(text, report):
    first = text[:text.index("1. Model loading")]
    f = report["failure"]
    assert "What losing Device-1 cost: from the crash to the next token" in first
    for row in report["comparison"]:
        phases = row["interruption_phases"]
        assert set(phases) == {"detection_s", "regroup_s", "weights_s", "rebuild_s", "redo_s"}
        assert row["interruption_s"] == pytest.approx(sum(phases.values()))
        assert phases["detection_s"] == f["detection_latency_s"] and phases["regroup_s"] == f["regroup_seconds"]
        assert phases["weights_s"] == f["weight_load_seconds"]
        assert phases["rebuild_s"] == row["median_s"] and phases["redo_s"] == row["redo_s"]
        line = next(line for line in first.splitlines() if line.startswith(row["name"]))
        assert [f"{phases[key]:.3f}" for key in ("detection_s", "regroup_s", "weights_s", "rebuild_s", "redo_s")] \
            + [f"{row['interruption_s']:.3f}"] == line.split()[1:7]
        saved = row["interruption_saved_fraction"]
        assert saved == pytest.approx(1 - row["interruption_s"] / report["comparison"][0]["interruption_s"])
        if row["name"] != "full-recompute":
            assert f"({abs(saved):.0%} {'shorter' if saved >= 0 else 'longer'})" in line


def test_the_first_screen_says_what_it_was_measured_on_and_how_many_samples_each_phase_is(text, report):
    """The part people quote must stand on its own: model, backend, devices, detector, dtype,
    context, machine, commit and date on one line; the samples behind every phase below the table."""
    first = text[:text.index("1. Model loading")]
    header = next(line for line in first.splitlines() if line.startswith("Measured on:"))
    m, e = report["model"], report["environment"]
    for part in (m["name"], "synthetic", "threads backend", f"{report['system']['devices']} devices",
                 "timeout detector", m["compute_dtype"], f"{report['comparison_meta']['context_tokens']}-token context at the failure",
                 e["cpu"], f"{e['cores']} cores", f"commit {report['run']['commit']}", report["run"]["started"][:10]):
        assert part in header, part
    samples = next(line for line in first.splitlines() if line.startswith("Samples:"))
    repeats = report["comparison_meta"]["repeats"]
    assert "detect, regroup and weights are one each" in samples and "redo is one per strategy" in samples
    assert f"median of {repeats} alternating run" in samples
    for row in report["comparison"]:
        counts = row["interruption_samples"]
        assert counts["rebuild_s"] == {"samples": repeats, "min_s": row["min_s"], "max_s": row["max_s"]}
        assert all(counts[k]["samples"] == 1 for k in ("detection_s", "regroup_s", "weights_s", "redo_s"))


def test_device_level_section_says_what_each_rebuild_computes(text, report):
    body, d = section(text, "Device-level comparison"), report["device_level"]
    assert f"rebuild all {d['all_kv_heads']} KV heads it now holds, as if it kept nothing" in body
    assert f"rebuild only the {d['inherited_kv_heads']} inherited KV heads, keeping its own" in body
    assert "stored layer inputs" in body


def test_cost_in_normal_running_compares_warm_prefills_and_decode_steps_alike(text, report):
    body = section(text, "Cost in normal running")
    assert "prefill of the context" in body and "decode step" in body
    for mode in ("nothing kept", "hidden states", "KV replica"):
        assert len(report["prefill_overhead"][mode]["seconds"]) == len(report["prefill_overhead"]["nothing kept"]["seconds"])
        assert f"{report['prefill_overhead'][mode]['median_s']:.3f} s" in body
        assert f"{report['overhead'][mode]['median_s'] * 1e3:.3f} ms" in body


def test_lossless_section_gives_each_strategys_per_head_and_logit_figures(text, report):
    body = section(text, "Lossless checks")
    for row in report["comparison"]:
        line = next(line for line in body.splitlines() if line.startswith(row["name"]))
        assert f"kept heads max |diff| {row['kept_heads_max_abs_diff']:.3g}" in line
        assert f"max relative error {row['rebuilt_heads_max_rel_error']:.3g}" in line
        assert f"logits max relative difference {row['logits_max_rel_diff']:.3g}" in line


def test_device_level_lossless_text_and_environment_sections(text, report):
    d = report["device_level"]
    body = section(text, "Device-level comparison")
    assert f"Device-{d['device']}" in body and f"{d['speedup']:.2f}x" in body
    lossless = section(text, "Lossless checks")
    for row in report["comparison"]:
        assert re.search(rf"^{re.escape(row['name'])} .*(identical|DIFFERENT)", lossless, re.M), row["name"]
    generated = section(text, "Generated text")
    assert "before the failure" in generated and "failure-free run" in generated
    for name in STRATEGIES:
        assert f"after, {name}:" in generated
    environment = section(text, "Environment")
    assert torch.__version__ in environment
    assert re.search(r"threads\s+\S", environment)
    assert re.search(r"cpu\s+\S", environment)
    assert platform.python_version() in environment


def test_a_synthetic_checkpoint_given_by_path_is_reported_as_synthetic(text, report, tiny_checkpoint):
    assert (Path(tiny_checkpoint) / "synthetic.json").is_file()
    assert report["model"]["synthetic"] is True
    assert "SYNTHETIC" in section(text, "Model loading")


# --------------------------------------------------------------------------------------------
# write_report()


def test_write_report_writes_the_text_and_its_json_twin_and_nothing_else(report, tmp_path):
    path = tmp_path / "report.txt"
    write_report(path, report)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json", "report.txt"]
    assert json_path(path) == tmp_path / "report.json"
    assert path.read_text() == render(report)
    saved = json.loads(json_path(path).read_text(), parse_constant=refuse_non_finite)
    assert saved == json.loads(json.dumps(report))  # every figure, as it was measured
    assert saved["schema_version"] == 2 and saved["run"]["commit"]
    options = saved["run"]["options"]  # with their real types
    assert options["devices"] == 4 and options["heartbeat_timeout"] == 0.25 and options["quiet"] is True
    assert options["model_dir"] is not None and options["recovery"] == list(STRATEGIES)
    t = saved["text"]
    assert t["prompt_ids"] == report["text"]["prompt_ids"] and len(t["prompt_ids"]) >= 32
    assert t["before_ids"] == report["text"]["before_ids"] and len(t["before_ids"]) == 3
    assert len(t["reference_ids"]) == 6
    assert set(t["after_ids"]) == set(STRATEGIES) and all(len(ids) == 3 for ids in t["after_ids"].values())
    for row in saved["comparison"]:
        assert len(row["seconds"]) == 1 and row["seconds"][0] == row["median_s"] > 0
        assert row["continuation_ids"] == t["after_ids"][row["name"]]


def test_writing_into_a_missing_folder_raises_and_leaves_nothing(report, tmp_path):
    missing = tmp_path / "missing" / "report.txt"
    with pytest.raises(OSError):
        write_report(missing, report)
    with pytest.raises(OSError):
        check_writable(missing)
    assert list(tmp_path.iterdir()) == []


def test_the_json_twin_refuses_nan_and_infinity_instead_of_writing_them(report, tmp_path):
    broken = copy.deepcopy(report)
    broken["comparison"][0]["speedup"] = float("inf")
    with pytest.raises(ValueError, match="not JSON"):
        write_report(tmp_path / "report.txt", broken)
    assert list(tmp_path.iterdir()) == []


def written(path: Path) -> tuple[bytes, bytes]:
    return path.read_bytes(), json_path(path).read_bytes()


@pytest.fixture
def old_report(report, tmp_path) -> tuple[Path, tuple[bytes, bytes], dict]:
    """A complete earlier report in tmp_path, and a different new one to write over it."""
    path = tmp_path / "report.txt"
    older = copy.deepcopy(report)
    older["run"]["started"] = "1999-12-31T23:59:59+00:00"
    write_report(path, older)
    newer = copy.deepcopy(report)
    newer["run"]["started"] = "2030-01-01T00:00:00+00:00"
    return path, written(path), newer


def test_a_failed_rendering_leaves_the_old_report_intact(old_report, monkeypatch):
    path, before, newer = old_report

    def broken(report):
        raise RuntimeError("rendering failed")
    monkeypatch.setattr(report_files, "render", broken)
    with pytest.raises(RuntimeError):
        write_report(path, newer)
    assert written(path) == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["report.json", "report.txt"]


def test_an_interrupted_file_write_leaves_the_old_report_intact_and_no_temp_file(old_report, monkeypatch):
    path, before, newer = old_report
    real_write_text = Path.write_text

    def disk_full(self, data, *args, **kwargs):
        real_write_text(self, data[:len(data) // 2], *args, **kwargs)
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(Path, "write_text", disk_full)
    monkeypatch.setattr(Path, "write_bytes", lambda self, data: disk_full(self, data.decode()), raising=True)
    with pytest.raises(OSError):
        write_report(path, newer)
    monkeypatch.undo()
    assert written(path) == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["report.json", "report.txt"]


def test_a_failed_json_dump_leaves_the_old_report_intact(old_report, monkeypatch):
    path, before, newer = old_report

    def broken(*args, **kwargs):
        raise TypeError("Object of type X is not JSON serializable")
    monkeypatch.setattr(report_files, "strict_json", broken)
    with pytest.raises(TypeError):
        write_report(path, newer)
    monkeypatch.undo()
    assert sorted(p.name for p in path.parent.iterdir()) == ["report.json", "report.txt"]
    assert written(path) == before
