"""The protocol: every message between the driver, the leader and the devices, as plain data.

A device is a private world reached only by messages. Who sends what:

| from -> to | inbox | messages |
|---|---|---|
| driver -> leader | `leader` | requests: `Step`, `Prepare`, `Recover`, `Broadcast`, `SendTo`; batches: `Submit`, `ServeStep`, `Cancel`, `BatchKV` |
| leader -> driver | `driver` | one `Reply` per request; notices: `LeaderChanged`, `Working` (its request made progress) |
| leader -> device | `commands` | commands: `Forward`, `BatchForward`, `RebuildBatch`, `ReportPagedKV`, `Keep`, `Inherit`, `Rebuild`, `Reprotect`, `Snapshot`, `Restore`, `ReportKV`, `Describe`, `TimeHiddenRebuild`, `Arm`, `CorruptKV` |
| device -> leader | `results` | one `Reply` per command |
| every device -> every device | `control` | `Beat` (devices beat to the leader, the leader to every device; each carries the beater's compute `Progress`), `NewEpoch` (from the leader), `Declare` (a peer's collective connection closed), `LeaderRecord` (the leader to its successor) |
| driver -> leader | `control` | `Watch` (every device is up), `Declare` (a death seen on another signal) |
| driver -> every device | `control` | `Stop` (obeyed at once, whatever the device is doing); processes: `Declare` (a device process exited; from its node's launcher, to every node's devices) |
| device -> driver | `driver` | `Telemetry` (what the device did, for the timeline), `Strike` (an injected fault fired) |
| launcher -> driver | `driver` | processes: `DeviceExited` (a device process ended while the cluster ran) |

Collectives and KV transfers between devices go through the `Collective` (tensor_parallel_model.py),
never through these inboxes. Every message carries its sender's epoch: a receiver refuses one
from an ended epoch (fencing). One sequence is stepped with `Step`/`Forward`; many requests in flight
are the leader's to schedule (`Submit`, `ServeStep`), stepped on the devices with `BatchForward`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from head_assignment import Assignment

DRIVER = -1  # the sender id of the program that drives generation


@dataclass(frozen=True)
class Address:
    """An inbox: `kind` is one of INBOXES; `owner` a device, or DRIVER."""

    kind: str
    owner: int

    def __post_init__(self) -> None:
        if self.kind not in INBOXES:
            raise ValueError(f"no inbox of kind {self.kind!r} (kinds: {', '.join(INBOXES)})")


INBOXES = ("commands", "control", "leader", "results", "driver")


@dataclass(frozen=True)
class Envelope:
    """What travels: the sender, the sender's epoch, the request it answers or asks (0: a notice)."""

    sender: int
    epoch: int
    request: int
    body: Any


# --------------------------------------------------------------------------------------------
# Work: a batch of sequences


@dataclass(frozen=True)
class Chunk:
    """Tokens of one sequence at positions start..start+len: what a step computes for it."""

    sequence: int
    token_ids: tuple[int, ...]
    start: int


# --------------------------------------------------------------------------------------------
# Commands (leader -> device); each is answered by one Reply


@dataclass(frozen=True)
class Forward:
    """One forward step over the chunks; `logits`: "last", "all" or "none". The first device of the
    group answers with the logits, the others with None (every device has them after the gather)."""

    chunks: tuple[Chunk, ...]
    logits: str = "last"
    resume_layer: int | None = None  # an abandoned step redone from this layer (the layers before it are kept)


@dataclass(frozen=True)
class Keep:
    """What the device keeps in normal running for recovery: its layers' inputs (reuse-hidden), a
    copy of its KV sent to its buddy every step (replicate). Replication switched on sends what is
    already cached first, so the copy covers the context. The leader, forwarding it, sizes the
    batch's pool for what is kept (both are paged with the requests' KV, in the same budget)."""

    hidden_states: bool
    replication: bool


@dataclass(frozen=True)
class Inherit:
    """Read the weight slices this device lacks for `assignment`. Answered with `Inherited`."""

    assignment: Assignment


@dataclass(frozen=True)
class Regroup:
    """Take part in the first call on the new epoch's group: answered once every member has joined
    it (on processes, once the new gloo group is formed), so the leader can time the re-forming."""


@dataclass(frozen=True)
class Inherited:
    seconds: float
    bytes_read: int          # the new slices' bytes: read from the checkpoint, or taken from standby
    from_standby: bool = False


@dataclass(frozen=True)
class Rebuild:
    """Rebuild the KV cache as `order` says (kv_cache_reused.RebuildOrder). Answered with seconds."""

    order: Any


@dataclass(frozen=True)
class Reprotect:
    """Send the whole KV to the current buddy (after a recovery changed who is whose buddy)."""


@dataclass(frozen=True)
class Snapshot:
    """Cut every store to `length` positions (what the leader recorded) and, with `keep_copy`, keep
    a private copy of the KV, to start several recoveries from the same state (`Restore`)."""

    length: int
    keep_copy: bool = True


@dataclass(frozen=True)
class Restore:
    """Go back to the copy kept by `Snapshot`."""


@dataclass(frozen=True)
class ReportKV:
    """Answered with every (device, layer, KV head) -> (K, V) this device holds, copied: for checks."""


@dataclass(frozen=True)
class Describe:
    """Answered with a `DeviceInfo`."""


@dataclass(frozen=True)
class DeviceInfo:
    """What the leader may know of a device without touching it."""

    device: int
    epoch: int
    query_heads: tuple[int, ...]
    kv_heads: tuple[int, ...]        # those its cache holds
    kv_positions: int                # positions its cache holds for each of them
    mlp: tuple[tuple[int, int], ...]
    vocab: tuple[int, int]
    weight_bytes: int
    cached_ids: tuple[int, ...]      # the tokens its cache holds, in order
    hidden_positions: int | None     # positions its hidden-state store holds (None: not kept)
    hidden_bytes: int
    replication: bool
    replica_of: int | None           # the device whose KV copy it holds
    replica_kv_heads: tuple[int, ...]
    replica_positions: int
    replica_bytes: int
    standby_bytes: int = 0           # weight slices read in advance for a failure (`standby_weights`)
    abandoned_step: tuple[int, tuple[int, ...], int] | None = None  # (start, tokens, layer it can resume from)
    pool: "PoolInfo | None" = None   # its paged pool (many requests in flight), if it has one


@dataclass(frozen=True)
class TimeHiddenRebuild:
    """The seed's device-level comparison: rebuild from the stored layer inputs every KV head this
    device holds (`inherited_only` False) or only those it lacks, on a copy; answered with seconds."""

    inherited_only: bool


@dataclass(frozen=True)
class Arm:
    """Fault injection: `plan` (fault_injection.FailurePlan) strikes this device at its point."""

    plan: Any


@dataclass(frozen=True)
class CorruptKV:
    """Fault injection: add `delta` to every cached K and V entry (memory corruption)."""

    delta: float


# --------------------------------------------------------------------------------------------
# Control (any device -> any device's control inbox)


@dataclass(frozen=True)
class Progress:
    """What a device's compute thread is doing, sent with every beat: liveness alone cannot tell a
    wedged compute thread from a busy one. `command` is the command in hand ("idle": none), from the
    leader's request `request` of epoch `epoch`; for it the device has entered `entered` collective
    calls (counted on entry: when one device is stuck, its peers wait for it inside the next call,
    one call ahead of it), is inside one now or not (`in_call`), and has ticked `ticks` times from
    inside long local work (a layer of a prefill or a rebuild, a block of an inheritance)."""

    command: str = "idle"
    request: int = 0
    epoch: int = 0
    entered: int = 0
    in_call: bool = False
    ticks: int = 0

    @property
    def busy(self) -> bool:
        return self.command != "idle"

    @property
    def key(self) -> tuple[int, int]:
        """The request it works on: devices on the same one wait for each other in its collectives."""
        return self.epoch, self.request


@dataclass(frozen=True)
class Beat:
    """`progress_age_s`: how long the progress has stood, by the beater's own clock (a duration, so
    clocks are never compared): the watcher dates the last change, not the beat that told of it."""

    device: int
    epoch: int
    progress: Progress = Progress()
    progress_age_s: float = 0.0


@dataclass(frozen=True)
class NewEpoch:
    """The leader opens `epoch`: these `members` under `assignment`, led by `leader`; `lost` left.
    A member admits itself; a device not among the members has been fenced out and stops."""

    epoch: int
    members: tuple[int, ...]
    assignment: Assignment
    leader: int
    lost: tuple[int, ...]


@dataclass(frozen=True)
class Stop:
    """End the device's threads at once (the driver closing the cluster)."""


@dataclass(frozen=True)
class Watch:
    """From the driver to the leader once every device is up: start judging the members' silences
    (before, a device still starting is silent for no fault of its own)."""


@dataclass(frozen=True)
class Declare:
    """Ask the leader to declare `device` dead at once, on `signal` (e.g. "collective": a device saw
    the connection to it close), instead of waiting for its silence."""

    device: int
    signal: str


# --------------------------------------------------------------------------------------------
# Requests (driver -> leader); each is answered by one Reply


@dataclass(frozen=True)
class Step:
    """A forward step on every device of the group (redone after a recovery when one fails)."""

    chunks: tuple[Chunk, ...]
    logits: str = "last"


# The vocabulary a policy and a device setup are written in (the engine's tables are keyed by them;
# plain names here so that a command line can offer them without importing torch).
STRATEGY_NAMES = ("full-recompute", "reuse-replay", "reuse-hidden", "replicate")
DTYPE_NAMES = ("float32", "bfloat16")


@dataclass(frozen=True)
class RecoveryPolicy:
    """How the leader recovers: who takes the lost heads, how the KV is rebuilt, and whether it
    recovers on its own (`hold` False) or stops once the failure is handled as far as inheriting
    weights and waits for the driver's `Recover` (to compare strategies from one state)."""

    reassign: str = "random"
    seed: int = 0
    strategy: str = "full-recompute"
    hold: bool = False
    fence: bool = True  # kill a device declared dead (processes: SIGKILL), as clusters fence a node
    standby_weights: bool = False  # each device reads in advance what it would inherit from a first failure


@dataclass(frozen=True)
class Prepare:
    """After a held failure: plan the reassignment, inherit weights, snapshot the survivors' state."""


@dataclass(frozen=True)
class Recover:
    """After `Prepare`: rebuild with `strategy` (falling back when impossible) from the snapshot."""

    strategy: str


@dataclass(frozen=True)
class Broadcast:
    """Send `command` to every device of the group; answered with {device: its answer}."""

    command: Any


@dataclass(frozen=True)
class SendTo:
    """Send `command` to one device; answered with its answer."""

    device: int
    command: Any


# --------------------------------------------------------------------------------------------
# Answers and notices


@dataclass(frozen=True)
class Reply:
    """The answer to a command or request: a value, or the error it raised (`error` set)."""

    value: Any = None
    error: BaseException | None = None


@dataclass(frozen=True)
class LeaderChanged:
    """The old leader was declared dead; `leader` leads `epoch`. It has recovered (`recovery`), or,
    holding, waits for the driver to recover from `failures`, or its recovery failed (`error`)."""

    leader: int
    epoch: int
    recovery: Any
    failures: tuple = ()
    error: BaseException | None = None


@dataclass(frozen=True)
class Working:
    """The leader to the driver: the commands serving `request` made progress (the driver's wait on
    a request is kept alive by this, never by a beat: a live control thread proves no progress)."""

    request: int


@dataclass(frozen=True)
class Strike:
    """An injected fault fired on `device` at clock time `at` (a measurement hook, not part of recovery)."""

    device: int
    mode: str
    at: float
    signal: str | None = None  # the real signal the fault was (processes: "SIGKILL", "SIGSTOP"); None on threads


@dataclass(frozen=True)
class DeviceExited:
    """A device process ended while the cluster ran (seen by the launcher, which reaps it)."""

    device: int
    exit_code: int
    at: float


@dataclass(frozen=True)
class Telemetry:
    """(time, device, kind, duration) events of one device, for the timeline."""

    events: tuple[tuple[float, int, str, float], ...] = field(default=())



# --------------------------------------------------------------------------------------------
# Many requests in flight: the leader schedules them (request_scheduler.py), the devices step them


@dataclass(frozen=True)
class PoolSpec:
    """The paged pool every device keeps its blocks in. A device that holds no pool of this spec
    makes one anew, empty, for the KV heads it holds (a full recompute); a reuse strategy carries
    the survivors' blocks into it (`RebuildBatch`). A `generation` is the epoch the pool was made
    in, so no two pools share one. With `hidden_states` every block also keeps each layer's input
    at its positions (reuse-hidden); with `replication` each device also keeps a copy of its ring
    predecessor's KV heads of every block, sent every step (replicate): both cost the block bytes."""

    generation: int
    num_blocks: int
    block_size: int
    hidden_states: bool = False
    replication: bool = False


@dataclass(frozen=True)
class PoolInfo:
    """What a device says of its paged pool: its generation, the KV heads it holds, whether it keeps
    the layers' inputs, and whose KV heads its replica copies."""

    generation: int
    kv_heads: tuple[int, ...]
    hidden_states: bool
    replica_of: int | None
    replica_kv_heads: tuple[int, ...]


@dataclass(frozen=True)
class RebuildBatch:
    """After a failure with requests in flight: carry the survivors' blocks into a new pool and
    rebuild the lost KV heads as `order` says (kv_cache_reused.BatchRebuildOrder)."""

    order: Any


@dataclass(frozen=True)
class ReportPagedKV:
    """For checks: answered with {request: {(device, layer, KV head): (K, V)}} for each `spans`
    entry (request -> (block table, positions)), copied."""

    spans: dict


@dataclass(frozen=True)
class BatchKV:
    """From the driver, for checks: every running request's KV on every device, as `ReportPagedKV`."""


@dataclass(frozen=True)
class BatchForward:
    """A step over a ragged batch (request_scheduler.ScheduledChunk each: a request's tokens at its
    positions, in its blocks). The first device of the group answers with the greedy token and its
    margin for each chunk that samples (batched_forward.Greedy), or with `logits` their rows."""

    chunks: tuple
    pool: PoolSpec
    logits: bool = False


@dataclass(frozen=True)
class Submit:
    """A new request for the leader's scheduler; it waits until the KV pool and the budgets admit it."""

    request_id: int
    prompt_ids: tuple[int, ...]
    max_new_tokens: int
    eos_token_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class Cancel:
    """Stop a request, waiting or running (its blocks are freed)."""

    request_id: int


@dataclass(frozen=True)
class ServeStep:
    """One scheduler step: continue every running request, admit what fits, retire what ended.
    `seen`: the steps the driver has been told of; a new leader that took over after the old one
    served a step the driver never heard of answers with that step instead of running another."""

    seen: int = 0


@dataclass(frozen=True)
class ServedStep:
    """A scheduler step as it happened: each request's new token (and its logit margin over the
    runner-up), the requests that ended with it (and why), those preempted to make room or by a
    recovery whose pool holds fewer (they are recomputed later), and the recoveries the leader ran
    to get there."""

    tokens: dict[int, int]
    margins: dict[int, float]
    ended: dict[int, str]
    preempted: tuple[int, ...]
    recoveries: tuple
    assignment: Assignment
    leader: int
    epoch: int
    batch_tokens: int  # tokens the step computed (prefill chunks and decodes)
    waiting: int
    running: int
    step: int  # steps served so far, this one included
    forward_s: float = 0.0  # the devices' work on the step, as the leader timed it (after a recovery: the redo)
    logit_scales: dict[int, float] = field(default_factory=dict)  # each new token's row's largest |logit|


@dataclass(frozen=True)
class LeaderRecord:
    """The leader's record of every request (request_scheduler.Scheduler: waiting ones included),
    its KV pool and the last step it served, sent to its successor after every change and before the
    driver hears of it: a leader's failure loses no request and no step."""

    scheduler: Any
    pool: PoolSpec
    last_served: ServedStep | None
