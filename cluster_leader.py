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

With many requests in flight the recovery rebuilds the batch instead (`_rebuild_batch`): the
scheduler's copy is resized to the pool the new assignment fits, and either every running request
is recomputed in packed steps (full recompute) or each survivor is sent a `RebuildBatch` that
carries its blocks into the new pool and fills the KV heads new to it (the reuse strategies,
planned from what each says its pool holds). The scheduler changes only once that has succeeded.

Every wait ends: on the devices' answers, or when the devices awaited have made no progress (as
their beats report it) for the wait limit (`WaitStalled`, naming them and the command). The driver
is told of progress on its request (`Working`): that, not a beat, keeps its own wait alive.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from device_protocol import (DRIVER, Address, BatchForward, BatchKV, Broadcast, Cancel, Describe, DeviceInfo,
                             Envelope, Forward, Inherit, Keep, LeaderChanged, LeaderRecord, NewEpoch, PoolSpec,
                             Prepare, Rebuild, RebuildBatch, Recover, RecoveryPolicy, Regroup, Reply, ReportPagedKV,
                             Reprotect, Restore, SendTo, ServedStep, ServeStep, Snapshot, Step, Submit, Telemetry,
                             Working)
from device_network import POLL_S, StepAbandoned, Transport, WaitStalled
from head_assignment import Assignment
from heartbeat_detection import Detection, HeartbeatConfig, HeartbeatMonitor
from kv_cache_reused import FALLBACKS, RecoveryImpossible, plan_batch_rebuild, plan_rebuild, strategy_info
from request_scheduler import BlockCosts, ScheduledStep, Scheduler, SchedulerConfig, Status, pool_blocks
from task_reassign import ReassignmentPlan, make_strategy

ABORT = "abort"  # RecoveryPolicy(strategy=ABORT): a batch's running requests fail at a failure, none rebuilt


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
    context_tokens: int           # positions whose KV was rebuilt (for a batch: over every request in flight)
    regroup_s: float = 0.0        # fencing, the survivors' first call on the new group, cutting to the context


@dataclass(frozen=True)
class StepResult:
    """A step's answer: the logits, and the recoveries the leader ran to get them."""

    logits: Any
    recoveries: tuple[Recovery, ...]
    leader: int
    epoch: int
    assignment: Assignment
    resumed_from: int | None = None  # the layer this step, abandoned by a failure, was resumed from


@dataclass(frozen=True)
class BatchPlan:
    """A planned rebuild of the batch: the scheduler and pool it leads to, what runs (full
    recompute: packed steps; a reuse strategy: one order per survivor), the requests it preempts."""

    scheduler: Scheduler
    pool: PoolSpec
    work: Any
    preempted: list[int]


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

    def __init__(self, host: int, transport: Transport, epoch: int, members: Sequence[int], assignment: Assignment,
                 policy: RecoveryPolicy, heartbeat: HeartbeatConfig, monitor: HeartbeatMonitor,
                 host_context: Callable[[], list[int]], scheduling: SchedulerConfig = SchedulerConfig(),
                 block_costs: BlockCosts = BlockCosts(1, 1), record: LeaderRecord | None = None):
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
        self._scheduling, self._block_costs = scheduling, block_costs
        self._scheduler: Scheduler | None = None  # made with the first request (many in flight)
        self._pool = PoolSpec(0, 0, scheduling.block_size)
        self._keeping = (False, False)  # (hidden states, replication): what the devices were told to keep
        self._preempted_unreported: list[int] = []  # told to the driver with the next step served
        self._aborted_by_recovery: list[int] = []  # likewise, ended "aborted" (RecoveryPolicy(strategy=ABORT))
        self._last_served: ServedStep | None = None
        if record is not None:  # the predecessor's, as of the last step it served: its requests go on here
            self._scheduler, self._pool, self._last_served = record.scheduler, record.pool, record.last_served
            self._keeping = (record.pool.hidden_states, record.pool.replication)

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
            self._keep(request.command)
        return self._run_group({m: request.command for m in self.members})

    def _keep(self, keep: Keep) -> None:
        """What the devices keep is paged with the batch's KV and costs its blocks: a pool that holds
        requests keeps what it was made with (refused), an idle one is made anew."""
        keeping = (keep.hidden_states, keep.replication)
        if self._scheduler is not None and keeping != self._keeping:
            if self._scheduler.running:
                raise ValueError("what is kept for recovery is paged with the requests' KV: change it before "
                                 "requests are in flight, or once none is running")
            self._keeping = keeping
            self._pool = self._new_pool()
            self._scheduler.restart_pool(self._pool.num_blocks)
            self._hand_on_record()
        self._replication, self._keeping = keep.replication, keeping

    def _on_SendTo(self, request: SendTo) -> Any:
        if request.device not in self.members:
            raise ValueError(f"Device-{request.device} is not a live device (members {list(self.members)})")
        return self._run_group({request.device: request.command})[request.device]

    # ---------------------------------------------------------------------------------------
    # Many requests in flight

    def _on_Submit(self, request: Submit) -> None:
        if self.policy.hold:
            raise ValueError("a held recovery (strategies compared from one state) serves one sequence; "
                             "many requests in flight recover on their own")
        known = self._batch().requests.get(request.request_id)
        if known is None or known.prompt_ids != request.prompt_ids:  # the same, sent again to a new leader
            self._batch().add(request.request_id, request.prompt_ids, request.max_new_tokens, request.eos_token_ids)
        self._hand_on_record()

    def _on_Cancel(self, request: Cancel) -> bool:
        cancelled = self._batch().cancel(request.request_id)
        self._hand_on_record()
        return cancelled

    def _on_ServeStep(self, request: ServeStep) -> ServedStep:
        """Schedule a step, run it on every member, and apply it; a failure meanwhile is recovered
        (every running request's KV rebuilt) and the step scheduled again."""
        served_so_far = 0 if self._last_served is None else self._last_served.step
        if request.seen == served_so_far - 1:  # served by the old leader just before it died
            return self._last_served
        if request.seen != served_so_far:
            raise ValueError(f"the driver has seen {request.seen} steps; this leader served {served_so_far}")
        recoveries = []
        while True:
            if self._declared:
                recoveries.append(self._recover(self.policy.strategy, rebuild=self._rebuild_batch))
            scheduler = self._batch()  # a recovery replaces it
            step = scheduler.schedule()
            started = time.perf_counter()
            try:
                greedy = self._run_batch_step(step) if step.chunks else None
            except StepAbandoned as abandoned:
                self._preempted_unreported += step.preempted  # scheduling them took effect; the step did not
                self._await_declaration(abandoned)
                continue
            sampling = [chunk.request_id for chunk in step.chunks if chunk.samples]
            tokens = dict(zip(sampling, greedy.token_ids)) if greedy else {}
            margins = dict(zip(sampling, greedy.margins)) if greedy else {}
            scales = dict(zip(sampling, greedy.scales)) if greedy else {}
            ended = scheduler.finish_step(step, tokens, margins)
            preempted, self._preempted_unreported = tuple(self._preempted_unreported) + step.preempted, []
            aborted, self._aborted_by_recovery = self._aborted_by_recovery, []
            self._last_served = ServedStep(tokens, margins, {**{r: Status.ABORTED.value for r in aborted},
                                                             **{r.request_id: r.status.value for r in ended}},
                                           preempted, tuple(recoveries), self.assignment, self.host, self.epoch,
                                           step.num_tokens, len(scheduler.waiting), len(scheduler.running),
                                           served_so_far + 1, time.perf_counter() - started, scales)
            self._hand_on_record()
            return self._last_served

    def _hand_on_record(self) -> None:
        """The record to the successor (the lowest-numbered other member, who leads if this host dies),
        before the driver hears of the change: a copy, since on threads a message is not copied."""
        successors = [m for m in self.members if m != self.host]
        if successors:
            self._send(Address("control", min(successors)),
                       LeaderRecord(self._scheduler.copy(), self._pool, self._last_served))

    def _batch(self) -> Scheduler:
        if self._scheduler is None:
            config = self._scheduling
            self._pool = self._new_pool()
            self._scheduler = Scheduler(self._pool.num_blocks, config.block_size, config.max_num_seqs,
                                        config.max_num_batched_tokens)
        return self._scheduler

    def _new_pool(self) -> PoolSpec:
        """The spec of a pool made now: this epoch's, sized for the assignment and what is kept."""
        hidden_states, replication = self._keeping
        blocks = pool_blocks(self.assignment, self._block_costs, self._scheduling.kv_cache_memory_bytes,
                             hidden_states, replication)
        return PoolSpec(self.epoch, blocks, self._scheduling.block_size, hidden_states, replication)

    def _run_batch_step(self, step: ScheduledStep, pool: PoolSpec | None = None):
        answers = self._run_group({m: BatchForward(step.chunks, pool or self._pool) for m in self.members})
        return answers[self.members[0]]

    def _rebuild_batch(self, post: PostFailure, strategy: str, restore: bool) -> tuple[str, str | None, float, int]:
        """Every running request's lost KV, rebuilt on the new assignment into a new pool, with
        `strategy` or the first fallback that still works; the newest wait (preempted) while the
        pool, which holds fewer blocks when a survivor took more KV heads, cannot hold them all. With
        ABORT nothing is rebuilt: every running request ends aborted."""
        if strategy == ABORT:
            return self._abort_batch()
        return self._first_possible(strategy, lambda name: self._plan_batch(name, post), self._run_batch_plan)

    def _abort_batch(self) -> tuple[str, str | None, float, int]:
        """The baseline without recovery: the running requests fail (told to the driver as ended
        "aborted" with the next step), the waiting ones stay, and a fresh pool serves them."""
        started = time.perf_counter()
        self._pool = self._new_pool()
        self._aborted_by_recovery += self._batch().abort_running(self._pool.num_blocks)
        return ABORT, None, time.perf_counter() - started, 0

    def _plan_batch(self, strategy: str, post: PostFailure) -> BatchPlan:
        """The rebuild of the batch, on a copy of the scheduler: full recompute gives every running
        request fresh blocks to recompute; a reuse strategy keeps their blocks (renumbered where the
        pool shrank) and orders each survivor to fill the KV heads new to it."""
        trial, pool = self._batch().copy(), self._new_pool()
        if strategy == "full-recompute":
            preempted = trial.restart_pool(pool.num_blocks)
            return BatchPlan(trial, pool, trial.recompute_steps(), preempted)
        preempted, moves = trial.resize(pool.num_blocks)
        old_number = {new: old for old, new in moves.items()}
        blocks = [(old_number.get(b, b), b) for r in trial.running for b in trial.pool.tables[r]]
        spans = [(tuple(trial.pool.tables[r.request_id]), r.num_computed) for r in trial.in_flight()]
        steps = [step.chunks for step in trial.recompute_steps()] if strategy == "reuse-replay" else []
        orders = plan_batch_rebuild(strategy, post.assignment, {d: info.pool for d, info in post.survivors.items()},
                                    self._pool.generation, pool, blocks, spans, steps)
        return BatchPlan(trial, pool, orders, preempted)

    def _run_batch_plan(self, strategy: str, plan: BatchPlan) -> tuple[float, int]:
        """Run it; the leader's scheduler and pool change only once every survivor has done its part."""
        started = time.perf_counter()
        if strategy == "full-recompute":
            for step in plan.work:
                self._run_batch_step(step, plan.pool)
            rebuilt = sum(step.num_tokens for step in plan.work)
        else:
            self._run_group({d: RebuildBatch(order) for d, order in plan.work.items()})
            rebuilt = sum(length for _, length in next(iter(plan.work.values())).spans)
        self._scheduler, self._pool = plan.scheduler, plan.pool
        self._preempted_unreported += plan.preempted
        return time.perf_counter() - started, rebuilt

    def _on_BatchKV(self, request: BatchKV) -> dict[int, dict]:
        """Every running request's KV on every device (for checks): request -> (device, layer, KV head) -> (K, V)."""
        scheduler = self._batch()
        spans = {r.request_id: (tuple(scheduler.pool.tables[r.request_id]), r.num_computed)
                 for r in scheduler.in_flight()}
        answers = self._run_group({m: ReportPagedKV(spans) for m in self.members})
        return {r: {key: kv for answer in answers.values() for key, kv in answer[r].items()} for r in spans}

    # ---------------------------------------------------------------------------------------
    # Recovery

    def _recover(self, strategy: str, prepared: PostFailure | None = None,
                 rebuild: Callable[..., tuple[str, str | None, float, int]] | None = None) -> Recovery:
        """Prepare (unless already prepared) and rebuild (the one sequence's KV, or with `rebuild` the
        batch's); started again on what is left when another device dies meanwhile."""
        while True:
            try:
                post = prepared if prepared is not None and not self._declared else self._prepare()
                used, fallback, rebuild_s, rebuilt = (rebuild or self._rebuild)(post, strategy,
                                                                                restore=prepared is not None)
            except StepAbandoned as abandoned:
                self._await_declaration(abandoned)
                prepared = None
                continue
            recovery = Recovery(post.events, post.plans, used, fallback, post.weight_load_s, rebuild_s,
                                self._attempts, rebuilt, post.regroup_s)
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

    def _rebuild(self, post: PostFailure, strategy: str, restore: bool) -> tuple[str, str | None, float, int]:
        """Rebuild the one sequence's KV with `strategy`, or the first fallback that still works."""
        def plan(name: str) -> dict:
            return plan_rebuild(name, post.assignment, post.survivors, post.context_ids)

        def run(name: str, orders: dict) -> tuple[float, int]:
            if restore:
                self._run_group({d: Restore() for d in orders})
            started = time.perf_counter()
            self._run_group({d: Rebuild(order) for d, order in orders.items()})
            rebuild_s = time.perf_counter() - started
            if self._replication:
                self._run_group({d: Reprotect() for d in orders})
            self._context = list(post.context_ids)
            return rebuild_s, len(post.context_ids)

        return self._first_possible(strategy, plan, run)

    @staticmethod
    def _first_possible(strategy: str, plan: Callable[[str], Any], run: Callable[[str, Any], tuple[float, int]]
                        ) -> tuple[str, str | None, float, int]:
        """Plan `strategy`, or the first fallback whose plan is possible (saying why the others were
        not), and run it: (the strategy used, why it fell back, seconds, positions rebuilt)."""
        strategy_info(strategy)
        reasons = []
        for name in (strategy, *(n for n in FALLBACKS if n != strategy)):
            try:
                planned = plan(name)
            except RecoveryImpossible as reason:
                reasons.append(f"{name} impossible ({reason})")
                continue
            rebuild_s, rebuilt = run(name, planned)
            return name, "; ".join(reasons + [f"fell back to {name}"]) if reasons else None, rebuild_s, rebuilt
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
            batch = self._rebuild_batch if self._scheduler is not None else None  # requests in flight
            recovery = None if self.policy.hold else self._recover(self.policy.strategy, rebuild=batch)
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
        deadline = None
        answered_at = looked_at = time.monotonic()
        while True:
            waiting = [d for d in commands if d not in answers and d not in errors and d in self.members]
            if (errors or len(waiting) < len(commands) - len(answers) - len(errors)) and deadline is None:
                deadline = time.monotonic() + self._heartbeat.interval_s  # broken: a grace for the rest
            if not waiting or (deadline is not None and time.monotonic() > deadline):
                break
            self._refuse_if_host_gone()
            envelope = self._transport.receive(Address("results", self.host), POLL_S)
            now = time.monotonic()
            if now - looked_at > 2 * POLL_S:  # this thread did not run meanwhile (a loaded machine):
                answered_at += now - looked_at - POLL_S  # the devices are not blamed for that time
            looked_at = now
            if envelope is None:
                self._refuse_if_stalled(waiting, commands, answered_at)  # judged only with nothing to read
                continue
            if envelope.request != request:
                continue  # a late answer to an earlier request (a fenced device's)
            answered_at = now
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
