"""Shared fixtures: synthetic checkpoints, the Hugging Face reference model, and a thread-leak guard.

The tiny checkpoint is written fresh per session (a second); the full-size Llama-3.2-1B synthetic
checkpoint lives in the project cache (`cache_root()`, or $KV_REUSE_CACHE) so that only the first
run pays the minute it takes to write.
"""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the hub is unreachable; the reference loads local folders

import re
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from llama_model_loader import Checkpoint  # noqa: E402
from synthetic_checkpoint import ensure_synthetic_checkpoint, write_synthetic_checkpoint  # noqa: E402

THREAD_JOIN_GRACE_S = 2.0
# The quick tier (`python -m pytest -q -m "not slow"`) leaves out what costs most and proves the same
# code once more: the scenarios on the processes and serialising backends (threads run every one of
# them; tests/test_device_processes.py keeps the processes backend's own collective in the tier), the
# processes backend's end-to-end file, and every test of the full-size 1B or the converted SmolLM2.
SLOW_BACKENDS = re.compile(r"(^|-)(processes|serialising)(-|$)")
SLOW_FIXTURES = {"llama_1b_checkpoint", "smollm2_dir"}
SLOW_FILES = {"test_processes_backend.py", "test_smollm2_scenario.py", "test_smollm2_checkpoint.py"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        test_id = item.callspec.id if hasattr(item, "callspec") else ""
        if (SLOW_BACKENDS.search(test_id) or SLOW_FIXTURES & set(item.fixturenames)
                or item.path.name in SLOW_FILES):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """The 'tiny' preset (3 layers, 8 query / 2 KV heads, llama3 RoPE), seed 0, in a session tmp dir."""
    return write_synthetic_checkpoint("tiny", tmp_path_factory.mktemp("tiny-llama") / "tiny", seed=0)


@pytest.fixture(scope="session")
def llama_1b_checkpoint() -> Path:
    """The full-size synthetic Llama-3.2-1B in the project cache (written once, about a minute)."""
    return ensure_synthetic_checkpoint("llama-3.2-1b", seed=0, log=lambda message: print(message, file=sys.stderr))


def load_hf_reference(folder: Path, dtype: torch.dtype = torch.float32):
    """Hugging Face `LlamaForCausalLM` on the folder's weights, in `dtype`, in eval mode: the reference."""
    from transformers import LlamaForCausalLM
    try:
        model = LlamaForCausalLM.from_pretrained(folder, dtype=dtype)
    except TypeError:  # transformers < 4.56 names the argument torch_dtype
        model = LlamaForCausalLM.from_pretrained(folder, torch_dtype=dtype)
    return model.eval()


@pytest.fixture(scope="session")
def hf_reference():
    """`hf_reference(folder, dtype)`: the reference model, built once per (folder, dtype) per session.

    `keep=False` builds it without keeping it (for the 1B model: 5 GB in fp32 is freed when dropped).
    """
    built: dict[tuple[str, torch.dtype], object] = {}

    def get(folder: Path, dtype: torch.dtype = torch.float32, keep: bool = True):
        key = (str(folder), dtype)
        if key in built:
            return built[key]
        model = load_hf_reference(folder, dtype)
        if keep:
            built[key] = model
        return model

    yield get
    built.clear()


def _watched(thread: threading.Thread) -> bool:
    """Threads a test must not leave behind: non-daemon ones, and the project's device/heartbeat threads."""
    return not thread.daemon or thread.name.startswith(("Device-", "heartbeat-", "Launcher-"))


@pytest.fixture(autouse=True)
def fail_on_leaked_threads():
    """Fail the test if it leaves a non-daemon, `Device-*` or `heartbeat-*` thread alive.

    Threads that were alive before the test are ignored; new ones get a short grace period to
    finish (a stop request may still be travelling through a queue).
    """
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + THREAD_JOIN_GRACE_S
    leaked = []
    for thread in threading.enumerate():
        if thread in before or thread is threading.current_thread() or not _watched(thread):
            continue
        thread.join(max(0.0, deadline - time.monotonic()))
        if thread.is_alive():
            leaked.append(f"{thread.name} (daemon={thread.daemon})")
    if leaked:
        pytest.fail(f"the test left threads running: {', '.join(leaked)}", pytrace=False)


@pytest.fixture(autouse=True)
def fail_on_orphan_processes():
    """Fail the test if a device process it started is still there afterwards (checked by PID: a
    process that ended but was not reaped counts as left too)."""
    from process_launcher import STARTED_PIDS, process_exists
    first = len(STARTED_PIDS)
    yield
    left = [pid for pid in STARTED_PIDS[first:] if process_exists(pid)]
    if left:
        pytest.fail(f"the test left device processes behind: PIDs {left}", pytrace=False)


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The real SmolLM2-135M-Instruct, converted into the project cache (downloaded and converted on the
    first run only, about 30 s; an older conversion is upgraded in place)."""
    from smollm2_checkpoint import ensure_smollm2_checkpoint
    return ensure_smollm2_checkpoint(log=lambda message: print(message, file=sys.stderr))


# --------------------------------------------------------------------------------------------
# The demo's scenario on the tiny preset, run once per session (recovery report and comparator tests)

TINY_DEMO_ARGS = ("--heartbeat-interval", "0.05", "--heartbeat-timeout", "0.25", "--context-tokens", "32",
                  "--new-tokens", "6", "--fail-after", "3", "--repeats", "1")


@pytest.fixture(scope="session")
def tiny_demo_run(tiny_checkpoint, tmp_path_factory):
    """(options, report dict, log lines) of the demo's run_scenario on the tiny checkpoint: short heartbeats,
    32-token context, 6 new tokens, Device-1 crashing after 3, every strategy once."""
    import demo_scenario
    import execution_optimization_algorithm_demo as demo
    report_path = tmp_path_factory.mktemp("tiny-demo") / "report.txt"
    options = demo.parse_args(["--model-dir", str(tiny_checkpoint), *TINY_DEMO_ARGS, "--report", str(report_path),
                               "--quiet"])
    lines: list[str] = []
    report = demo_scenario.run_scenario(options, lines.append)
    return options, report, lines


# --------------------------------------------------------------------------------------------
# The tiny presets opened as Checkpoints, once per session (fault and recovery-strategy tests)


@pytest.fixture(scope="session")
def tiny(tiny_checkpoint) -> Checkpoint:
    """The tiny preset (8 query heads, 2 KV heads, 3 layers), opened once for the session."""
    return Checkpoint(tiny_checkpoint)


@pytest.fixture(scope="session")
def tiny_4kv(tmp_path_factory) -> Checkpoint:
    """tiny with 4 KV heads: over four devices each device holds a KV head no other device holds."""
    return Checkpoint(write_synthetic_checkpoint("tiny-4kv", tmp_path_factory.mktemp("tiny-4kv") / "tiny-4kv", 0))


# --------------------------------------------------------------------------------------------
# The backends every scenario runs on


@pytest.fixture(params=["threads", "serialising", "processes"])
def backend(request) -> str:
    """The scenario on device threads that share memory, then with every command, answer and collective
    payload serialised to bytes and back (any shortcut through shared memory breaks there), then on
    device processes (torch.distributed, real SIGKILL and SIGSTOP; `-k processes` selects those)."""
    return request.param
