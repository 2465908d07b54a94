"""The device cluster with heartbeats, failure injection, detection, reassignment and weight inheritance.

A failure is injected at a chosen point (a device stops in the middle of a step), the survivors'
step is abandoned when the leader's monitor declares the silent device dead, the heads of the dead
device are reassigned, their new owners read only the weight slices they lack, and the KV cache
is rebuilt by a recovery strategy (kv_cache_reused.py) before the abandoned step is redone. A
recovery interrupted by another failure starts again from what is left.
"""
from __future__ import annotations

import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from device_threads import (POLL_S, DeviceCrashed, DeviceWorker, StepAbandoned, ThreadCollective, raise_if_interrupted,
                            run_on_devices)
from head_assignment import Assignment, Range
from heartbeat_detection import Clock, Detection, HeartbeatConfig, HeartbeatMonitor, HeartbeatSender, MonitorThread
from kv_cache_reused import RecoveryImpossible, RecoveryStrategy, make_recovery, replicate_new_kv
from llama_model_loader import Checkpoint
from task_reassign import ReassignmentPlan, ReassignStrategy
from tensor_parallel_cluster import TensorParallelLlama
from tensor_parallel_model import DeviceShard, DeviceState, HiddenStateStore, KVCache, extend_shard

FAILURE_MODES = ("crash", "hang", "slow")
FALLBACKS = ("reuse-hidden", "full-recompute")  # tried in order when the asked strategy is impossible


@dataclass(frozen=True)
class FailurePlan:
    """Inject a fault: `device` fails after `after_tokens` generated tokens (0: during the prefill).

    It strikes at the device's `at_call`-th collective call of that step (by default the call
    numbered like the layers: half-way through a decode step, a quarter of the way through a
    sequence-parallel prefill, which makes four calls per layer), so the others are caught mid-step. "crash": the thread ends and its memory is
    gone. "hang": alive but silent and idle until released (its heartbeats stop and resume with it,
    stamped with its old epoch), then fenced out. "slow": its compute stalls for `delay_s` while its
    heartbeats go on (it must not be declared dead). With
    `during_recovery`, it fails when it is next asked to help rebuild the KV cache instead.
    """

    device: int
    after_tokens: int = 0
    at_call: int | None = None
    mode: str = "crash"
    delay_s: float = 0.0
    during_recovery: bool = False


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

    shard: DeviceShard          # after inheriting the dead devices' slices
    cache: KVCache              # its KV from before the failure (the KV heads it held then)
    hidden_states: HiddenStateStore | None
    replicas: dict[int, KVCache]

    def copy(self) -> "Survivor":
        """A copy for one strategy run: its own KV cache; the weights, hidden-state checkpoints and
        replicas are only read by the strategies, so they are shared, not copied."""
        return Survivor(self.shard, self.cache.clone(), self.hidden_states, self.replicas)

    @property
    def missing_kv_heads(self) -> tuple[int, ...]:
        """KV heads this device must hold now but has no cache for."""
        return tuple(g for g in self.shard.kv_heads if g not in self.cache.kv_heads)


@dataclass
class PostFailureState:
    """The state every recovery strategy starts from (each run gets its own copy)."""

    plans: list[ReassignmentPlan]
    context_ids: torch.Tensor  # every token whose KV was cached before the failure
    survivors: dict[int, Survivor]

    @property
    def plan(self) -> ReassignmentPlan:
        """The last plan (with one failure, the only one); its `after` is the new assignment."""
        return self.plans[-1]

    @property
    def assignment(self) -> Assignment:
        return self.plans[-1].after

    def copy(self) -> "PostFailureState":
        return PostFailureState(self.plans, self.context_ids, {d: s.copy() for d, s in self.survivors.items()})


@dataclass(frozen=True)
class Recovery:
    """One recovery as it happened."""

    events: tuple[FailureEvent, ...]
    plans: tuple[ReassignmentPlan, ...]
    strategy: str
    fallback_reason: str | None   # why the asked-for strategy could not run, if it could not
    weight_load_s: float
    rebuild_s: float
    attempts: int                 # more than 1 when another failure interrupted the recovery
    context_tokens: int           # positions whose KV was rebuilt


@dataclass
class EventLog:
    """Timestamped events per device, for the timeline plot: (time, device, kind, duration)."""

    clock: Clock
    events: list[tuple[float, int, str, float]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, device: int, kind: str, at: float | None = None, duration: float = 0.0) -> None:
        with self._lock:
            self.events.append((self.clock() if at is None else at, device, kind, duration))

    def span(self, device: int, kind: str, started: float) -> None:
        self.add(device, kind, started, self.clock() - started)


class FaultTolerantLlama(TensorParallelLlama):
    """TensorParallelLlama plus heartbeats, failure injection and recovery."""

    def __init__(self, checkpoint: Checkpoint, assignment: Assignment, dtype: torch.dtype = torch.float32,
                 progress: bool = False, heartbeat: HeartbeatConfig = HeartbeatConfig(),
                 clock: Clock = time.monotonic):
        super().__init__(checkpoint, assignment, dtype, progress)
        self.clock, self.heartbeat = clock, heartbeat
        self.log = EventLog(clock)
        self.replication = False
        self.retired: list[DeviceWorker] = []  # dead devices' workers, joined at the end of the run
        self._armed: dict[int, FailurePlan] = {}
        self._calls: dict[int, int] = {}
        self._failed_at: dict[int, float] = {}
        self._hung: dict[int, threading.Event] = {}  # hung device -> set when it is released
        self._closing = threading.Event()  # cuts injected stalls short when the run ends
        self._recovery_collectives: weakref.WeakSet[ThreadCollective] = weakref.WeakSet()  # those still in use
        self._collectives_lock = threading.Lock()  # the monitor thread aborts while the leader adds
        self._detections: list[Detection] = []  # declared, not yet handled by a recovery
        self._detections_lock = threading.Lock()
        self.monitor = HeartbeatMonitor(assignment.devices, heartbeat, clock,
                                        on_beat=lambda d, t: self.log.add(d, "beat", t))
        self.device_epochs = {d: self.monitor.epoch for d in assignment.devices}  # each device's own epoch
        self.collective = self.new_collective(assignment.devices, track=False)
        self.senders = {d: HeartbeatSender(d, self.monitor, heartbeat.interval_s,
                                           lambda d=d: self.device_epochs.get(d, -1))
                        for d in assignment.devices}
        self.watcher = MonitorThread(self.monitor, self._on_dead, poll_s=heartbeat.interval_s / 4)
        for sender in self.senders.values():
            sender.start()
        self.watcher.start()

    # The fencing's view of epochs (device_threads.EpochView): the leader's and each device's own

    def current(self) -> int:
        return self.monitor.epoch

    def of(self, device: int) -> int:
        return self.device_epochs.get(device, -1)

    @property
    def leader(self) -> int:
        """The lowest-numbered live device leads: it runs the monitor and the recovery."""
        return min(self.workers)

    # ---------------------------------------------------------------------------------------
    # Failure injection

    def arm(self, plan: FailurePlan) -> None:
        """The device will fail at the given collective call of the next step (or its next recovery work)."""
        if plan.device not in self.workers:
            raise ValueError(f"Device-{plan.device} is not a live device")
        if plan.mode not in FAILURE_MODES:
            raise ValueError(f"unknown failure mode {plan.mode!r} (choose from {', '.join(FAILURE_MODES)})")
        self._armed[plan.device] = plan

    def step_task(self, ids: torch.Tensor, start: int, logits: str):
        self._calls = {d: 0 for d in self.workers}
        forward = super().step_task(ids, start, logits)
        collective, replication = self.collective, self.replication

        def task(worker: DeviceWorker):
            began = self.clock()
            result = forward(worker)
            if replication:
                replicate_new_kv(worker.state, start, ids.numel(), collective)
            self.log.span(worker.device, "compute", began)
            return result
        return task

    def _fault_point(self, device: int) -> None:
        """Called at every collective call of every device: where injected failures strike."""
        plan = self._armed.get(device)
        if plan is None or plan.during_recovery:
            return
        self._calls[device] = self._calls.get(device, 0) + 1
        if self._calls[device] >= (plan.at_call or self.config.num_hidden_layers):
            self._strike(plan)

    def recovery_fault_point(self, device: int) -> None:
        """Called when a device starts its share of a recovery."""
        plan = self._armed.get(device)
        if plan is not None and plan.during_recovery:
            self._strike(plan)

    def _strike(self, plan: FailurePlan) -> None:
        del self._armed[plan.device]
        if plan.mode == "slow":  # a fault simulation: the device stalls, its heartbeats go on
            self.log.add(plan.device, "stalled", duration=plan.delay_s)
            self._closing.wait(plan.delay_s)
            return
        self._failed_at[plan.device] = self.clock()
        self.log.add(plan.device, "died")
        if plan.mode == "hang":
            self._hang(plan.device)
            return
        self.senders[plan.device].silence()
        raise DeviceCrashed(f"Device-{plan.device} crashed (injected)")

    def _hang(self, device: int) -> None:
        """Alive but silent and idle until released; then it beats again and resumes its stale step,
        both stamped with the epoch it had (the fencing must refuse them)."""
        released = self._hung.setdefault(device, threading.Event())
        self.senders[device].pause()
        while not (released.is_set() or self._closing.is_set()):
            released.wait(POLL_S)
        self.senders[device].resume()

    def release_hung(self) -> None:
        """Wake hung devices (they resume their stale step, which the fencing must reject)."""
        for released in self._hung.values():
            released.set()

    def _on_dead(self, detection: Detection) -> None:
        """A declaration: abandon the work in flight, admit the survivors to the new epoch, queue it."""
        self.log.add(detection.device, "declared dead", detection.declared_at)
        self.collective.abort(lost=(detection.device,))  # the step in flight is never finished with a dead device
        with self._collectives_lock:
            for collective in list(self._recovery_collectives):
                collective.abort(lost=(detection.device,))
        dead = set(self.monitor.dead())
        for device in list(self.workers):
            if device not in dead:
                self.device_epochs[device] = max(self.device_epochs[device], detection.epoch)
        with self._detections_lock:
            self._detections.append(detection)

    def declare_dead(self, device: int, signal: str) -> None:
        """Declare a device dead on a signal other than its silence (as a failed collective reveals a
        killed peer); handled like a heartbeat declaration."""
        detection = self.monitor.declare(device, signal)
        if detection is not None:
            self._on_dead(detection)

    def new_collective(self, devices: Sequence[int], track: bool = True) -> ThreadCollective:
        """A collective of the current epoch, aborted when one of its devices is declared dead
        (`track`: recovery work, which the monitor aborts; the main collective it aborts itself)."""
        collective = ThreadCollective(tuple(devices), self.monitor.epoch, self._fault_point, epochs=self,
                                      silence_bound_s=4 * self.heartbeat.timeout_s)
        if track:
            with self._collectives_lock:
                self._recovery_collectives.add(collective)
        lost = set(devices) & set(self.monitor.dead())
        if lost:
            collective.abort(lost=tuple(lost))
        return collective

    def wait_for_failure(self, timeout_s: float | None = None) -> FailureEvent:
        """The next declared death (waits until the monitor declares one, at most `timeout_s`)."""
        timeout_s = timeout_s if timeout_s is not None else self.heartbeat.timeout_s * 4
        deadline = time.monotonic() + timeout_s
        while not (events := self.pending_failures(limit=1)):
            raise_if_interrupted()
            if time.monotonic() >= deadline:
                raise RuntimeError(f"no device was declared dead within {timeout_s:.1f} s")
            time.sleep(min(POLL_S, max(0.0, deadline - time.monotonic())))
        return events[0]

    def pending_failures(self, limit: int | None = None) -> list[FailureEvent]:
        """Deaths already declared but not yet handled (several devices can die at once), oldest first."""
        with self._detections_lock:
            taken = self._detections[:limit]
            del self._detections[:len(taken)]
        return [self._event(detection) for detection in taken]

    def _event(self, detection: Detection) -> FailureEvent:
        failed_at = self._failed_at.get(detection.device, detection.last_beat_at)
        survivors = [d for d in self.workers if d not in self.monitor.dead()]
        return FailureEvent(detection.device, failed_at, detection, min(survivors))

    # ---------------------------------------------------------------------------------------
    # Recovery steps (the KV rebuild itself is kv_cache_reused.py's)

    def plan_recovery(self, dead: Sequence[int], strategy: ReassignStrategy) -> list[ReassignmentPlan]:
        """One plan per dead device, each applied to the assignment the previous one left."""
        plans, assignment = [], self.assignment
        for device in dead:
            plans.append(strategy.plan(assignment, device))
            assignment = plans[-1].after
        return plans

    def inherit_weights(self, assignment: Assignment) -> dict[int, DeviceShard]:
        """Each survivor reads the slices it lacks for `assignment`, in its own thread, all at once."""
        def extend(worker: DeviceWorker) -> DeviceShard:
            self.recovery_fault_point(worker.device)
            began, shard = self.clock(), worker.state.shard
            heads = [h for h in assignment.heads[worker.device] if h not in shard.query_heads]
            columns = missing_ranges(assignment.mlp[worker.device], shard.mlp)
            if not heads and not columns:
                return shard
            extended = extend_shard(shard, self.checkpoint, heads, columns, self.dtype)
            self.log.span(worker.device, "load weights", began)
            return extended
        devices = assignment.devices
        return run_on_devices([self.workers[d] for d in devices], extend, self.new_collective(devices))

    def post_failure_state(self, plans: list[ReassignmentPlan], shards: dict[int, DeviceShard]) -> PostFailureState:
        """What survives: each survivor's own KV, hidden-state checkpoints and replicas.

        Entries past the leader's record (written by the abandoned step) are dropped.
        """
        length = self.position
        survivors = {}
        for device in plans[-1].after.devices:
            state = self.workers[device].state
            for store in (state.cache, state.hidden_states, *state.replicas.values()):
                if store is not None:
                    store.length = min(store.length, length)
            survivors[device] = Survivor(shards[device], state.cache, state.hidden_states, state.replicas)
        return PostFailureState(plans, torch.tensor(self.cached_ids, dtype=torch.long), survivors)

    def retire(self, dead: Sequence[int], assignment: Assignment) -> None:
        """The dead devices leave: the new assignment and a collective of the current epoch begin."""
        for device in dead:
            if device in self.workers:
                self.retired.append(self.workers.pop(device))
            self.monitor.remove(device)
        self.assignment = assignment
        self.collective = self.new_collective(assignment.devices, track=False)

    def adopt(self, states: dict[int, DeviceState], context_ids: torch.Tensor) -> None:
        """Install recovered device states, whose KV caches hold `context_ids`."""
        for device, state in states.items():
            self.workers[device].state = state
        self.cached_ids = context_ids.tolist()

    def enable_replication(self) -> None:
        """Copy every device's KV to its buddy from now on, starting with what is already cached (a
        copy that lacked those positions would protect nothing)."""
        self.replication = True
        if self.position:
            self.reprotect()

    def reprotect(self) -> None:
        """After a recovery with replication on, every device sends its whole KV to its new buddy."""
        collective, length = self.collective, self.position
        run_on_devices(list(self.workers.values()), lambda w: replicate_new_kv(w.state, 0, length, collective),
                       collective)

    def state_for(self, survivor: Survivor, cache: KVCache) -> DeviceState:
        """A device state for a survivor's (extended) shard with a rebuilt cache."""
        state = self.new_state(survivor.shard, cache)
        state.hidden_states, state.replicas = survivor.hidden_states, survivor.replicas
        return state

    def prepare_recovery(self, events: Sequence[FailureEvent], reassign: ReassignStrategy
                         ) -> tuple[PostFailureState, float]:
        """Plan, inherit weights and collect what survived; returns the state and the weight-load time.

        Only the deaths in `events` are planned for: a device declared meanwhile aborts this
        recovery's collectives, and the restarted recovery takes its event (so none stays queued).
        """
        dead = sorted(d for d in {e.device for e in events} if d in self.workers)
        plans = self.plan_recovery(dead, reassign)
        started = time.perf_counter()
        shards = self.inherit_weights(plans[-1].after)
        load_s = time.perf_counter() - started
        post = self.post_failure_state(plans, shards)
        self.retire(dead, plans[-1].after)
        return post, load_s

    def recover(self, event: FailureEvent, reassign: ReassignStrategy, recovery: RecoveryStrategy) -> Recovery:
        """The whole recovery: plan, inherit weights, rebuild KV, adopt; restarted if another device dies."""
        events, attempts, applied = [event, *self.pending_failures()], 0, []
        while True:
            attempts += 1
            try:
                post, load_s = self.prepare_recovery(events, reassign)
                applied += post.plans
                began = self.clock()
                started = time.perf_counter()
                strategy, fallback = self._rebuild(post, recovery)
                rebuild_s = time.perf_counter() - started
                for device in post.survivors:
                    self.log.span(device, "rebuild KV", began)
                if self.replication:
                    self.reprotect()
            except StepAbandoned:
                events += [self.wait_for_failure(), *self.pending_failures()]
                continue
            return Recovery(tuple(events), tuple(applied), strategy, fallback, load_s, rebuild_s, attempts,
                            post.context_ids.numel())

    def _rebuild(self, post: PostFailureState, recovery: RecoveryStrategy) -> tuple[str, str | None]:
        """Rebuild with the asked strategy, or fall back to the first that still works (and say why):
        reuse-hidden when the hidden states cover the context, else full-recompute, which always can."""
        reasons = []
        for strategy in (recovery, *(make_recovery(n) for n in FALLBACKS if n != recovery.name)):
            try:
                self.adopt(strategy.recover(self, post), post.context_ids)
            except RecoveryImpossible as reason:
                reasons.append(f"{strategy.name} impossible ({reason})")
                continue
            return strategy.name, "; ".join(reasons + [f"fell back to {strategy.name}"]) if reasons else None
        raise AssertionError("full-recompute needs nothing kept and cannot be impossible")

    # ---------------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the watcher, the heartbeats and every device thread, even if one of them fails to stop
        (the watcher re-raises the first error its handler met, after everything is stopped)."""
        self._closing.set()
        self.release_hung()
        try:
            self.watcher.stop()
        finally:
            for sender in self.senders.values():
                sender.stop()
            super().close()
            for worker in self.retired:
                worker.stop(timeout=5)


def missing_ranges(wanted: Sequence[Range], held: Sequence[Range]) -> tuple[Range, ...]:
    """The parts of `wanted` column ranges not covered by `held` ones."""
    missing: list[Range] = []
    for start, stop in wanted:
        cursor = start
        for a, b in sorted(held):
            if b <= cursor or a >= stop:
                continue
            if a > cursor:
                missing.append((cursor, a))
            cursor = max(cursor, b)
        if cursor < stop:
            missing.append((cursor, stop))
    return tuple(missing)


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
