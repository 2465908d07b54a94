"""What only the processes backend has: two hosts, process memory, the launcher's bad input, and no
orphans when the driver itself dies. (Every fault scenario also runs on processes: the `backend`
fixture of test_faults.py and test_recovery_strategies.py, `-k processes`.)"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import execution_optimization_algorithm_demo as demo
from process_launcher import LaunchError, ProcessLauncher, Rendezvous, check_memory_for, process_exists
from device_protocol import Declare, RecoveryPolicy
from fault_injection import FailurePlan
from fault_tolerant_cluster import FaultTolerantLlama, generate_with_failures
from head_assignment import even_assignment
from heartbeat_detection import HeartbeatConfig
from polling import wait_until

REPO = Path(__file__).resolve().parents[1]
HEARTBEAT = HeartbeatConfig(interval_s=0.05, timeout_s=0.5)
# Two hosts put six interpreters on two cores: a SIGKILL's fast signals (the launcher seeing the exit, a
# peer's failed collective) must beat a silence long enough that only a broken signal loses the race.
# (At 0.5 s, CI once saw the heartbeat win, when node 1's launcher told only the devices beside it.)
TWO_HOSTS_HEARTBEAT = HeartbeatConfig(interval_s=0.05, timeout_s=3.0)
PROMPT = list(range(5, 29))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until_gone(pids, within_s: float) -> list[int]:
    """The processes of `pids` still there once they are all gone or `within_s` has passed."""
    wait_until(lambda: not any(process_exists(p) for p in pids), within_s, every_s=0.05)
    return [p for p in pids if process_exists(p)]


def start_second_host(port: int, *extra: str, wait_s: float = 60.0) -> subprocess.Popen:
    """`python device_processes.py` as node 1 of 2, in the torchrun style (environment variables)."""
    environment = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), NODE_RANK="1", NNODES="2",
                       NODE_ADDR="127.0.0.1")
    return subprocess.Popen([sys.executable, str(REPO / "device_processes.py"), "--wait", str(wait_s), *extra],
                            env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


# --------------------------------------------------------------------------------------------
# Two hosts (two launchers on one machine, over loopback)


def test_two_hosts_over_loopback_generate_as_one_and_survive_a_sigkill_on_the_second(tiny):
    """Node 0 (this process: the driver, the store, Devices 0-1) and node 1 (a second launcher with
    Devices 2-3). Device-3, on node 1, is SIGKILLed mid-step; the leader on node 0 recovers from the
    KV copies, and the tokens are the failure-free run's."""
    assignment = even_assignment(tiny.config, 4)
    with FaultTolerantLlama(tiny, assignment, torch.float32, heartbeat=HEARTBEAT) as model:
        reference = model.generate(PROMPT, 6)
    port = free_port()
    node = start_second_host(port)
    try:
        with FaultTolerantLlama(tiny, assignment, torch.float32, heartbeat=TWO_HOSTS_HEARTBEAT, backend="processes",
                                rendezvous=Rendezvous(master_port=port, nodes=2),
                                policy=RecoveryPolicy(strategy="replicate")) as model:
            assert sorted(model.transport.pids()) == [0, 1], "node 0 runs Devices 0 and 1 only"
            remote = [int(model.transport._store_lookup(f"pid/{d}").rsplit(":", 1)[1]) for d in (2, 3)]
            model.keep(False, True)
            tokens = generate_with_failures(model, PROMPT, 6, [FailurePlan(3, after_tokens=2)])
            recoveries = list(model.recoveries)
        code = node.wait(timeout=30)
    finally:
        if node.poll() is None:
            node.kill()
        _, node_log = node.communicate()
    assert tokens == reference
    (recovery,) = recoveries
    assert [e.device for e in recovery.events] == [3] and recovery.strategy == "replicate"
    assert recovery.events[0].detection.signal in ("process-exit", "collective")
    assert code == 0, node_log
    assert "node 1: devices 2, 3" in node_log
    assert wait_until_gone(remote, 5.0) == [], "node 1's device processes outlived it"


def test_a_launcher_tells_every_node_of_a_death_on_its_own_the_leader_included():
    """A launcher that sees Device-3 exit tells every device of the cluster, not only those beside it
    on its node: a follower listens only about its leader, so the leader on another host would
    otherwise wait for a failed collective or for the silence. (A launcher of no devices, told the
    cluster; its sends recorded.)"""
    launcher = ProcessLauncher(Rendezvous(), collective_timeout=5.0)
    sent = []
    try:
        launcher.start_here([], cluster=[0, 1, 2, 3])
        launcher.send = lambda to, envelope: sent.append((to, envelope.body))
        launcher._exited(3, -signal.SIGKILL)
    finally:
        launcher.join(5.0)
    told = {to.owner: body for to, body in sent if to.kind == "control"}
    assert told == {device: Declare(3, "process-exit") for device in (0, 1, 2)}


# --------------------------------------------------------------------------------------------
# Memory: each process holds its slices, not the model


def test_each_device_process_holds_only_its_own_slices(llama_1b_checkpoint):
    """The synthetic Llama-3.2-1B in bf16 (2.5 GB) over four processes: each process's resident memory
    is its interpreter (measured on a process that holds nothing: one device of a tiny model is not
    needed; torch's import is the same) plus about a quarter of the model, far from the whole."""
    from llama_model_loader import Checkpoint
    checkpoint = Checkpoint(llama_1b_checkpoint)
    whole = checkpoint.total_bytes
    with FaultTolerantLlama(checkpoint, even_assignment(checkpoint.config, 4), torch.bfloat16,
                            heartbeat=HeartbeatConfig(0.5, 30.0), backend="processes") as model:
        processes = model.transport.processes()
        held = {d: info.weight_bytes for d, info in model.describe().items()}
    assert [p["device"] for p in processes] == [0, 1, 2, 3]
    for p in processes:
        assert held[p["device"]] < 0.3 * whole
        assert p["peak_rss_bytes"] < 0.55 * whole, f"Device-{p['device']} peaked at {p['peak_rss_bytes'] / 1e9:.2f} GB"


# --------------------------------------------------------------------------------------------
# Bad input: one line, exit 2


def test_a_port_in_use_is_refused_in_one_line(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        monkeypatch.setenv("MASTER_PORT", str(taken.getsockname()[1]))
        code = demo.main(["--model-dir", str(tiny_checkpoint), "--backend", "processes", "--report",
                          str(tmp_path / "r.txt")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: cannot hold the store at 127.0.0.1:") and "in use" in err, err
    assert len(err.strip().splitlines()) == 1, err


def test_an_unreachable_master_is_refused_in_one_line_by_the_second_host():
    node = start_second_host(free_port(), wait_s=2.0)
    _, err = node.communicate(timeout=60)
    assert node.returncode == 2
    assert err.startswith("error: cannot reach the store at 127.0.0.1:"), err
    assert len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("environment, phrase", [
    ({"NODE_RANK": "1"}, "the driver runs on node 0"),
    ({"MASTER_PORT": "http"}, "MASTER_PORT='http' is not a whole number"),
])
def test_a_driver_launched_as_the_wrong_node_is_refused_in_one_line(environment, phrase, tiny_checkpoint, tmp_path,
                                                                     capsys, monkeypatch):
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    code = demo.main(["--model-dir", str(tiny_checkpoint), "--backend", "processes", "--report",
                      str(tmp_path / "r.txt")])
    err = capsys.readouterr().err
    assert code == 2 and phrase in err and len(err.strip().splitlines()) == 1, err


def test_a_device_count_the_host_cannot_hold_is_refused_before_anything_starts():
    with pytest.raises(LaunchError, match=r"4 device processes need about .* GiB \(estimate\)"):
        check_memory_for(4, 2**50)
    check_memory_for(4, 2**20)  # a tiny model fits


# --------------------------------------------------------------------------------------------
# No orphans, even when the driver itself is killed


DRIVER_THEN_DIE = """
import os, signal, sys, time
sys.path.insert(0, {repo!r})
import torch
from fault_tolerant_cluster import FaultTolerantLlama
from head_assignment import even_assignment
from heartbeat_detection import HeartbeatConfig
from llama_model_loader import Checkpoint
checkpoint = Checkpoint({checkpoint!r})
model = FaultTolerantLlama(checkpoint, even_assignment(checkpoint.config, 4), torch.float32,
                           heartbeat=HeartbeatConfig(0.05, 0.5), backend="processes")
model.generate(list(range(5, 29)), 2)
print(" ".join(str(p) for p in model.transport.pids().values()), flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_device_processes_end_when_their_driver_is_sigkilled(tiny_checkpoint):
    driver = subprocess.run([sys.executable, "-c", DRIVER_THEN_DIE.format(repo=str(REPO),
                                                                         checkpoint=str(tiny_checkpoint))],
                            capture_output=True, text=True, timeout=120)
    assert driver.returncode == -signal.SIGKILL, driver.stderr
    pids = [int(p) for p in driver.stdout.split()]
    assert len(pids) == 4
    assert wait_until_gone(pids, 5.0) == [], "device processes outlived their driver"


def test_the_report_names_the_backend_the_signal_and_every_process(tiny_checkpoint, tmp_path, capsys):
    report = tmp_path / "report.txt"
    code = demo.main(["--model-dir", str(tiny_checkpoint), "--backend", "processes", "--devices", "4",
                      "--fail-device", "2", "--fail-after", "2", "--new-tokens", "4", "--context-tokens", "0",
                      "--repeats", "1", "--heartbeat-interval", "0.05", "--heartbeat-timeout", "1.0", "--quiet",
                      "--report", str(report)])
    assert code == 0, capsys.readouterr().err
    data = json.loads(report.with_suffix(".json").read_text())
    assert data["run"]["backend"] == "processes"
    assert data["failure"]["signal"] == "SIGKILL"
    assert data["failure"]["declared_by"] in ("process-exit", "collective")
    assert data["failure"]["detection_latency_s"] < 1.0  # no heartbeat timeout was waited for
    processes = data["system"]["processes"]
    assert sorted(p["device"] for p in processes) == [0, 1, 3]  # measured at the end: Device-2 is gone
    assert all(p["pid"] > 0 and p["rss_bytes"] > 0 for p in processes)
    assert [row["lossless"] for row in data["comparison"]] == [True] * 4
    text = report.read_text()
    assert "4 OS processes" in text and "a real SIGKILL" in text


def test_an_uneven_vocabulary_split_gathers_every_devices_logits(tiny_checkpoint):
    """384 vocabulary rows over 5 device processes (77, 77, 77, 77, 76): the logits' gather takes
    members of different widths, as 128256 rows over 7 survivors do."""
    with FaultTolerantLlama.load(tiny_checkpoint, devices=5, log=lambda message: None, heartbeat=HEARTBEAT,
                                  backend="processes") as model:
        processes = model.generate(PROMPT, max_new_tokens=4)
        logits = model.prefill(PROMPT)
    with FaultTolerantLlama.load(tiny_checkpoint, devices=5, log=lambda message: None, heartbeat=HEARTBEAT) as model:
        assert model.generate(PROMPT, max_new_tokens=4) == processes
        assert torch.equal(model.prefill(PROMPT), logits)
