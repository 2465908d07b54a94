"""One device: a private world of weight slices and KV cache, reached only by messages.

A device runs two threads. Its compute thread serves the `commands` inbox one command at a time
(forward steps, inheriting weights, rebuilding the KV cache, reports) and answers each in the
leader's `results` inbox. Its control thread beats, watches, and handles `control` messages: a
new epoch (which aborts the collective a step may be waiting in), a declaration. The device that
leads also hosts the leader (cluster_leader.py) on a third thread; its control thread then
watches every member, where the others watch only the leader. When the leader is declared dead,
the lowest-numbered survivor becomes the leader. Every beat carries the compute thread's progress
(`ComputeProgress`: the command in hand, the collective calls entered, ticks of long local work),
so that a wedged compute thread behind a live control thread is found too. Nothing outside this
module holds a device's tensors: the leader and the driver learn what they need by asking
(`Describe`, `ReportKV`).
"""
from __future__ import annotations

import threading
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

import kv_cache_reused
from batched_forward import PagedHiddenStates, PagedKVCache, PagedPool, batched_forward, replicate_slots, step_slots
from device_protocol import (DRIVER, DTYPE_NAMES, Address, Arm, BatchForward, Beat, CorruptKV, Declare, Describe,
                             DeviceInfo, Envelope, Forward, Inherit, Inherited, Keep, LeaderRecord, NewEpoch,
                             PoolInfo, PoolSpec, Progress, Rebuild, RebuildBatch, RecoveryPolicy, Regroup, Reply,
                             ReportKV, ReportPagedKV, Reprotect, Restore, Snapshot, Stop, Strike, Telemetry,
                             TimeHiddenRebuild, Watch)
from device_network import POLL_S, EpochCollective, StaleEpoch, StepAbandoned, Transport, WaitStalled
from fault_injection import DeviceCrashed, FaultSwitch
from head_assignment import Assignment
from heartbeat_detection import Detection, HeartbeatConfig, HeartbeatMonitor
from llama_model_loader import Checkpoint
from request_scheduler import BlockCosts, SchedulerConfig
from task_reassign import make_strategy
from tensor_parallel_model import (CPU, DeviceState, HiddenStateStore, StandbySlices, StepProgress, device_forward,
                                   extend_shard, load_device_state, load_standby, load_vocab_slice, missing_ranges,
                                   replicate_step, settle)

DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}


@dataclass(frozen=True)
class DeviceSetup:
    """What a device starts with (plain data: it crosses to a process as it is)."""

    device: int
    checkpoint: Path
    dtype: str
    assignment: Assignment
    heartbeat: HeartbeatConfig
    policy: RecoveryPolicy
    accelerator: str = "cpu"  # "cuda": the device process computes on the one GPU it is given
    scheduling: SchedulerConfig = SchedulerConfig()  # many requests in flight: the leader's budgets

    @property
    def placement(self) -> torch.device:
        """Where the device's tensors live: the CPU, or the only GPU its process sees."""
        return torch.device("cuda", 0) if self.accelerator == "cuda" else CPU


@dataclass(frozen=True)
class Membership:
    """An epoch and its members, as one value: the control thread replaces it whole (`_admit`) while
    the compute thread reads it, so that a reader that takes it once never pairs an epoch with
    another epoch's members (the new epoch's group would refuse them, and the leader would take
    that for the device's error)."""

    epoch: int
    members: tuple[int, ...]


@dataclass(frozen=True)
class Ready:
    """A device loaded its slices (or failed to: `error`)."""

    device: int
    error: BaseException | None = None


class ComputeProgress:
    """What the compute thread is doing, for the beats (`Progress`), and since when: counters reset
    per command. Only the compute thread changes it, each change one new (value, time) pair, so the
    control thread that sends it always reads a whole one."""

    def __init__(self) -> None:
        self._now = (Progress(), time.monotonic())

    @property
    def now(self) -> Progress:
        return self._now[0]

    def read(self) -> tuple[Progress, float]:
        """The progress, and how long it has stood (seconds)."""
        progress, since = self._now
        return progress, time.monotonic() - since

    def start(self, envelope: Envelope) -> None:
        self._set(Progress(type(envelope.body).__name__, envelope.request, envelope.epoch))

    def idle(self) -> None:
        self._set(Progress())

    def tick(self) -> None:
        """A piece of long local work done (a layer, a block): a long command is not a stuck one."""
        self._set(replace(self.now, ticks=self.now.ticks + 1))

    @contextmanager
    def calling(self) -> Iterator[None]:
        """A wait on the peers: counted on entry, and marked as inside a call until it returns."""
        self._set(replace(self.now, entered=self.now.entered + 1, in_call=True))
        try:
            yield
        finally:
            self._set(replace(self.now, in_call=False))

    def _set(self, progress: Progress) -> None:
        self._now = (progress, time.monotonic())


class DeviceEndpoint:
    """This device's side of its epoch's collective: each call is counted by the fault switch (which
    strikes before the call is entered) and by the progress, and refused when the device's own
    epoch is not the collective's (a fenced device reaches no one)."""

    def __init__(self, device: int, group: EpochCollective, own_epoch: Callable[[], int], faults: FaultSwitch,
                 progress: ComputeProgress):
        self.device, self.group, self._own_epoch, self._faults = device, group, own_epoch, faults
        self._progress = progress

    def all_reduce(self, device: int, tensor: torch.Tensor) -> torch.Tensor:
        with self._enter() as group:
            return group.all_reduce(self.device, tensor)

    def own_rows(self, device: int, length: int) -> slice:
        return self.group.own_rows(self.device, length)

    def reduce_scatter(self, device: int, tensor: torch.Tensor) -> torch.Tensor:
        with self._enter() as group:
            return group.reduce_scatter(self.device, tensor)

    def all_gather_rows(self, device: int, rows: torch.Tensor, length: int) -> torch.Tensor:
        with self._enter() as group:
            return group.all_gather_rows(self.device, rows, length)

    def all_gather(self, device: int, tensor: torch.Tensor) -> list[torch.Tensor]:
        with self._enter() as group:
            return group.all_gather(self.device, tensor)

    def send(self, device: int, to: int, payload: object) -> None:
        with self._enter() as group:
            group.send(self.device, to, payload)

    def recv(self, device: int, source: int) -> object:
        with self._enter() as group:
            return group.recv(self.device, source)

    @contextmanager
    def _enter(self) -> Iterator[EpochCollective]:
        self._faults.at_collective_call()
        epoch = self._own_epoch()
        if epoch != self.group.epoch:
            raise StaleEpoch(f"Device-{self.device} called with epoch {epoch} into epoch {self.group.epoch}'s "
                             f"collective: refused")
        with self._progress.calling():
            yield self.group


class DeviceActor:
    """A device: its state, its epoch, and the threads that serve its inboxes."""

    def __init__(self, setup: DeviceSetup, transport: Transport):
        self.device = setup.device
        self._setup, self._transport = setup, transport
        self._checkpoint = Checkpoint(setup.checkpoint).onto(setup.placement)
        self._config, self._dtype = self._checkpoint.config, DTYPES[setup.dtype]
        self._state: DeviceState | None = None
        self._cached_ids: list[int] = []
        self._snapshot: tuple | None = None
        self._parked_hidden: HiddenStateStore | None = None
        self._replication = False
        self._membership, self._assignment = Membership(0, setup.assignment.devices), setup.assignment
        self._leader_id = min(self._membership.members)
        self._epoch_changed = threading.Condition()
        self._stopping = threading.Event()
        self._progress = ComputeProgress()
        self.faults = FaultSwitch(self.device, self._config.num_hidden_layers, self._tell_strike,
                                  transport.released(self.device), signals=transport.real_signals)
        self._monitor = self._watch(self._watched())
        self._judging = False  # silences are judged once every device is up (the driver's Watch, forwarded)
        self._declared_here: list = []  # leaders this device declared dead (its own view, until told)
        self.leader = None  # cluster_leader.Leader when this device leads
        self._used_group = None  # the collective the command being served used (its sends are flushed after it)
        self._standby: tuple[StandbySlices, ...] = ()  # slices read in advance for a first failure
        self._stale: list[StandbySlices] = []  # given back after the next step (the next token) is done
        self._paged: PagedPool | None = None  # many requests' KV (and what is kept with it), paged
        self._leader_record: LeaderRecord | None = None  # the leader's requests, should this device succeed it

    # ---------------------------------------------------------------------------------------
    # Lifetime

    def start(self) -> None:
        if self.device == self._leader_id:
            self._become_leader(lost=[])
        self._transport.start_thread(f"Device-{self.device}", self._serve_commands)
        self._transport.start_thread(f"Device-{self.device}-control", self._serve_control)

    def _stop(self) -> None:
        """The device's threads end (the compute thread is released from any collective it waits in)."""
        self._stopping.set()
        self.faults.close()
        if self.leader is not None:
            self.leader.stop()
        self._transport.abort_epoch(self._membership.epoch)

    def _fenced(self) -> None:
        """Declared dead by the others, or cut off from them: this device takes no further part."""
        self._telemetry("fenced out")
        self._stop()

    def _die(self) -> None:
        """An injected crash: the threads end, and the memory is gone."""
        self._drop_memory()
        self._stop()

    def _drop_memory(self) -> None:
        """Let go of the weights, the caches and what is kept for recovery. The actor sits in reference
        cycles (its fault switch and monitor call back into it), so without this a stopped device's
        gigabytes would wait for the garbage collector: a second model loaded in the same process
        would find the first one's memory still resident."""
        self._state = self._snapshot = self._paged = self._parked_hidden = self._leader_record = None
        self._standby, self._stale = (), []

    # ---------------------------------------------------------------------------------------
    # The compute thread: one command at a time

    def _serve_commands(self) -> None:
        torch.set_num_threads(1)  # the devices share the cores: one each
        try:
            self._load()
        except BaseException as error:  # noqa: BLE001 - reported to the driver, which raises it
            self._send(Address("driver", DRIVER), Ready(self.device, error))
            self._stop()
            return
        self._send(Address("driver", DRIVER), Ready(self.device))
        try:
            self._answer_commands()
        except BaseException:
            self._stop()  # the compute thread cannot go on: the device ends with it, which the leader sees
            raise
        finally:
            self._drop_memory()  # only the compute thread touches the state: it goes when the thread ends

    def _answer_commands(self) -> None:
        """Execute each command and answer it, until the device stops (or crashes, as injected)."""
        while not self._stopping.is_set():
            envelope = self._transport.receive(Address("commands", self.device), POLL_S)
            if envelope is None:
                continue
            try:
                reply = self._flushed(Reply(self._execute(envelope)))
            except DeviceCrashed:
                self._die()
                return
            except BaseException as error:  # noqa: BLE001 - handed back to the leader
                reply = Reply(error=_with_trace(error))
            self._answer(envelope, reply)
            self._progress.idle()

    def _execute(self, envelope: Envelope) -> Any:
        self._await_epoch(envelope)
        self._progress.start(envelope)
        body = envelope.body
        handler = getattr(self, f"_on_{type(body).__name__}")
        return handler(body)

    def _await_epoch(self, envelope: Envelope) -> None:
        """A command of a newer epoch may overtake the NewEpoch message: wait for it, as long as the
        news of an epoch may take (the wait limit); a command of an ended epoch is refused."""
        limit, epoch = self._setup.heartbeat.wait_limit_s, envelope.epoch
        with self._epoch_changed:
            news = self._epoch_changed.wait_for(lambda: self._membership.epoch >= epoch or self._stopping.is_set(),
                                                timeout=limit)
        if not news:
            raise WaitStalled(f"Device-{self.device} waited {limit:.1f} s for the news of epoch {epoch} from "
                              f"Device-{envelope.sender} before serving {type(envelope.body).__name__}: none came")
        if self._membership.epoch != epoch:
            raise StaleEpoch(f"Device-{self.device} is in epoch {self._membership.epoch}: a command of epoch "
                             f"{epoch} is refused")

    def _flushed(self, reply: Reply) -> Reply:
        """A command is done only when the KV it sent was taken (processes: a send completes when received)."""
        group, self._used_group = self._used_group, None
        try:
            if group is not None:
                with self._progress.calling():  # a wait on the receivers
                    group.flush()
        except StepAbandoned as error:  # the receiver is gone, or a newer epoch began meanwhile
            return Reply(error=error)
        return reply

    def _answer(self, envelope: Envelope, reply: Reply) -> None:
        """Answer a command. An answer that cannot be sent (its value or error does not cross as
        bytes) is replaced by an error saying why, so that the leader is never left waiting for it;
        if even that cannot be sent, the error escapes and ends the device."""
        results = Address("results", envelope.sender)
        try:
            self._send(results, reply, request=envelope.request)
        except Exception as unsendable:  # noqa: BLE001 - answered instead
            error = RuntimeError(f"Device-{self.device} could not send its answer to {type(envelope.body).__name__}: "
                                 f"{type(unsendable).__name__}: {unsendable}")
            error.__cause__ = unsendable  # its trace goes with the answer
            self._send(results, Reply(error=_with_trace(error)), request=envelope.request)

    def _load(self) -> None:
        started = self.clock()
        self._state = load_device_state(self._checkpoint, self._assignment, self.device, self._dtype,
                                        on_layer=lambda: self._telemetry("loaded layer"))
        self._state.on_tick = self._progress.tick
        self._telemetry("load weights", started)
        if self._setup.policy.standby_weights:
            started = self.clock()
            self._standby = load_standby(self._checkpoint, self._assignment, self._first_plans(), self.device,
                                         self._dtype)
            self._telemetry("load weights", started)

    def _first_plans(self) -> dict[int, Assignment]:
        """The assignment after each other device's death, as the leader will plan it for a first
        failure (the same strategy and seed, so the same draw)."""
        policy, before = self._setup.policy, self._assignment
        return {failed: make_strategy(policy.reassign, policy.seed).plan(before, failed).after
                for failed in before.devices if failed != self.device}

    # ---------------------------------------------------------------------------------------
    # Commands

    def _on_Forward(self, command: Forward) -> Any:
        (chunk,) = command.chunks  # the command carries a batch; a device serves one sequence for now
        state, began = self._state, self.clock()
        if chunk.start > len(self._cached_ids):
            raise ValueError(f"Device-{self.device} holds {len(self._cached_ids)} positions; a step at "
                             f"{chunk.start} would leave a gap")
        self.faults.new_step()
        endpoint = self._endpoint()
        ids = torch.tensor(chunk.token_ids, dtype=torch.long)
        logits = device_forward(state, ids, chunk.start, endpoint, command.logits, self._resumed(command, chunk))
        self._cached_ids = self._cached_ids[:chunk.start] + list(chunk.token_ids)
        if self._replication:
            self._replicate(chunk.start, len(chunk.token_ids), endpoint)
        self._telemetry("compute", began)
        stale, self._stale = self._stale, []
        release_in_background(stale)
        return logits.cpu() if logits is not None and self.device == endpoint.group.devices[0] else None

    def _on_BatchForward(self, command: BatchForward) -> Any:
        """A step of many requests: their KV (and, as the pool's spec says, the layers' inputs) in
        this device's paged pool, the step's new KV copied to the ring buddy when replicating."""
        began = self.clock()
        self.faults.new_step()
        endpoint = self._endpoint()
        pool = self._pool(command.pool)
        answer = batched_forward(self._state, pool.kv, command.chunks, endpoint, command.logits, hidden=pool.hidden)
        ring = self._ring(endpoint)
        if command.pool.replication and ring is not None:
            replicate_slots(pool, step_slots(pool.kv, command.chunks), self.device, endpoint, *ring)
        self._telemetry("compute", began)
        if self.device != endpoint.group.devices[0]:
            return None
        return answer.cpu() if isinstance(answer, torch.Tensor) else answer

    def _pool(self, spec: PoolSpec) -> PagedPool:
        """The pool of `spec`: made anew, empty, for the KV heads the device holds, unless it is the one held."""
        if self._paged is None or self._paged.spec != spec:
            self._paged = None  # the old pool's memory goes first
            self._paged = self._empty_pool(spec)
        return self._paged

    def _empty_pool(self, spec: PoolSpec) -> PagedPool:
        config, placement = self._config, self._setup.placement
        kv = PagedKVCache(config.num_hidden_layers, self._state.shard.kv_heads, config.head_dim, self._dtype,
                          spec.num_blocks, spec.block_size, placement)
        hidden = PagedHiddenStates(config.num_hidden_layers, config.hidden_size, self._dtype, spec.num_blocks,
                                   spec.block_size, placement) if spec.hidden_states else None
        return PagedPool(spec, kv, hidden)

    def _on_RebuildBatch(self, command: RebuildBatch) -> float:
        """Carry the blocks into the order's pool and rebuild the lost heads; the new pool replaces
        the old only once complete."""
        self.faults.at_recovery_work()
        began, order = self.clock(), command.order
        endpoint = self._endpoint()
        held = self._paged if self._paged is not None else self._empty_pool(order.pool)
        self._paged = kv_cache_reused.rebuild_batch(self._state, held, order, endpoint, self._ring(endpoint))
        self._telemetry(f"rebuild KV: {order.strategy}", began)
        return self.clock() - began

    def _on_ReportPagedKV(self, command: ReportPagedKV) -> dict:
        if self._paged is None:
            raise ValueError(f"Device-{self.device} holds no paged pool: no request has been stepped on it")
        kv = self._paged.kv
        report = {}
        for request_id, (table, length) in command.spans.items():
            slots = kv.slots(table, 0, length)
            report[request_id] = {(self.device, layer, g): tuple(t.to(CPU, copy=True)
                                                                 for t in kv.read_head(layer, g, slots))
                                  for layer in range(kv.num_layers) for g in kv.kv_heads}
        return report

    def _resumed(self, command: Forward, chunk) -> StepProgress | None:
        """Where an abandoned step resumes (the leader asks only when every member recorded it)."""
        if command.resume_layer is None:
            return None
        progress = self._state.progress
        if progress is None or (progress.start, progress.token_ids) != (chunk.start, chunk.token_ids) or \
                progress.resumable_layer is None or progress.resumable_layer < command.resume_layer:
            raise ValueError(f"Device-{self.device} cannot resume the step at {chunk.start} from layer "
                             f"{command.resume_layer}: it did not record it")
        return progress.upto(command.resume_layer)

    def _on_Keep(self, command: Keep) -> None:
        """Switched off, the hidden-state store is parked (not dropped), so that switching it on again
        finds what it held; it holds only what it recorded from position 0 on."""
        state = self._state
        if command.hidden_states and state.hidden_states is None:
            state.hidden_states = self._parked_hidden or HiddenStateStore(
                self._config.num_hidden_layers, self._config.hidden_size, self._dtype, device=self._setup.placement)
            self._parked_hidden = None
        elif not command.hidden_states and state.hidden_states is not None:
            self._parked_hidden, state.hidden_states = state.hidden_states, None
        if command.replication and not self._replication and len(self._cached_ids):
            self._replicate(0, len(self._cached_ids), self._endpoint())  # the copy must cover what is cached
        self._replication = command.replication

    def _on_Regroup(self, command: Regroup) -> None:
        began = self.clock()
        group = self._used_group = self._collective()
        with self._progress.calling():
            group.all_reduce(self.device, torch.zeros(1, device=self._setup.placement))
        self._telemetry("regroup", began)

    def _on_Inherit(self, command: Inherit) -> Inherited:
        self.faults.at_recovery_work()
        state, began, assignment = self._state, self.clock(), command.assignment
        shard = state.shard
        heads = tuple(h for h in assignment.heads[self.device] if h not in shard.query_heads)
        columns = missing_ranges(assignment.mlp[self.device], shard.mlp)
        rows = assignment.vocab_range(self.device, self._config.vocab_size)
        standby = next((s for s in self._standby if (s.heads, s.mlp, s.vocab_rows) == (heads, columns, rows)), None)
        self._stale, self._standby = list(self._standby), ()  # read for a first failure: stale after it
        before = shard.nbytes + state.vocab.nbytes
        if heads or columns:
            state.shard = extend_shard(shard, self._checkpoint, heads, columns, self._dtype,
                                       blocks=standby.layers if standby else None, on_layer=self._progress.tick)
        if rows != state.vocab.rows:
            state.vocab = load_vocab_slice(self._checkpoint, rows, self._dtype, held=state.vocab,
                                           standby=standby.vocab if standby else ())
        self._assignment = assignment
        settle(self._setup.placement)
        seconds = self.clock() - began
        if heads or columns:
            self._telemetry("load weights", began)
        return Inherited(seconds, max(0, state.shard.nbytes + state.vocab.nbytes - before), standby is not None)

    def _on_Snapshot(self, command: Snapshot) -> None:
        """Cut every store to the leader's record, then keep a private copy of what a recovery may
        change: the KV cache and the copy of the predecessor's KV (re-protection after a rebuild
        replaces it)."""
        state = self._state
        self._cached_ids = self._cached_ids[:command.length]
        if state.progress is not None and state.progress.start != command.length:
            state.progress = None  # not the step after the leader's record: never resumed
        for store in (state.cache, state.hidden_states, state.replica):
            if store is not None:
                store.length = min(store.length, command.length)
        if command.keep_copy:
            self._snapshot = (state.cache.clone(), list(self._cached_ids),
                              None if state.hidden_states is None else state.hidden_states.length,
                              state.replica_of, None if state.replica is None else state.replica.clone(),
                              state.progress)

    def _on_Restore(self, command: Restore) -> None:
        cache, cached_ids, hidden_length, replica_of, replica, progress = self._snapshot
        state = self._state
        state.cache, self._cached_ids, state.progress = cache.clone(), list(cached_ids), progress
        if state.hidden_states is not None:
            state.hidden_states.length = hidden_length
        state.replica_of, state.replica = replica_of, None if replica is None else replica.clone()

    def _on_Rebuild(self, command: Rebuild) -> float:
        self.faults.at_recovery_work()
        began = self.clock()
        kv_cache_reused.rebuild(self._state, command.order, self._endpoint())
        self._cached_ids = list(command.order.context_ids)
        self._telemetry(f"rebuild KV: {command.order.strategy}", began)  # settles the accelerator first
        return self.clock() - began

    def _on_Reprotect(self, command: Reprotect) -> None:
        if self._replication:
            self._replicate(0, len(self._cached_ids), self._endpoint())

    def _on_ReportKV(self, command: ReportKV) -> dict:
        cache = self._state.cache
        return {(self.device, layer, g): tuple(t.to(CPU, copy=True) for t in cache.head(layer, g))
                for layer in range(cache.num_layers) for g in cache.kv_heads}

    def _on_Describe(self, command: Describe) -> DeviceInfo:
        state = self._state
        hidden, replica = state.hidden_states, state.replica
        return DeviceInfo(
            self.device, self._membership.epoch, state.shard.query_heads, state.cache.kv_heads, state.cache.length,
            state.shard.mlp, state.vocab.rows, state.shard.nbytes + state.vocab.nbytes, tuple(self._cached_ids),
            None if hidden is None else hidden.length, 0 if hidden is None else hidden.nbytes, self._replication,
            state.replica_of, () if replica is None else replica.kv_heads, 0 if replica is None else replica.length,
            0 if replica is None else replica.nbytes, sum(standby.nbytes for standby in self._standby),
            None if state.progress is None or state.progress.resumable_layer is None else
            (state.progress.start, state.progress.token_ids, state.progress.resumable_layer), self._pool_info())

    def _pool_info(self) -> PoolInfo | None:
        pool = self._paged
        if pool is None:
            return None
        return PoolInfo(pool.spec.generation, pool.kv.kv_heads, pool.hidden is not None, pool.replica_of,
                        () if pool.replica is None else pool.replica.kv_heads)

    def _on_TimeHiddenRebuild(self, command: TimeHiddenRebuild) -> float:
        """The seed's comparison, on a copy: project from the stored inputs every KV head this device
        now needs, or only those its cache lacks (keeping its own)."""
        self.faults.at_recovery_work()
        state = self._state
        wanted = state.shard.kv_heads
        kept = tuple(g for g in wanted if g in state.cache.kv_heads) if command.inherited_only else ()
        trial = replace(state, cache=state.cache.regrouped(kept).regrouped(wanted))
        missing = tuple(g for g in wanted if g not in kept)
        began = time.perf_counter()
        kv_cache_reused.rebuild_from_hidden_states(trial, missing)
        settle(self._setup.placement)
        return time.perf_counter() - began

    def _on_Arm(self, command: Arm) -> None:
        self.faults.arm(command.plan)

    def _on_CorruptKV(self, command: CorruptKV) -> None:
        for store in (self._state.cache.k, self._state.cache.v):
            for layer in store:
                layer[:, :self._state.cache.length] += command.delta

    def _endpoint(self) -> DeviceEndpoint:
        group = self._used_group = self._collective()
        return DeviceEndpoint(self.device, group, lambda: self._membership.epoch, self.faults, self._progress)

    def _collective(self) -> EpochCollective:
        """The group of this device's epoch: the membership read once, epoch and members together."""
        membership = self._membership
        return self._transport.collective(membership.epoch, membership.members)

    def _replicate(self, start: int, length: int, endpoint: DeviceEndpoint) -> None:
        """The step's new KV to the next member (a real send); the previous member's into the copy."""
        ring = self._ring(endpoint)
        if ring is None:
            return
        began = self.clock()
        replicate_step(self._state, start, length, endpoint, *ring)
        self._telemetry("replicate", began)

    def _ring(self, endpoint: DeviceEndpoint) -> tuple[int, int] | None:
        """(buddy, predecessor): the next member, who keeps a copy of this device's KV, and the
        previous one, whose KV this device copies; None alone."""
        members = endpoint.group.devices
        if len(members) < 2:
            return None
        i = members.index(self.device)
        return members[(i + 1) % len(members)], members[i - 1]

    # ---------------------------------------------------------------------------------------
    # The control thread: beats, watching, epochs

    def _serve_control(self) -> None:
        interval, next_beat, was_hung = self._setup.heartbeat.interval_s, 0.0, False
        looked_at = time.monotonic()
        while not self._stopping.is_set():
            if self.faults.hung.is_set():  # a stopped device does nothing, beats included
                was_hung = True
                time.sleep(POLL_S)
                continue
            now = time.monotonic()
            if now >= next_beat:  # a beat that fell due while hung goes out at once, with the old epoch
                self._beat()
                next_beat = max(next_beat + interval, now)
            if was_hung:  # what came meanwhile first: its silence says nothing of the others'
                was_hung = False
                self._drain_control()
                continue
            envelope = self._transport.receive(Address("control", self.device),
                                               min(POLL_S, max(0.0, next_beat - time.monotonic())))
            if envelope is not None:
                self._on_control(envelope.body)
                self._drain_control()  # beats queued while this thread waited for the CPU are not silence
            now = time.monotonic()
            if now - looked_at > 2 * POLL_S:  # this thread did not look meanwhile (stalled, hung, busy in
                self._monitor.excuse(now - looked_at - POLL_S)  # a handler): no one is blamed for that time
            looked_at = now
            self._monitor.observe(self.device, *self._progress.read())
            for detection in self._judged():
                self._on_declared(detection)

    def _judged(self) -> list[Detection]:
        """The watched devices declared now: silent ones, and stuck ones (their progress beside this
        device's own), once judging has begun."""
        if not self._judging:
            return []
        monitor = self._monitor
        return monitor.check() + monitor.check_progress()

    def _drain_control(self) -> None:
        while not self._stopping.is_set() and (envelope := self._transport.receive(
                Address("control", self.device), 0)) is not None:
            self._on_control(envelope.body)

    def _beat(self) -> None:
        membership = self._membership
        beat = Beat(self.device, membership.epoch, *self._progress.read())
        targets = [m for m in membership.members if m != self.device] if self.leader else [self._leader_id]
        for device in targets:
            self._send(Address("control", device), beat)
        self._telemetry("beat")

    def _on_control(self, body: Any) -> None:
        if isinstance(body, Stop):  # obeyed at once, whatever the device is doing, as SIGTERM is
            self._stop()
        elif isinstance(body, Beat):
            self._monitor.beat(body.device, body.epoch, body.progress, body.progress_age_s)
        elif isinstance(body, NewEpoch):
            self._admit(body)
        elif isinstance(body, LeaderRecord):
            self._leader_record = body
        elif isinstance(body, Watch):  # every device is up: silences count from now (loading is not silence)
            self._monitor.restart()
            self._judging = True
            if self.leader is not None:
                for member in self._membership.members:
                    if member != self.device:
                        self._send(Address("control", member), Watch())
        elif isinstance(body, Declare) and (self.leader is not None or body.device == self._leader_id):
            detection = self._monitor.declare(body.device, body.signal)  # a follower watches only its leader
            if detection is not None:
                self._on_declared(detection)

    def _admit(self, epoch: NewEpoch) -> None:
        """A new epoch: abort the collective a step may wait in, join the new group, or stop if fenced out."""
        if epoch.epoch <= self._membership.epoch:
            return
        self._transport.abort_epoch(self._membership.epoch)
        if self.device not in epoch.members:
            self._fenced()
            return
        with self._epoch_changed:
            self._membership, self._assignment = Membership(epoch.epoch, tuple(epoch.members)), epoch.assignment
            self._transport.collective(epoch.epoch, epoch.members)  # the new group, at once: the old one ends
            if epoch.leader != self._leader_id and self.leader is None:
                self._leader_id = epoch.leader
                self._monitor = self._watch([epoch.leader])
            self._declared_here = []
            self._epoch_changed.notify_all()

    def _on_declared(self, detection) -> None:
        if self.leader is not None:
            if not self.leader.declared(detection):
                self._fenced()
            return
        # the leader is gone: the lowest-numbered survivor (of those this device has not declared) leads
        membership = self._membership
        self._transport.abort_epoch(membership.epoch)
        self._declared_here.append(detection)
        lost = {d.device for d in self._declared_here}
        successor = min(m for m in membership.members if m not in lost)
        if successor == self.device:
            self._become_leader(self._declared_here)
        else:
            self._leader_id = successor
            self._monitor = self._watch([successor])

    def _become_leader(self, lost: list) -> None:
        """Lead from now on: watch every other member, and open an epoch for each lost leader."""
        from cluster_leader import Leader
        membership = self._membership
        watched = [m for m in membership.members if m != self.device]
        self._monitor = self._watch(watched, epoch=membership.epoch)
        self._leader_id = self.device
        self.leader = Leader(self.device, self._transport, membership.epoch, membership.members, self._assignment,
                             self._setup.policy, self._setup.heartbeat, self._monitor, self._cached_ids_snapshot,
                             self._setup.scheduling, self._block_costs(), self._leader_record)
        self.leader.start()
        for detection in lost:
            declared = self._monitor.declare(detection.device, detection.signal)
            if declared is not None and not self.leader.declared(
                    replace(declared, last_beat_at=detection.last_beat_at, stuck_in=detection.stuck_in),
                    failover=True):
                self._fenced()
                return

    def _block_costs(self) -> BlockCosts:
        config, block_size = self._config, self._setup.scheduling.block_size
        return BlockCosts.for_model(config, block_size, self._dtype.itemsize)

    def _cached_ids_snapshot(self) -> list[int]:
        return list(self._cached_ids)

    def _watched(self) -> list[int]:
        members = self._membership.members
        return [m for m in members if m != self.device] if self.device == self._leader_id else [self._leader_id]

    def _watch(self, devices, epoch: int | None = None) -> HeartbeatMonitor:
        return HeartbeatMonitor(devices, self._setup.heartbeat,
                                epoch=self._membership.epoch if epoch is None else epoch)

    # ---------------------------------------------------------------------------------------
    # Telling others

    def _send(self, to: Address, body: Any, request: int = 0) -> None:
        self._transport.send(to, Envelope(self.device, self._membership.epoch, request, body))

    def _telemetry(self, kind: str, began: float | None = None) -> None:
        """An event (`began` given: a span of work, which ends once the accelerator has done it)."""
        if began is not None:
            settle(self._setup.placement)
        now = self.clock()
        at, duration = (now, 0.0) if began is None else (began, now - began)
        self._send(Address("driver", DRIVER), Telemetry(((at, self.device, kind, duration),)))

    def _tell_strike(self, device: int, mode: str, at: float, signal: str | None) -> None:
        self._send(Address("driver", DRIVER), Strike(device, mode, at, signal))

    @staticmethod
    def clock() -> float:
        return time.monotonic()


def release_in_background(held: list) -> None:
    """Empty `held` (holding the last references to its items) on a thread of its own: unmapping a
    GB of memory takes about 0.1 s, which no step need wait for."""
    if held:
        threading.Thread(target=held.clear, name="release-memory", daemon=True).start()


def _with_trace(error: BaseException) -> BaseException:
    """The error, carrying its device-side traceback as a note (a traceback does not cross as bytes;
    a note does, and Python prints it with the error wherever it is raised again)."""
    error.add_note("raised on the device:\n" + "".join(traceback.format_exception(error)).rstrip())
    return error
