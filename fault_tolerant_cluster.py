"""The device cluster with heartbeats, failure injection, detection, reassignment and weight inheritance.

A failure is injected at a chosen point (a device stops in the middle of a step), the survivors'
step is abandoned when the leader's monitor declares the silent device dead, the heads of the dead
device are reassigned, their new owners read only the weight slices they inherit, and the KV cache
is rebuilt by a recovery strategy (kv_cache_reused.py) before the abandoned step is redone.
"""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from device_threads import DeviceCrashed, DeviceWorker, StepAbandoned, ThreadCollective, run_on_devices
from head_assignment import Assignment
from kv_cache_reused import RecoveryStrategy, replicate_new_kv
from heartbeat_detection import Clock, Detection, HeartbeatConfig, HeartbeatMonitor, HeartbeatSender, MonitorThread
from llama_model_loader import Checkpoint
from task_reassign import ReassignmentPlan, ReassignStrategy
from tensor_parallel_cluster import TensorParallelLlama
from tensor_parallel_model import DeviceShard, DeviceState, HiddenStateStore, KVCache, extend_shard

FAILURE_MODES = ("crash", "hang")


@dataclass(frozen=True)
class FailurePlan:
    """Inject a failure: `device` stops after `after_tokens` generated tokens (0: during prefill).

    It dies at its `at_call`-th collective call of that step (by default in the middle of the
    layers), so the other devices are caught mid-step, as with a real crash. A "crash" ends the
    device's thread; a "hang" leaves it blocked, silent, until the run ends.
    """

    device: int
    after_tokens: int
    at_call: int | None = None
    mode: str = "crash"


@dataclass(frozen=True)
class FailureEvent:
    """A failure as the leader saw it."""

    device: int
    failed_at: float      # clock time of the injected failure
    detection: Detection  # when the monitor declared it dead
    leader: int           # the device that led the recovery

    @property
    def detection_latency_s(self) -> float:
        return self.detection.declared_at - self.failed_at


@dataclass
class Survivor:
    """What a surviving device holds right after a failure, before its KV cache is rebuilt."""

    shard: DeviceShard          # after inheriting the dead device's slices
    cache: KVCache              # its KV from before the failure (the KV heads it held then)
    hidden_states: HiddenStateStore | None
    replicas: dict[int, KVCache]

    def copy(self) -> "Survivor":
        """A copy whose caches a strategy may change (weights are read-only and shared)."""
        return Survivor(self.shard, self.cache.clone(),
                        self.hidden_states.clone() if self.hidden_states is not None else None,
                        {d: r.clone() for d, r in self.replicas.items()})

    @property
    def missing_kv_heads(self) -> tuple[int, ...]:
        """KV heads this device must hold now but has no cache for."""
        return tuple(g for g in self.shard.kv_heads if g not in self.cache.kv_heads)


@dataclass
class PostFailureState:
    """The state every recovery strategy starts from (each run gets its own copy)."""

    plan: ReassignmentPlan
    context_ids: torch.Tensor  # every token whose KV was cached before the failure
    survivors: dict[int, Survivor]
    failed_replica_holder: int | None = None  # the dead device's buddy, if replication was on

    def copy(self) -> "PostFailureState":
        return PostFailureState(self.plan, self.context_ids, {d: s.copy() for d, s in self.survivors.items()},
                                self.failed_replica_holder)


@dataclass(frozen=True)
class Recovery:
    """One recovery as it happened."""

    event: FailureEvent
    plan: ReassignmentPlan
    strategy: str
    weight_load_s: float
    rebuild_s: float


class FaultTolerantLlama(TensorParallelLlama):
    """TensorParallelLlama plus heartbeats, failure injection and recovery steps."""

    def __init__(self, checkpoint: Checkpoint, assignment: Assignment, dtype: torch.dtype = torch.float32,
                 progress: bool = False, heartbeat: HeartbeatConfig = HeartbeatConfig(),
                 clock: Clock = time.monotonic):
        super().__init__(checkpoint, assignment, dtype, progress)
        self.clock, self.heartbeat = clock, heartbeat
        self.collective.fault_hook = self._fault_point
        self.replication = False
        self._armed: dict[int, FailurePlan] = {}
        self._calls: dict[int, int] = {}
        self._failed_at: dict[int, float] = {}
        self._released = threading.Event()
        self._detections: queue.SimpleQueue[Detection] = queue.SimpleQueue()
        self.retired: list[DeviceWorker] = []  # dead devices' workers, joined at the end of the run
        self.monitor = HeartbeatMonitor(assignment.devices, heartbeat, clock)
        self.senders = {d: HeartbeatSender(d, self.monitor, heartbeat.interval_s, lambda: self.monitor.epoch)
                        for d in assignment.devices}
        self.watcher = MonitorThread(self.monitor, self._on_dead, poll_s=heartbeat.interval_s / 4)
        for sender in self.senders.values():
            sender.start()
        self.watcher.start()

    @property
    def leader(self) -> int:
        """The lowest-numbered live device leads (runs the monitor and the recovery)."""
        return min(self.workers)

    # ---------------------------------------------------------------------------------------
    # Failure injection

    def arm(self, plan: FailurePlan) -> None:
        """The device will fail at the given collective call of the next step."""
        if plan.device not in self.workers:
            raise ValueError(f"Device-{plan.device} is not a live device")
        self._armed[plan.device] = plan

    def step_task(self, ids, start, logits):
        self._calls = {d: 0 for d in self.workers}
        task = super().step_task(ids, start, logits)
        if not self.replication:
            return task
        collective = self.collective
        return lambda worker: (task(worker), replicate_new_kv(worker.state, start, ids.numel(), collective))[0]

    def _fault_point(self, device: int) -> None:
        """Called by the collective at every call of every device: where injected failures strike."""
        plan = self._armed.get(device)
        if plan is None:
            return
        self._calls[device] = self._calls.get(device, 0) + 1
        at_call = plan.at_call if plan.at_call is not None else self.config.num_hidden_layers
        if self._calls[device] < at_call:
            return
        del self._armed[device]
        self._failed_at[device] = self.clock()
        self.senders[device].silence()
        if plan.mode == "hang":
            self._released.wait()  # alive but silent and idle until the run ends; then fenced out
        raise DeviceCrashed(f"Device-{device} {plan.mode}ed (injected)")

    def _on_dead(self, detection: Detection) -> None:
        self.collective.abort()  # the step in flight is abandoned, never finished with a dead device
        self._detections.put(detection)

    def wait_for_failure(self, timeout_s: float | None = None) -> FailureEvent:
        """The next declared death (blocks until the monitor declares one)."""
        timeout_s = timeout_s if timeout_s is not None else self.heartbeat.timeout_s * 4
        try:
            detection = self._detections.get(timeout=timeout_s)
        except queue.Empty:
            raise RuntimeError(f"no device was declared dead within {timeout_s:.1f} s") from None
        failed_at = self._failed_at.get(detection.device, detection.last_beat_at)
        survivors = [d for d in self.workers if d != detection.device]
        return FailureEvent(detection.device, failed_at, detection, min(survivors))

    # ---------------------------------------------------------------------------------------
    # Recovery steps (the KV rebuild itself is kv_cache_reused.py's)

    def plan_recovery(self, event: FailureEvent, strategy: ReassignStrategy) -> ReassignmentPlan:
        return strategy.plan(self.assignment, event.device)

    def inherit_weights(self, plan: ReassignmentPlan) -> dict[int, DeviceShard]:
        """Each receiver reads the slices it inherits, in its own thread, at the same time."""
        receivers = [self.workers[d] for d in plan.moved_heads]
        extended = run_on_devices(receivers, lambda w: extend_shard(
            w.state.shard, self.checkpoint, plan.moved_heads[w.device], plan.moved_mlp[w.device], self.dtype))
        return {d: extended.get(d, self.workers[d].state.shard) for d in plan.after.devices}

    def post_failure_state(self, plan: ReassignmentPlan, shards: dict[int, DeviceShard]) -> PostFailureState:
        """What survives: each survivor's own KV, hidden-state checkpoints and replicas."""
        survivors = {d: Survivor(shards[d], self.workers[d].state.cache, self.workers[d].state.hidden_states,
                                 self.workers[d].state.replicas) for d in plan.after.devices}
        holder = self._buddy_of(plan.failed, plan.before.devices) if self.replication else None
        return PostFailureState(plan, torch.tensor(self.cached_ids, dtype=torch.long), survivors, holder)

    def retire(self, plan: ReassignmentPlan) -> None:
        """The dead device leaves: the new assignment, a new epoch and a new collective begin."""
        self.retired.append(self.workers.pop(plan.failed))
        self.assignment = plan.after
        self.monitor.remove(plan.failed)
        epoch = self.monitor.advance_epoch()
        self.collective = ThreadCollective(plan.after.devices, epoch, self._fault_point)

    def adopt(self, states: dict[int, DeviceState]) -> None:
        """Install recovered device states (each with its rebuilt KV cache)."""
        for device, state in states.items():
            self.workers[device].state = state

    def reprotect(self) -> None:
        """After a recovery with replication on, every device sends its whole KV to its new buddy."""
        collective, length = self.collective, self.position
        run_on_devices(list(self.workers.values()), lambda w: replicate_new_kv(w.state, 0, length, collective))

    def state_for(self, survivor: Survivor, cache: KVCache) -> DeviceState:
        """A device state for a survivor's (extended) shard with a rebuilt cache."""
        state = self.new_state(survivor.shard, cache)
        state.hidden_states, state.replicas = survivor.hidden_states, survivor.replicas
        return state

    @staticmethod
    def _buddy_of(device: int, devices: tuple[int, ...]) -> int:
        """The device that keeps `device`'s KV copy: the next one in ring order."""
        return devices[(devices.index(device) + 1) % len(devices)]

    # ---------------------------------------------------------------------------------------

    def recover(self, event: FailureEvent, reassign: ReassignStrategy, recovery: RecoveryStrategy) -> Recovery:
        """The whole recovery with one strategy: plan, inherit weights, rebuild KV, adopt."""
        plan = self.plan_recovery(event, reassign)
        started = time.perf_counter()
        shards = self.inherit_weights(plan)
        loaded = time.perf_counter()
        post = self.post_failure_state(plan, shards)
        self.retire(plan)
        self.adopt(recovery.recover(self, post))
        if self.replication:
            self.reprotect()
        return Recovery(event, plan, recovery.name, loaded - started, time.perf_counter() - loaded)

    def close(self) -> None:
        self._released.set()
        self.watcher.stop()
        for sender in self.senders.values():
            sender.stop()
        super().close()
        for worker in self.retired:
            worker.stop(timeout=5)


def generate_with_failures(model: FaultTolerantLlama, prompt_ids: Sequence[int], max_new_tokens: int,
                           failures: Sequence[FailurePlan],
                           recover: Callable[[FaultTolerantLlama, FailureEvent], object]) -> list[int]:
    """Greedy generation in which the planned failures strike; each abandoned step is redone after `recover`."""
    pending = list(failures)
    tokens: list[int] = []
    while len(tokens) < max_new_tokens:
        for plan in [p for p in pending if p.after_tokens == len(tokens)]:
            model.arm(plan)
            pending.remove(plan)
        try:
            logits = model.prefill(prompt_ids) if not tokens else model.decode(tokens[-1])
        except StepAbandoned:
            recover(model, model.wait_for_failure())
            continue
        tokens.append(int(logits.argmax()))
    return tokens
