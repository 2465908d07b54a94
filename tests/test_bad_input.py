"""Bad input is refused with one line that names the problem (issue #4): exit code 2, no traceback,
no report (nor a temporary file) left behind. Damaged synthetic checkpoints in the cache are
rewritten, never loaded.

Each case runs the demo's main() in-process (capsys); three run it as a real process to prove that
nothing but the one line reaches stderr.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file, save_file

import execution_optimization_algorithm_demo as demo
from llama_model_loader import Checkpoint
from synthetic_checkpoint import (MARKER, ensure_synthetic_checkpoint, synthetic_checkpoint_problem,
                                  write_synthetic_checkpoint)

REPO = Path(__file__).resolve().parents[1]
# A run that would be quick if it were allowed to start (tiny, short heartbeats, one repeat)
QUICK = ["--context-tokens", "0", "--new-tokens", "4", "--fail-after", "2", "--repeats", "1",
         "--heartbeat-interval", "0.05", "--heartbeat-timeout", "0.25"]


@pytest.fixture(scope="module")
def good_dir(tmp_path_factory) -> Path:
    return write_synthetic_checkpoint("tiny", tmp_path_factory.mktemp("good") / "tiny", seed=0)


@pytest.fixture(scope="module")
def good_tensors(good_dir) -> dict[str, torch.Tensor]:
    return load_file(str(good_dir / "model.safetensors"))


@pytest.fixture
def report_dir(tmp_path) -> Path:
    folder = tmp_path / "reports"
    folder.mkdir()
    return folder


def run_main(capsys, argv: list[str]) -> tuple[int, str, str]:
    code = demo.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_refused(code: int, out: str, err: str, report_dir: Path, *phrases: str) -> str:
    """Exit code 2, exactly one line `error: ...` naming the problem, nothing else, no file written."""
    assert code == 2, err
    assert "Traceback" not in err and "Traceback" not in out
    lines = err.splitlines()
    assert len(lines) == 1, f"expected one line, got {lines}"
    line = lines[0]
    assert line.startswith("error: "), line
    for phrase in phrases:
        assert phrase in line, f"{phrase!r} not in {line!r}"
    assert out == ""
    assert sorted(p.name for p in report_dir.rglob("*")) == [], "a report or temporary file was written"
    return line


# --------------------------------------------------------------------------------------------
# The model folder


def edit_config(**changes) -> Callable[[Path, dict], None]:
    def edit(folder: Path, tensors: dict) -> None:
        config = json.loads((folder / "config.json").read_text())
        config.update(changes)
        (folder / "config.json").write_text(json.dumps(config))
    return edit


def truncate(folder: Path, tensors: dict) -> None:
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:len(data) // 2])


def garbage_header(folder: Path, tensors: dict) -> None:
    (folder / "model.safetensors").write_bytes(b"\xff" * 8 + b"this is not a safetensors header" * 8)


def empty_weights(folder: Path, tensors: dict) -> None:
    (folder / "model.safetensors").write_bytes(b"")


def save_changed(change: Callable[[dict], None]) -> Callable[[Path, dict], None]:
    def edit(folder: Path, tensors: dict) -> None:
        changed = dict(tensors)
        change(changed)
        save_file(changed, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return edit


def drop_tensor(tensors: dict) -> None:
    del tensors["model.layers.1.mlp.up_proj.weight"]


def wrong_shape(tensors: dict) -> None:
    tensors["model.layers.1.self_attn.k_proj.weight"] = tensors["model.layers.1.self_attn.k_proj.weight"][:16].clone()


def integer_dtype(tensors: dict) -> None:
    tensors["model.norm.weight"] = tensors["model.norm.weight"].to(torch.int32)


def shard_missing(folder: Path, tensors: dict) -> None:
    (folder / "model.safetensors").unlink()
    names = sorted(tensors)
    first = "model-00001-of-00002.safetensors"
    save_file({n: tensors[n] for n in names[:10]}, str(folder / first), metadata={"format": "pt"})
    weight_map = {n: first if i < 10 else "model-00002-of-00002.safetensors" for i, n in enumerate(names)}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def no_config(folder: Path, tensors: dict) -> None:
    (folder / "config.json").unlink()


def config_not_json(folder: Path, tensors: dict) -> None:
    (folder / "config.json").write_text("{ hidden_size: 128")


def config_not_object(folder: Path, tensors: dict) -> None:
    (folder / "config.json").write_text("[1, 2, 3]")


MODEL_CASES = {
    "no-config": (no_config, ["no config.json"]),
    "config-not-json": (config_not_json, ["config.json", "not valid JSON"]),
    "config-not-an-object": (config_not_object, ["config.json", "not a JSON object"]),
    "not-llama": (edit_config(model_type="gpt2", architectures=["GPT2LMHeadModel"]),
                  ["not a Llama-family model", "gpt2"]),
    "heads-not-divisible": (edit_config(num_key_value_heads=3), ["8 query heads are not divisible by 3 KV heads"]),
    "zero-layers": (edit_config(num_hidden_layers=0), ["num_hidden_layers must be positive, got 0"]),
    "negative-heads": (edit_config(num_attention_heads=-8), ["num_attention_heads must be positive"]),
    "field-wrong-type": (edit_config(hidden_size="wide"), ["config.json", "wrong type"]),
    "missing-field": (lambda f, t: (edit_config()(f, t), _drop_field(f, "vocab_size")), ["missing field", "vocab_size"]),
    "unsupported-rope": (edit_config(rope_scaling={"rope_type": "yarn", "factor": 4.0}), ["rope_type 'yarn'"]),
    "unsupported-activation": (edit_config(hidden_act="gelu_pytorch_tanh"),
                               ["config.json", "hidden_act 'gelu_pytorch_tanh' is not supported"]),
    "truncated-weights": (truncate, ["model.safetensors", "not a readable safetensors file"]),
    "garbage-header": (garbage_header, ["model.safetensors", "not a readable safetensors file"]),
    "empty-weights": (empty_weights, ["model.safetensors", "not a readable safetensors file"]),
    "missing-tensor": (save_changed(drop_tensor), ["tensor model.layers.1.mlp.up_proj.weight is missing"]),
    "wrong-shape": (save_changed(wrong_shape),
                    ["model.layers.1.self_attn.k_proj.weight has shape [16, 128], the config needs [32, 128]"]),
    "integer-dtype": (save_changed(integer_dtype), ["model.norm.weight has dtype I32", "float"]),
    "index-names-missing-shard": (shard_missing,
                                  ["model.safetensors.index.json", "model-00002-of-00002.safetensors", "missing"]),
    "config-disagrees-with-tensors": (edit_config(hidden_size=256),
                                      ["model.embed_tokens.weight has shape [384, 128], the config needs [384, 256]"]),
}


def _drop_field(folder: Path, name: str) -> None:
    config = json.loads((folder / "config.json").read_text())
    del config[name]
    (folder / "config.json").write_text(json.dumps(config))


def damaged_copy(good_dir: Path, good_tensors: dict, tmp_path: Path, damage) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(good_dir, folder)
    damage(folder, good_tensors)
    return folder


def test_model_folder_that_does_not_exist(tmp_path, report_dir, capsys):
    missing = tmp_path / "no-such-model"
    result = run_main(capsys, ["--model-dir", str(missing), *QUICK, "--report", str(report_dir / "r.txt")])
    assert_refused(*result, report_dir, str(missing), "no such model folder")


def test_model_dir_that_is_a_file(tmp_path, report_dir, capsys):
    file = tmp_path / "model.bin"
    file.write_bytes(b"weights?")
    result = run_main(capsys, ["--model-dir", str(file), *QUICK, "--report", str(report_dir / "r.txt")])
    assert_refused(*result, report_dir, str(file), "no such model folder")


@pytest.mark.parametrize("case", sorted(MODEL_CASES))
def test_bad_model_folder_is_refused_in_one_line(case, good_dir, good_tensors, tmp_path, report_dir, capsys):
    damage, phrases = MODEL_CASES[case]
    folder = damaged_copy(good_dir, good_tensors, tmp_path, damage)
    result = run_main(capsys, ["--model-dir", str(folder), *QUICK, "--report", str(report_dir / "r.txt")])
    assert_refused(*result, report_dir, *phrases)


# Damage that currently escapes as a traceback (bugs, see the reasons)

def _rope_scaling_string(folder: Path, tensors: dict) -> None:
    edit_config(rope_scaling="llama3")(folder, tensors)


def _config_is_a_folder(folder: Path, tensors: dict) -> None:
    (folder / "config.json").unlink()
    (folder / "config.json").mkdir()


def _index_map_not_an_object(folder: Path, tensors: dict) -> None:
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": ["model.safetensors"]}))


def _index_shard_not_a_name(folder: Path, tensors: dict) -> None:
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"model.norm.weight": 3}}))


def _garbage_tokenizer(folder: Path, tensors: dict) -> None:
    (folder / "tokenizer.json").write_text("not a tokenizer")


@pytest.mark.parametrize("damage, phrase", [
    pytest.param(_rope_scaling_string, "rope_scaling", id="rope-scaling-not-an-object"),
    pytest.param(_config_is_a_folder, "config.json", id="config-is-a-folder"),
    pytest.param(_index_map_not_an_object, "model.safetensors.index.json", id="index-map-not-an-object"),
    pytest.param(_index_shard_not_a_name, "model.safetensors.index.json", id="index-shard-not-a-name"),
    pytest.param(_garbage_tokenizer, "tokenizer.json", id="garbage-tokenizer"),
])
def test_unusual_damage_is_refused_in_one_line_too(damage, phrase, good_dir, good_tensors, tmp_path, report_dir,
                                                   capsys):
    folder = damaged_copy(good_dir, good_tensors, tmp_path, damage)
    result = run_main(capsys, ["--model-dir", str(folder), *QUICK, "--report", str(report_dir / "r.txt")])
    assert_refused(*result, report_dir, phrase)


def run_process(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "execution_optimization_algorithm_demo.py"), *args],
                          cwd=REPO, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("case", ["truncated-weights", "devices-0", "unknown-recovery"])
def test_a_real_process_prints_one_line_and_no_traceback(case, good_dir, good_tensors, tmp_path, report_dir):
    model = good_dir
    extra: list[str] = []
    if case == "truncated-weights":
        model = damaged_copy(good_dir, good_tensors, tmp_path, truncate)
    elif case == "devices-0":
        extra = ["--devices", "0"]
    else:
        extra = ["--recovery", "teleport"]
    done = run_process(["--model-dir", str(model), *QUICK, *extra, "--report", str(report_dir / "r.txt")])
    assert_refused(done.returncode, done.stdout, done.stderr, report_dir)


# --------------------------------------------------------------------------------------------
# The command line


COMMAND_LINE_CASES = {
    "devices-0": (["--devices", "0"], ["--devices must be at least 2", "got 0"]),
    "devices-1": (["--devices", "1"], ["--devices must be at least 2", "got 1"]),
    "more-devices-than-heads": (["--devices", "9"], ["--devices 9 is more than the model's 8 query heads"]),
    "devices-not-a-number": (["--devices", "four"], ["--devices", "invalid int value"]),
    "fail-device-missing": (["--fail-device", "4"], ["--fail-device 4 does not exist"]),
    "fail-device-negative": (["--fail-device", "-1"], ["--fail-device -1 does not exist"]),
    "fail-after-all-tokens": (["--fail-after", "4"], ["--fail-after must be between 1 and"]),
    "fail-after-beyond": (["--fail-after", "9"], ["--fail-after must be between 1 and"]),
    "fail-after-zero": (["--fail-after", "0"], ["--fail-after must be between 1 and"]),
    "fail-after-negative": (["--fail-after", "-2"], ["--fail-after must be between 1 and"]),
    "timeout-equals-interval": (["--heartbeat-interval", "0.5", "--heartbeat-timeout", "0.5"],
                                ["heartbeat timeout (0.5 s) must be larger than the interval (0.5 s)"]),
    "timeout-below-interval": (["--heartbeat-interval", "1", "--heartbeat-timeout", "0.5"],
                               ["must be larger than the interval"]),
    "interval-zero": (["--heartbeat-interval", "0"], ["heartbeat interval", "must be positive"]),
    "interval-negative": (["--heartbeat-interval", "-1"], ["heartbeat interval", "must be positive"]),
    "timeout-not-finite": (["--heartbeat-timeout", "inf"], ["finite"]),
    "interval-not-a-number": (["--heartbeat-interval", "nan"], ["finite"]),
    "new-tokens-zero": (["--new-tokens", "0"], ["--new-tokens must be at least 2", "got 0"]),
    "new-tokens-negative": (["--new-tokens", "-3"], ["--new-tokens must be at least 2", "got -3"]),
    "context-beyond-positions": (["--context-tokens", "5000"], ["exceed the model's 4096 positions"]),
    "context-negative": (["--context-tokens", "-5"], ["--context-tokens must not be negative"]),
    "repeats-zero": (["--repeats", "0"], ["--repeats must be at least 1"]),
    "unknown-recovery": (["--recovery", "teleport"], ["--recovery", "invalid choice: 'teleport'"]),
    "unknown-reassign": (["--reassign", "nearest"], ["--reassign", "invalid choice: 'nearest'"]),
    "unknown-dtype": (["--dtype", "float8"], ["--dtype", "invalid choice"]),
    "unknown-option": (["--fail-fast"], ["unrecognized arguments: --fail-fast"]),
}


@pytest.mark.parametrize("case", sorted(COMMAND_LINE_CASES))
def test_impossible_arguments_are_refused_in_one_line(case, good_dir, report_dir, capsys):
    args, phrases = COMMAND_LINE_CASES[case]
    argv = ["--model-dir", str(good_dir), *QUICK, *args, "--report", str(report_dir / "r.txt")]
    assert_refused(*run_main(capsys, argv), report_dir, *phrases)


def test_report_in_a_missing_folder_is_refused(good_dir, tmp_path, report_dir, capsys):
    target = tmp_path / "missing" / "r.txt"
    result = run_main(capsys, ["--model-dir", str(good_dir), *QUICK, "--report", str(target)])
    assert_refused(*result, report_dir, "--report", "does not exist")
    assert not target.parent.exists()


def test_report_under_a_regular_file_is_refused(good_dir, report_dir, capsys):
    blocker = report_dir / "file.txt"
    blocker.write_text("not a folder")
    code, out, err = run_main(capsys, ["--model-dir", str(good_dir), *QUICK, "--report", str(blocker / "r.txt")])
    assert code == 2 and err.startswith("error: ") and len(err.splitlines()) == 1 and "is a file" in err
    assert sorted(p.name for p in report_dir.iterdir()) == ["file.txt"]


def test_report_path_that_is_an_existing_folder_is_refused_before_running(good_dir, report_dir, capsys):
    (report_dir / "r.txt").mkdir()
    code, out, err = run_main(capsys, ["--model-dir", str(good_dir), *QUICK, "--report", str(report_dir / "r.txt")])
    assert code == 2 and len(err.splitlines()) == 1 and "is a folder" in err
    assert sorted(p.name for p in report_dir.rglob("*")) == ["r.txt"]


# --------------------------------------------------------------------------------------------
# A damaged synthetic checkpoint in the cache


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv("KV_REUSE_CACHE", str(folder))
    return folder


def written_tiny(logs: list[str]) -> Path:
    return ensure_synthetic_checkpoint("tiny", 0, log=logs.append)


def flip_header_byte(folder: Path, tensors: dict) -> None:
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[20] ^= 0x01
    weights.write_bytes(bytes(data))


def drop_marker(folder: Path, tensors: dict) -> None:
    (folder / MARKER).unlink()


@pytest.mark.parametrize("damage, reason", [
    (truncate, "wrong size"),
    (flip_header_byte, "header"),
    (drop_marker, "no completion marker"),
])
def test_damaged_synthetic_checkpoint_is_rewritten_not_loaded(cache, damage, reason):
    folder = written_tiny([])
    original = (folder / "model.safetensors").read_bytes()
    damage(folder, {})
    assert reason in synthetic_checkpoint_problem(folder, "tiny", 0)
    logs: list[str] = []
    assert written_tiny(logs) == folder
    assert len(logs) == 1 and reason in logs[0]
    assert (folder / "model.safetensors").read_bytes() == original
    assert synthetic_checkpoint_problem(folder, "tiny", 0) is None
    Checkpoint(folder)


def test_a_killed_writers_temporary_file_is_removed_and_the_checkpoint_rewritten(cache):
    folder = written_tiny([])
    (folder / MARKER).unlink()
    (folder / "model.safetensors").unlink()
    dead_pid = 2 ** 22 + 12345  # above the default pid_max: no such process
    leftover = folder / f".model.safetensors.{dead_pid}.tmp"
    leftover.write_bytes(b"half a checkpoint")
    logs: list[str] = []
    assert written_tiny(logs) == folder and logs
    assert synthetic_checkpoint_problem(folder, "tiny", 0) is None
    assert not leftover.exists()
    assert sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp")) == []


def test_intact_synthetic_checkpoint_is_reused_without_rewriting(cache):
    logs: list[str] = []
    folder = written_tiny(logs)
    assert len(logs) == 1 and "not written yet" in logs[0]
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    logs.clear()
    assert ensure_synthetic_checkpoint("tiny", 0, log=logs.append) == folder
    assert logs == [] and (folder / "model.safetensors").stat().st_mtime_ns == stamp


def test_synthetic_checkpoint_cli_rewrites_a_truncated_cache_entry(cache):
    folder = written_tiny([])
    truncate(folder, {})
    done = subprocess.run([sys.executable, str(REPO / "synthetic_checkpoint.py"), "--preset", "tiny"],
                          cwd=REPO, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "KV_REUSE_CACHE": str(cache)})
    assert done.returncode == 0, done.stderr
    assert "wrong size" in done.stdout + done.stderr and "Traceback" not in done.stderr
    assert synthetic_checkpoint_problem(folder, "tiny", 0) is None


# --------------------------------------------------------------------------------------------
# Fast answers: what needs no tensors is answered before torch is imported


SCRIPTS = ["execution_optimization_algorithm_demo.py", "synthetic_checkpoint.py", "smollm2_checkpoint.py",
           "device_processes.py"]
# Run a script as `python SCRIPT ARGS` would, then say whether it imported torch (the cost of an answer:
# importing torch alone takes seconds on a loaded 2-core machine; without it the answer takes milliseconds).
RUN_AND_REPORT_TORCH = """
import runpy, sys
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit as done:
    code = 0 if done.code is None else done.code if isinstance(done.code, int) else 1
else:
    code = 0
print(code, 'torch' in sys.modules, file=sys.stderr)
"""


def run_watching_torch(script: str, *args: str) -> tuple[int, bool, str, str]:
    done = subprocess.run([sys.executable, "-c", RUN_AND_REPORT_TORCH, str(REPO / script), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    *err, verdict = done.stderr.splitlines()
    code, torch_seen = verdict.split()
    return int(code), torch_seen == "True", done.stdout, "\n".join(err)


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_is_answered_without_importing_torch(script):
    code, torch_seen, out, err = run_watching_torch(script, "--help")
    assert code == 0 and "usage:" in out and not torch_seen, err


@pytest.mark.parametrize("case", ["devices-1", "more-devices-than-heads", "broken-config", "missing-folder"])
def test_mistakes_in_arguments_and_config_are_answered_without_importing_torch(case, good_dir, tmp_path, report_dir):
    model = good_dir
    extra = {"devices-1": ["--devices", "1"], "more-devices-than-heads": ["--devices", "9"]}.get(case, [])
    if case == "broken-config":
        model = tmp_path / "broken"
        shutil.copytree(good_dir, model)
        (model / "config.json").write_text("{not json")
    elif case == "missing-folder":
        model = tmp_path / "nowhere"
    code, torch_seen, out, err = run_watching_torch("execution_optimization_algorithm_demo.py", "--model-dir",
                                                    str(model), *QUICK, *extra, "--report", str(report_dir / "r.txt"))
    assert_refused(code, out, err, report_dir)
    assert not torch_seen


@pytest.mark.parametrize("case, extra, phrase", [
    ("no-requests", ["--requests", "0"], "--requests must be at least 1"),
    ("no-sequences", ["--requests", "2", "--max-num-seqs", "0"], "--max-num-seqs must be positive"),
    ("budget-for-one-request", ["--max-num-seqs", "4"], "--max-num-seqs needs --requests of 2 or more"),
    ("budget-too-small", ["--requests", "2", "--kv-cache-memory-bytes", "1000"],
     "--kv-cache-memory-bytes 1000 holds 0 KV blocks of 16 positions per device, the longest request needs 1"),
    ("no-prompts-file", ["--requests", "2", "--prompts-file", "/nowhere/prompts.txt"], "--prompts-file"),
])
def test_bad_batch_options_are_answered_without_importing_torch(case, extra, phrase, good_dir, report_dir):
    code, torch_seen, out, err = run_watching_torch("execution_optimization_algorithm_demo.py", "--model-dir",
                                                    str(good_dir), *QUICK, *extra, "--report", str(report_dir / "r.txt"))
    assert_refused(code, out, err, report_dir, phrase)
    assert not torch_seen
