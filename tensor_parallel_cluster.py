"""A Llama checkpoint split over devices: the Python API for prefill, decode and generation.

    from tensor_parallel_cluster import TensorParallelLlama
    with TensorParallelLlama.load("path/to/Llama-3.2-1B", devices=4) as model:
        tokens = model.generate(model.tokenizer.encode("The capital of France is"), max_new_tokens=8)

This is the driver: it holds no weights and no KV. It starts one device per slice of the model
(each reads only its own slices from the checkpoint; the lowest-numbered one also leads) and talks
to the leader only through messages (device_protocol.py). Failures are the leader's business; the
driver sees a slower step, the recoveries the leader ran, or, when the leader holds, StepFailed.
"""
from __future__ import annotations

import ctypes
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from cluster_leader import Recovery, StepFailed, StepResult
from device_actor import DTYPES, DeviceActor, DeviceSetup, Ready
from device_protocol import (DRIVER, Address, BatchKV, Broadcast, Cancel, Chunk, Describe, DeviceExited, DeviceInfo,
                             Envelope, LeaderChanged, RecoveryPolicy, Reply, ReportKV, ServedStep, ServeStep, Step,
                             Stop, Strike, Submit, Telemetry, Watch, Working)
from device_network import POLL_S, WaitStalled
from device_threads import CODECS, ThreadTransport, raise_if_interrupted
from head_assignment import Assignment, even_assignment
from heartbeat_detection import HeartbeatConfig
from llama_model_loader import Checkpoint, CheckpointLocation, Tokenizer, load_tokenizer, resolve_checkpoint
from lossless_checks import KVSnapshot
from process_collective import collective_timeout_s
from process_launcher import Rendezvous, driver_launcher
from request_scheduler import SchedulerConfig
from synthetic_checkpoint import ensure_synthetic_checkpoint

# "threads" (the default); "processes" (one OS process per device, torch.distributed collectives);
# "serialising" (threads, with every message and payload as bytes: a test of the boundary)
BACKENDS = ("threads", "processes", "serialising")
SEQUENCE = 0  # the one sequence the devices serve for now


class ClusterClosed(RuntimeError):
    """A request was in flight when the cluster was closed: it has no answer."""


@dataclass(frozen=True)
class LoadReport:
    """How the model was loaded, for the report."""

    location: CheckpointLocation
    folder: Path
    tensor_count: int
    stored_bytes: int
    stored_dtype: str
    seconds: float


def open_checkpoint(model_dir: str | Path | None = None, log=print) -> tuple[CheckpointLocation, Checkpoint, float]:
    """Resolve and check the checkpoint (headers only; no weights read yet) and time the opening. Writing
    the synthetic checkpoint on first use is not loading it: it is logged, and left out of the time."""
    location = resolve_checkpoint(model_dir)
    folder = location.path or ensure_synthetic_checkpoint("llama-3.2-1b", log=log)
    started = time.perf_counter()
    return location, Checkpoint(folder), time.perf_counter() - started


class TensorParallelLlama:
    """A model split by heads over devices, with greedy generation; failures are recovered by the leader."""

    def __init__(self, checkpoint: Checkpoint, assignment: Assignment, dtype: torch.dtype = torch.float32,
                 progress: bool = False, heartbeat: HeartbeatConfig = HeartbeatConfig(),
                 policy: RecoveryPolicy = RecoveryPolicy(), backend: str = "threads",
                 rendezvous: Rendezvous | None = None, accelerator: str = "cpu",
                 scheduling: SchedulerConfig = SchedulerConfig()):
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r} (choose from {', '.join(BACKENDS)})")
        if accelerator not in ("cpu", "cuda") or (accelerator == "cuda" and backend != "processes"):
            raise ValueError(f"accelerator {accelerator!r}: choose cpu, or cuda with backend='processes' "
                             f"(one GPU per device process)")
        self.checkpoint, self.config, self.dtype = checkpoint, checkpoint.config, dtype
        self.assignment, self.heartbeat, self.policy = assignment, heartbeat, policy
        self.backend, self.accelerator = backend, accelerator
        self.leader, self.epoch = min(assignment.devices), 0
        self.cached_ids: list[int] = []  # the tokens whose KV the devices hold, in order
        self.recoveries: list[Recovery] = []
        self.resumed_steps: list[tuple[int, int]] = []  # (position, layer) of each abandoned step resumed
        self.failures: list = []  # every failure the driver was told of (cluster_leader.FailureEvent), in order
        self.events: list[tuple[float, int, str, float]] = []  # telemetry: (time, device, kind, duration)
        self.strikes: list[Strike] = []
        self.tokenizer: Tokenizer | None = None
        self.load_report: LoadReport | None = None
        self._requests = 0
        self._devices = assignment.devices  # every device started (for stopping them all)
        self._closed = False
        self._progress = progress
        dtype_name = next(name for name, value in DTYPES.items() if value == dtype)
        setups = [DeviceSetup(d, checkpoint.folder, dtype_name, assignment, heartbeat, policy, accelerator, scheduling)
                  for d in assignment.devices]
        self._submitted = self._steps_seen = 0  # requests submitted (their ids), scheduler steps heard of
        if backend == "processes":  # made first: a launch that cannot start has nothing to close
            self.transport = driver_launcher(rendezvous or Rendezvous.from_environment(),
                                             collective_timeout_s(heartbeat.timeout_s))
        else:
            self.transport = ThreadTransport(CODECS[backend], wait_limit_s=heartbeat.call_limit_s)
        try:
            if backend == "processes":
                self.transport.launch(setups, _bytes_per_device(checkpoint, dtype, len(setups)))
            else:
                for setup in setups:
                    DeviceActor(setup, self.transport).start()
            self._await_ready()
            self.transport.send(Address("control", self.leader), Envelope(DRIVER, self.epoch, 0, Watch()))
        except BaseException:
            self.close()
            raise

    @classmethod
    def load(cls, model_dir: str | Path | None = None, devices: int = 4, dtype: torch.dtype = torch.float32,
             progress: bool = False, log=print, **options) -> "TensorParallelLlama":
        """Find the checkpoint (argument, $LLAMA_CHECKPOINT, HF cache, else synthetic) and split it
        evenly over `devices`. `options` go to the constructor (heartbeat, policy, backend, rendezvous,
        accelerator, scheduling)."""
        location, checkpoint, seconds = open_checkpoint(model_dir, log)
        assignment = even_assignment(checkpoint.config, devices)
        return cls.from_checkpoint(location, checkpoint, assignment, dtype, progress, seconds, **options)

    @classmethod
    def from_checkpoint(cls, location: CheckpointLocation, checkpoint: Checkpoint, assignment: Assignment,
                        dtype: torch.dtype, progress: bool = False, seconds_so_far: float = 0.0,
                        **options) -> "TensorParallelLlama":
        """Split an opened checkpoint; the load report covers opening and splitting."""
        started = time.perf_counter()
        tokenizer = load_tokenizer(checkpoint.folder, checkpoint.config)
        model = cls(checkpoint, assignment, dtype, progress, **options)
        model.tokenizer = tokenizer
        model.load_report = LoadReport(location, checkpoint.folder, checkpoint.tensor_count, checkpoint.total_bytes,
                                       checkpoint.stored_dtype, seconds_so_far + time.perf_counter() - started)
        return model

    def _await_ready(self) -> None:
        """Every device has loaded its slices (or one could not: its error is raised)."""
        waiting, limit = set(self.assignment.devices), max(600.0, self.heartbeat.wait_limit_s)
        with _progress_bar(len(waiting) * self.config.num_hidden_layers, self._progress) as bar:
            while waiting:
                envelope = self._next_message(time.monotonic() + limit, lambda: (
                    f"the driver waited {limit:.1f} s for Device-{', Device-'.join(map(str, sorted(waiting)))} "
                    f"to load its slices: no word"))
                if isinstance(envelope.body, Ready):
                    if envelope.body.error is not None:
                        raise envelope.body.error
                    waiting.discard(envelope.body.device)
                elif isinstance(envelope.body, Telemetry):
                    bar.update(sum(1 for event in envelope.body.events if event[2] == "loaded layer"))
                elif isinstance(envelope.body, DeviceExited):
                    raise RuntimeError(f"Device-{envelope.body.device}'s process exited (code "
                                       f"{envelope.body.exit_code}) before it had loaded its slices")

    # ---------------------------------------------------------------------------------------
    # Running

    @property
    def position(self) -> int:
        """Tokens cached on every device (a step abandoned mid-way does not count)."""
        return len(self.cached_ids)

    def forward(self, token_ids: Sequence[int] | torch.Tensor, start: int | None = None,
                logits: str = "last") -> torch.Tensor | None:
        """Logits for `token_ids` placed after the first `start` cached tokens (default: all of them)."""
        ids = tuple(torch.as_tensor(token_ids, dtype=torch.long).reshape(-1).tolist())
        start = self.position if start is None else start
        self._check_length(start + len(ids))
        self.cached_ids = self.cached_ids[:start]  # overwritten by this step, whether it finishes or not
        result: StepResult = self.request(Step((Chunk(SEQUENCE, ids, start),), logits))
        self.cached_ids += list(ids)
        self.recoveries += result.recoveries
        self.assignment = result.assignment
        if result.resumed_from is not None:
            self.resumed_steps.append((start, result.resumed_from))
        return None if result.logits is None else result.logits.float()

    def prefill(self, token_ids: Sequence[int], all_logits: bool = False) -> torch.Tensor:
        """Forget the cache and run the prompt; logits of the last token (or of every token)."""
        return self.forward(token_ids, start=0, logits="all" if all_logits else "last")

    def decode(self, token_id: int) -> torch.Tensor:
        return self.forward([token_id])

    def generate(self, prompt_ids: Sequence[int], max_new_tokens: int, stop_at_eos: bool = False,
                 after_token: Callable[[list[int]], object] = lambda tokens: None) -> list[int]:
        """Greedy continuation of the prompt (the new tokens only).

        `after_token(tokens)` is called after each new token, before it is fed back: the point
        where a run can be observed (a KV snapshot) or interrupted.
        """
        logits = self.prefill(prompt_ids)
        new_tokens: list[int] = []
        while len(new_tokens) < max_new_tokens:
            new_tokens.append(int(logits.argmax()))
            after_token(new_tokens)
            if stop_at_eos and new_tokens[-1] in self.config.eos_token_ids:
                break
            if len(new_tokens) < max_new_tokens:
                logits = self.decode(new_tokens[-1])
        return new_tokens

    # ---------------------------------------------------------------------------------------
    # Many requests in flight: the leader schedules them; their tokens stream back step by step

    def submit(self, prompt_ids: Sequence[int], max_new_tokens: int, stop_at_eos: bool = False) -> int:
        """Queue a request with the leader's scheduler; its id (its tokens come back from `step`)."""
        self._check_length(len(prompt_ids) + max_new_tokens)
        self._submitted += 1
        eos = tuple(self.config.eos_token_ids) if stop_at_eos else ()
        self.request(Submit(self._submitted, tuple(int(t) for t in prompt_ids), max_new_tokens, eos))
        return self._submitted

    def step(self) -> ServedStep:
        """One scheduler step: every running request's next token, what ended, what was preempted."""
        served: ServedStep = self.request(ServeStep(self._steps_seen))
        self._steps_seen = served.step
        self.recoveries += served.recoveries
        self.assignment = served.assignment
        return served

    def cancel(self, request_id: int) -> bool:
        """Stop a request wherever it is; False if it had already ended."""
        return self.request(Cancel(request_id))

    def generate_batch(self, prompts: Sequence[Sequence[int]], max_new_tokens: int | Sequence[int],
                       stop_at_eos: bool = False,
                       after_step: Callable[[ServedStep], object] = lambda served: None) -> list[list[int]]:
        """Greedy continuations of every prompt, served together (the new tokens of each, in order).
        `after_step(served)` is called after each step: where a run can be observed or interrupted."""
        counts = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
        if len(counts) != len(prompts):
            raise ValueError(f"{len(counts)} output lengths for {len(prompts)} prompts")
        ids = [self.submit(prompt, count, stop_at_eos) for prompt, count in zip(prompts, counts)]
        outputs: dict[int, list[int]] = {request_id: [] for request_id in ids}
        open_requests = set(ids)
        while open_requests:
            served = self.step()
            if not served.batch_tokens:
                raise RuntimeError(f"requests {sorted(open_requests)} are open but nothing could be scheduled "
                                   f"({served.waiting} waiting, {served.running} running)")
            for request_id, token in served.tokens.items():
                outputs[request_id].append(token)
            open_requests -= set(served.ended)
            after_step(served)
        return [outputs[request_id] for request_id in ids]

    # ---------------------------------------------------------------------------------------
    # Asking the devices (their tensors stay theirs: each sends what is asked)

    def kv_snapshot(self) -> KVSnapshot:
        """Every (device, layer, KV head) the devices hold, copied (each device sends its own)."""
        snapshot: KVSnapshot = {}
        for part in self.request(Broadcast(ReportKV())).values():
            snapshot.update(part)
        return snapshot

    def batch_kv_snapshot(self) -> dict[int, KVSnapshot]:
        """Every running request's KV on every device, copied: request -> (device, layer, KV head) ->
        (K, V), each [the positions it has computed, head_dim]."""
        return self.request(BatchKV())

    def describe(self) -> dict[int, DeviceInfo]:
        """What each device holds, as it says."""
        return self.request(Broadcast(Describe()))

    def _check_length(self, length: int) -> None:
        if length > self.config.max_position_embeddings:
            raise ValueError(f"{length} positions exceed the model's {self.config.max_position_embeddings}")

    # ---------------------------------------------------------------------------------------
    # Messages

    def request(self, body: Any) -> Any:
        """Send a request to the leader and wait for its answer (following the leadership if the
        leader dies meanwhile), and Ctrl-C is acted on here. The wait lasts while the request makes
        progress (`Working`, from its leader or from a new one recovering); without any for twice the
        wait limit (the leader's own waits end within one), it ends (WaitStalled)."""
        self._requests += 1
        request, limit = self._requests, 2 * self.heartbeat.wait_limit_s
        self.transport.send(Address("leader", self.leader), Envelope(DRIVER, self.epoch, request, body))
        deadline = time.monotonic() + limit
        while True:
            envelope = self._next_message(deadline, lambda: (
                f"the driver waited {limit:.1f} s for its request {type(body).__name__} to the leader, "
                f"Device-{self.leader}: no progress on it"))
            message = envelope.body
            if self._progressed(envelope, request):
                deadline = time.monotonic() + limit
            if isinstance(message, LeaderChanged) and message.epoch > self.epoch:
                self.leader, self.epoch = message.leader, message.epoch
                if message.recovery is not None:
                    self.recoveries.append(message.recovery)
                if message.error is not None:  # the new leader's recovery failed
                    raise message.error
                if message.failures:  # the new leader holds: the driver decides the recovery
                    raise StepFailed(message.failures)
                self._requests += 1
                request = self._requests
                self.transport.send(Address("leader", self.leader), Envelope(DRIVER, self.epoch, request, body))
            elif isinstance(message, Reply) and envelope.request == request:
                if message.error is not None:
                    raise message.error
                return message.value

    def _progressed(self, envelope: Envelope, request: int) -> bool:
        """Does the message show progress on `request`: work on it, a new leader, or a new leader's
        recovery (another device, in a newer epoch: it does not know the request yet)?"""
        message = envelope.body
        if isinstance(message, LeaderChanged):
            return True
        taking_over = envelope.sender != self.leader and envelope.epoch > self.epoch
        return isinstance(message, Working) and (message.request == request or taking_over)

    def _next_message(self, deadline: float, stalled: Callable[[], str]) -> Envelope:
        """The driver's next message, recording notices (telemetry, strikes) on the way; after the
        `deadline`, WaitStalled with the message `stalled()` says, once what has come is read (a message
        already queued may be the progress that keeps the wait going; a stream of notices may not)."""
        while True:
            raise_if_interrupted()
            if self._closed:
                raise ClusterClosed("the cluster was closed while a request waited for the leader")
            late = time.monotonic() > deadline
            envelope = self.transport.receive(Address("driver", DRIVER), 0 if late else POLL_S)
            if envelope is not None:
                self._record(envelope.body)
                return envelope
            if late:
                raise WaitStalled(stalled())

    def _record(self, notice: Any) -> None:
        if isinstance(notice, Telemetry):
            self.events.extend(notice.events)
        elif isinstance(notice, Strike):
            self.strikes.append(notice)
            kind = {"slow": "stalled", "wedge": "wedged"}.get(notice.mode, "died")
            self.events.append((notice.at, notice.device, kind, 0.0))
        elif isinstance(notice, DeviceExited):
            self.events.append((notice.at, notice.device, "process exited", 0.0))

    # ---------------------------------------------------------------------------------------
    # Lifetime

    def close(self) -> None:
        """Stop every device (idempotent): hung devices are continued, and every device gets a Stop on
        its control inbox, which it obeys at once, whatever it is doing (as a process obeys SIGTERM)."""
        if self._closed:
            return
        self._closed = True
        self.transport.release_hung()
        for device in self._devices:
            self.transport.send(Address("control", device), Envelope(DRIVER, self.epoch, 0, Stop()))
        left = self.transport.join(timeout_s=60.0)
        if left:
            raise RuntimeError(f"device threads still running after close: {', '.join(left)}")
        _give_back_freed_memory()
        if self.transport.crashed:
            name, error = self.transport.crashed[0]
            raise RuntimeError(f"{name} ended with an unexpected error: {error!r}") from error

    def __enter__(self) -> "TensorParallelLlama":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _give_back_freed_memory() -> None:
    """glibc keeps the heap pages freed by the stopped devices for reuse; hand them back to the
    system, so that a model loaded next in the same process (a benchmark's next run) does not stack
    its gigabytes on the last one's: without this, fragments of each load's heap stay resident."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to hand back this way
        return
    trim(0)


def _bytes_per_device(checkpoint: Checkpoint, dtype: torch.dtype, devices: int) -> int:
    """What one device's slices take in the compute dtype (the checkpoint over the devices)."""
    elements = sum(math.prod(shape) for shape in checkpoint.shapes.values())
    return elements * dtype.itemsize // devices


def _progress_bar(total: int, enabled: bool):
    from tqdm import tqdm
    return tqdm(total=total, desc="loading weight slices", unit="layer-slice", leave=False, disable=not enabled)
