"""The leader, hosted by one device: it opens epochs, serves the driver's requests by sending
commands to the devices, and recovers from failures. It decides; the devices do the work.

Its host's control thread watches every member and tells it of each declaration (`declared`): the
leader opens a new epoch at once (every survivor aborts the collective it may be waiting in and
joins the new group; the dead device never does) and queues the failure. A recovery then runs as
commands: plan the reassignment (task_reassign.py), `Regroup` (the survivors' first call on the new
group), `Snapshot` the survivors at the leader's record of the context (keeping a copy only when
holding, to compare strategies), `Inherit` the weight slices, `Describe` what they hold (each phase
timed), plan a `RebuildOrder`
per survivor (kv_cache_reused.py, falling back when the asked strategy is impossible), `Rebuild`,
and `Reprotect` the KV copies. A death during the recovery starts it again on what is left. With
`RecoveryPolicy.hold` the leader stops after the failure is declared and lets the driver call
`Prepare` and `Recover` (to compare strategies from one state); otherwise it recovers on its own and
redoes the abandoned step (from the layer the survivors had reached, which each recorded). When this leader's host dies, the lowest-numbered survivor leads.

Every wait ends: on the devices' answers, or when the devices awaited have made no progress (as
their beats report it) for the wait limit (`WaitStalled`, naming them and the command). The driver
is told of progress on its request (`Working`): that, not a beat, keeps its own wait alive.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from device_protocol import (DRIVER, Address, Broadcast, Describe, DeviceInfo, Envelope, Forward, Inherit, Keep,
                             LeaderChanged, NewEpoch, Prepare, Rebuild, Recover, RecoveryPolicy, Regroup, Reply, Reprotect,
                             Restore, SendTo, Snapshot, Step, Telemetry, Working)
from device_network import POLL_S, StepAbandoned, WaitStalled
from head_assignment import Assignment
from heartbeat_detection import Detection, HeartbeatConfig, HeartbeatMonitor
from kv_cache_reused import FALLBACKS, RecoveryImpossible, plan_rebuild, strategy_info
from task_reassign import ReassignmentPlan, make_strategy


@dataclass(frozen=True)
class FailureEvent:
    """A failure as the leader saw it."""

    device: int
    detection: Detection  # when and on which signal it was declared dead
    leader: int           # the device that led the recovery


@dataclass(frozen=True)
class PostFailure:
    """What a recovery starts from: the plans applied, the context, and what each survivor holds."""

    events: tuple[FailureEvent, ...]
    plans: tuple[ReassignmentPlan, ...]
    assignment: Assignment
    context_ids: tuple[int, ...]
    survivors: Mapping[int, DeviceInfo]
    weight_load_s: float
    weight_bytes: int = 0   # what the new owners read
    regroup_s: float = 0.0  # fencing, the survivors' first call on the new group, cutting to the leader's record
    weights_from_standby: bool = False  # every new owner took its slices from standby (none read)


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


@dataclass(frozen=True)
class StepResult:
    """A step's answer: the logits, and the recoveries the leader ran to get them."""

    logits: Any
    recoveries: tuple[Recovery, ...]
    leader: int
    epoch: int
    assignment: Assignment
    resumed_from: int | None = None  # the layer this step, abandoned by a failure, was resumed from


class StepFailed(StepAbandoned):
    """A device failed; the leader holds (RecoveryPolicy.hold): the driver decides the recovery."""

    def __init__(self, events: Sequence[FailureEvent]):
        super().__init__(f"Device{'s' if len(events) > 1 else ''} "
                         f"{', '.join(str(e.device) for e in events)} declared dead; recovery held")
        self.events = tuple(events)

    def __reduce__(self):
        return StepFailed, (self.events,)


class Leader:
    """The leader of the cluster, on a thread of its host device."""

    def __init__(self, host: int, transport, epoch: int, members: Sequence[int], assignment: Assignment,
                 policy: RecoveryPolicy, heartbeat: HeartbeatConfig, monitor: HeartbeatMonitor,
                 host_context: Callable[[], list[int]]):
        self.host, self._transport = host, transport
        self.epoch, self.members, self.assignment = epoch, tuple(members), assignment
        self.policy, self._heartbeat, self._monitor = policy, heartbeat, monitor
        self._reassign = make_strategy(policy.reassign, policy.seed)  # one random stream across failures
        self._context: list[int] = host_context()
        self._lock = threading.Lock()
        self._declared: list[FailureEvent] = []  # declared, not yet taken by a recovery
        self._events: list[FailureEvent] = []    # taken by the recovery in progress
        self._plans: list[ReassignmentPlan] = []
        self._post: PostFailure | None = None    # the state recoveries start from (kept while holding)
        self._recovered = False                  # the recovery in progress has rebuilt at least once
        self._attempts = 0                       # its preparations (more than 1: a death interrupted it)
        self._replication = False
        self._failover = False
        self._requests = 0
        self._serving = 0                        # the driver's request in hand (0: none, or a failover)
        self._told_at = 0.0                      # the progress the driver was last told of (`Working`)
        self._fence_s = 0.0                      # spent fencing devices declared since the last preparation
        self._resumable: PostFailure | None = None  # the last recovery's state: its abandoned step may resume
        self._stopping = threading.Event()

    def start(self) -> None:
        self._transport.start_thread(f"Device-{self.host}-leader", self._serve)

    def stop(self) -> None:
        self._stopping.set()

    # ---------------------------------------------------------------------------------------
    # Declarations (called on the host's control thread)

    def declared(self, detection: Detection, failover: bool = False) -> bool:
        """A member was declared dead: open the next epoch for the survivors at once (telling the dead
        device too: a hung one reads it when it wakes, and stops), and queue the failure.

        The new epoch's group is claimed first. If another device already formed it with other
        members, this leader's view is stale (it was cut off): False, and its host must stop."""
        with self._lock:
            if detection.device not in self.members:
                return True
            survivors = tuple(m for m in self.members if m != detection.device)
            try:
                self._transport.collective(detection.epoch, survivors)
            except ValueError:
                self.stop()
                return False
            self.epoch, self.members = detection.epoch, survivors
            self._declared.append(FailureEvent(detection.device, detection, self.host))
            self._failover = self._failover or failover
            news = NewEpoch(self.epoch, self.members, self.assignment, self.host, (detection.device,))
        for device in (*self.members, detection.device):
            self._send(Address("control", device), news)
        if self.policy.fence:
            started = time.perf_counter()
            self._transport.fence(detection.device)  # processes: SIGKILL (threads: the epoch alone fences)
            with self._lock:
                self._fence_s += time.perf_counter() - started
        self._send(Address("driver", DRIVER),
                   Telemetry(((detection.declared_at, detection.device, "declared dead", 0.0),)))
        return True

    def _reform(self) -> None:
        """Open a new epoch with the same members: a group broken by a device's error is replaced."""
        with self._lock:
            self.epoch = self._monitor.advance_epoch()
            news = NewEpoch(self.epoch, self.members, self.assignment, self.host, ())
        for member in self.members:
            self._send(Address("control", member), news)

    # ---------------------------------------------------------------------------------------
    # Serving the driver

    def _serve(self) -> None:
        while not self._stopping.is_set():
            if self._failover:
                self._lead_after_failover()
            envelope = self._transport.receive(Address("leader", self.host), POLL_S)
            if envelope is None:
                continue
            self._serving = envelope.request
            try:
                reply = Reply(getattr(self, f"_on_{type(envelope.body).__name__}")(envelope.body))
            except BaseException as error:  # noqa: BLE001 - handed back to the driver
                reply = Reply(error=error)
            self._serving = 0
            if self._stopping.is_set():
                return  # the host died meanwhile: a dead leader answers nothing
            self._send(Address("driver", DRIVER), reply, envelope.request)

    def _on_Step(self, request: Step) -> StepResult:
        (chunk,) = request.chunks
        self._context = self._context[:chunk.start]  # overwritten by this step, whether it finishes or not
        recoveries = []
        while True:
            if self._declared:
                if self.policy.hold:
                    raise StepFailed(self._take_declared_view())
                recoveries.append(self._recover(self.policy.strategy))
            forward = Forward(request.chunks, request.logits, self._resume_layer(chunk))
            try:
                answers = self._run_group({m: forward for m in self.members})
            except StepAbandoned as abandoned:
                self._await_declaration(abandoned)
                continue
            self._context += list(chunk.token_ids)
            self._resumable = None
            return StepResult(answers[self.members[0]], tuple(recoveries), self.host, self.epoch, self.assignment,
                              forward.resume_layer)

    def _on_Prepare(self, request: Prepare) -> PostFailure:
        if self._recovered:  # a new failure: a new recovery
            self._events, self._plans, self._recovered, self._attempts = [], [], False, 0
        while True:
            try:
                self._post = self._prepare()
                return self._post
            except StepAbandoned as abandoned:
                self._await_declaration(abandoned)

    def _on_Recover(self, request: Recover) -> Recovery:
        return self._recover(request.strategy, prepared=self._post)

    def _on_Broadcast(self, request: Broadcast) -> dict[int, Any]:
        if isinstance(request.command, Keep):
            self._replication = request.command.replication
        return self._run_group({m: request.command for m in self.members})

    def _on_SendTo(self, request: SendTo) -> Any:
        if request.device not in self.members:
            raise ValueError(f"Device-{request.device} is not a live device (members {list(self.members)})")
        return self._run_group({request.device: request.command})[request.device]

    # ---------------------------------------------------------------------------------------
    # Recovery

    def _recover(self, strategy: str, prepared: PostFailure | None = None) -> Recovery:
        """Prepare (unless already prepared) and rebuild; started again on what is left when another
        device dies meanwhile."""
        while True:
            try:
                post = prepared if prepared is not None and not self._declared else self._prepare()
                used, fallback, rebuild_s = self._rebuild(post, strategy, restore=prepared is not None)
            except StepAbandoned as abandoned:
                self._await_declaration(abandoned)
                prepared = None
                continue
            recovery = Recovery(post.events, post.plans, used, fallback, post.weight_load_s, rebuild_s,
                                self._attempts, len(post.context_ids))
            self._resumable = post
            if self.policy.hold:  # the driver may rebuild again from the same state
                self._post, self._recovered = post, True
            else:
                self._post, self._events, self._plans, self._attempts = None, [], [], 0
            return recovery

    def _resume_layer(self, chunk) -> int | None:
        """The layer from which every member can go on with `chunk`, when it is the step a failure
        abandoned (each survivor recorded how far it got; the layers before are valid but for the
        K and V of inherited heads, which the recorded inputs give); None: the step runs whole."""
        post = self._resumable
        if post is None or set(post.survivors) != set(self.members):
            return None
        steps = [info.abandoned_step for info in post.survivors.values()]
        if any(step is None or step[:2] != (chunk.start, chunk.token_ids) for step in steps):
            return None
        return min(step[2] for step in steps)

    def _prepare(self) -> PostFailure:
        """Take every declared failure, plan where the dead devices' work goes, inherit weights, cut
        the survivors to the leader's record of the context, and ask what they hold."""
        with self._lock:
            taken, self._declared = self._declared, []
        self._attempts += 1
        self._events += taken
        for event in taken:
            if event.device in self.assignment.devices:
                self._plans.append(self._reassign.plan(self.assignment, event.device))
                self.assignment = self._plans[-1].after
            self._monitor.remove(event.device)
        survivors = self.assignment.devices
        started = time.perf_counter()
        self._run_group({d: Regroup() for d in survivors})
        self._run_group({d: Snapshot(len(self._context), keep_copy=self.policy.hold) for d in survivors})
        regroup_s = time.perf_counter() - started
        started = time.perf_counter()
        inherited = self._run_group({d: Inherit(self.assignment) for d in survivors})
        weight_load_s = time.perf_counter() - started
        started = time.perf_counter()
        infos = self._run_group({d: Describe() for d in survivors})
        with self._lock:
            regroup_s += self._fence_s + time.perf_counter() - started
            self._fence_s = 0.0
        readers = [answer for answer in inherited.values() if answer.bytes_read]
        return PostFailure(tuple(self._events), tuple(self._plans), self.assignment, tuple(self._context), infos,
                           weight_load_s, sum(answer.bytes_read for answer in readers), regroup_s,
                           bool(readers) and all(answer.from_standby for answer in readers))

    def _rebuild(self, post: PostFailure, strategy: str, restore: bool) -> tuple[str, str | None, float]:
        """Rebuild with `strategy`, or the first fallback that still works (saying why)."""
        strategy_info(strategy)
        reasons = []
        for name in (strategy, *(n for n in FALLBACKS if n != strategy)):
            try:
                orders = plan_rebuild(name, post.assignment, post.survivors, post.context_ids)
            except RecoveryImpossible as reason:
                reasons.append(f"{name} impossible ({reason})")
                continue
            if restore:
                self._run_group({d: Restore() for d in orders})
            started = time.perf_counter()
            self._run_group({d: Rebuild(order) for d, order in orders.items()})
            rebuild_s = time.perf_counter() - started
            if self._replication:
                self._run_group({d: Reprotect() for d in orders})
            self._context = list(post.context_ids)
            return name, "; ".join(reasons + [f"fell back to {name}"]) if reasons else None, rebuild_s
        raise AssertionError("full-recompute needs nothing kept and cannot be impossible")

    def _lead_after_failover(self) -> None:
        """This device leads since the old leader was declared dead: agree on the context with the
        survivors, recover (or hold), and tell the driver, with the error that stopped it if one did
        (the driver waits for this message: nothing may end the leader's thread without it)."""
        self._failover = False
        recovery, error = None, None
        try:
            infos = self._run_group({m: Describe() for m in self.members})
            self._context = list(_common_prefix([info.cached_ids for info in infos.values()]))
            self._replication = all(info.replication for info in infos.values())  # the old leader knew it
            recovery = None if self.policy.hold else self._recover(self.policy.strategy)
        except WaitStalled as stalled:  # nobody to blame: trying again would stall again
            error = stalled
        except StepAbandoned:
            self._failover = True  # another device died meanwhile: try again
            return
        except BaseException as failed:  # noqa: BLE001 - handed to the driver, which raises it
            error = failed
        self._send(Address("driver", DRIVER),
                   LeaderChanged(self.host, self.epoch, recovery, self._take_declared_view(), error))

    def _take_declared_view(self) -> list[FailureEvent]:
        with self._lock:
            return list(self._declared)

    def _await_declaration(self, abandoned: StepAbandoned) -> None:
        """A step was abandoned: wait until the device behind it has been declared dead, as long as a
        detection may take (the wait limit). A stalled wait is raised as it is: it outlasted every
        detector, and no device was to blame."""
        if isinstance(abandoned, WaitStalled) and not self._declared:
            raise abandoned
        limit = self._heartbeat.wait_limit_s
        deadline = time.monotonic() + limit
        while not self._declared:
            self._refuse_if_host_gone()
            if time.monotonic() > deadline:
                self._reform()  # the broken group is replaced: the next request finds one that works
                raise WaitStalled(f"the leader, Device-{self.host}, waited {limit:.1f} s for the device behind an "
                                  f"abandoned step to be declared dead; none was ({abandoned})")
            time.sleep(POLL_S)

    # ---------------------------------------------------------------------------------------
    # Commands and answers

    def _run_group(self, commands: Mapping[int, Any]) -> dict[int, Any]:
        """Send each device its command and wait for every answer. Once the step is known to be broken
        (a device answered with an error, or one of them was declared dead), the others' answers are
        awaited for one heartbeat interval only: a crashed device never answers, and a late answer is
        ignored. Until then the wait lasts as long as the devices awaited make progress; stalled for
        the wait limit, it ends (`_refuse_if_stalled`). Any error is then raised: a device's own error
        first (in device order), never the StepAbandoned its peers got from it."""
        self._requests += 1
        request, epoch = self._requests, self.epoch
        for device, command in commands.items():
            self._send(Address("commands", device), command, request, epoch)
        answers: dict[int, Any] = {}
        errors: dict[int, BaseException] = {}
        deadline, answered_at = None, time.monotonic()
        while True:
            waiting = [d for d in commands if d not in answers and d not in errors and d in self.members]
            if (errors or len(waiting) < len(commands) - len(answers) - len(errors)) and deadline is None:
                deadline = time.monotonic() + self._heartbeat.interval_s  # broken: a grace for the rest
            if not waiting or (deadline is not None and time.monotonic() > deadline):
                break
            self._refuse_if_host_gone()
            self._refuse_if_stalled(waiting, commands, answered_at)
            envelope = self._transport.receive(Address("results", self.host), POLL_S)
            if envelope is None or envelope.request != request:
                continue  # nothing yet, or a late answer to an earlier request (a fenced device's)
            answered_at = time.monotonic()
            reply: Reply = envelope.body
            if reply.error is None:
                answers[envelope.sender] = reply.value
                continue
            errors[envelope.sender] = reply.error
            if not isinstance(reply.error, StepAbandoned):
                self._transport.abort_epoch(epoch)  # nobody waits in a collective for the failed device
        root = next((e for _, e in sorted(errors.items()) if not isinstance(e, StepAbandoned)), None)
        if root is not None:
            self._reform()
            for device, error in sorted(errors.items()):
                if error is not root:
                    root.add_note(f"meanwhile Device-{device}: {type(error).__name__}: {str(error).splitlines()[0]}")
            raise root
        if errors or len(answers) < len(commands):
            said = [f"Device-{d}: {str(e).splitlines()[0]}" for d, e in sorted(errors.items())]
            silent = [f"Device-{d}" for d in commands if d not in answers and d not in errors]
            raise StepAbandoned(f"epoch {epoch}: " + "; ".join(said + ([f"no answer from {', '.join(silent)}"]
                                                                      if silent else [])))
        return answers

    def _refuse_if_stalled(self, waiting: Sequence[int], commands: Mapping[int, Any], answered_at: float) -> None:
        """The devices awaited made no progress (nor answered) for the wait limit: the wait ends, and a
        new epoch releases them from the calls they may be stuck in. Progress is told to the driver."""
        progressed = max([answered_at, *(self._monitor.progressed_at(d) for d in waiting)])
        if progressed - self._told_at >= self._heartbeat.interval_s:
            self._told_at = progressed
            self._send(Address("driver", DRIVER), Working(self._serving))
        limit = self._heartbeat.wait_limit_s
        if time.monotonic() - progressed <= limit:
            return
        self._reform()
        names = ", ".join(sorted({type(commands[d]).__name__ for d in waiting}))
        raise WaitStalled(f"the leader, Device-{self.host}, waited {limit:.1f} s on "
                          f"{', '.join(f'Device-{d}' for d in waiting)} in {names}: no progress")

    def _refuse_if_host_gone(self) -> None:
        """The host device died or was fenced out: whatever this leader was doing ends with it."""
        if self._stopping.is_set():
            raise StepAbandoned(f"the leader's device, Device-{self.host}, is gone")

    def _send(self, to: Address, body: Any, request: int = 0, epoch: int | None = None) -> None:
        self._transport.send(to, Envelope(self.host, self.epoch if epoch is None else epoch, request, body))


def _common_prefix(sequences: Sequence[Sequence[int]]) -> tuple[int, ...]:
    shortest = min(sequences, key=len)
    for i, token in enumerate(shortest):
        if any(s[i] != token for s in sequences):
            return tuple(shortest[:i])
    return tuple(shortest)
