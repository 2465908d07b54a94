"""The driver's side of failures: inject them, watch the leader recover, or drive the recovery.

`FaultTolerantLlama` is `TensorParallelLlama` with what a study of failures needs: arming a fault on
a device (fault_injection.py), continuing a hung one, declaring a death on another signal than
silence, switching on what the strategies need kept, and, when the leader holds
(`RecoveryPolicy(hold=True)`), preparing and running recoveries itself (several strategies from one
post-failure state, as the comparison does). Every call is a message to the leader.
"""
from __future__ import annotations

import multiprocessing
import time
from typing import Callable, Sequence

from cluster_leader import FailureEvent, PostFailure, Recovery, StepFailed
from device_protocol import (DRIVER, Address, Arm, Broadcast, CorruptKV, Declare, Envelope, Keep, Prepare, Recover,
                             Restore, SendTo, TimeHiddenRebuild)
from fault_injection import FailurePlan
from tensor_parallel_cluster import TensorParallelLlama


class FaultTolerantLlama(TensorParallelLlama):
    """TensorParallelLlama plus fault injection, what recovery needs kept, and driver-led recovery."""

    keeping = (False, False)  # (hidden states, KV replication)

    # ---------------------------------------------------------------------------------------
    # Faults

    def arm(self, plan: FailurePlan) -> None:
        """The device will fail at the given collective call of its next step (or its next recovery work)."""
        if plan.device not in self.assignment.devices:
            raise ValueError(f"Device-{plan.device} is not a live device")
        self.request(SendTo(plan.device, Arm(plan)))

    def release_hung(self) -> None:
        """Continue every hung device (as SIGCONT does): it resumes its stale step, which the fencing refuses."""
        self.transport.release_hung()

    def declare_dead(self, device: int, signal: str) -> None:
        """Tell the leader that `device` is dead, as a device whose collective saw its peer's connection
        close would; the leader declares it at once instead of waiting for its silence."""
        self.transport.send(Address("control", self.leader), Envelope(DRIVER, self.epoch, 0, Declare(device, signal)))

    def corrupt_kv(self, device: int, delta: float) -> None:
        """Memory corruption on one device: every cached K and V entry moves by `delta`."""
        self.request(SendTo(device, CorruptKV(delta)))

    def failed_at(self, event: FailureEvent) -> float:
        """When the failure behind `event` struck (the injected fault's time; else the last beat seen)."""
        struck = [s.at for s in self.strikes if s.device == event.device and s.at <= event.detection.declared_at]
        return max(struck, default=event.detection.last_beat_at)

    def fault_signal(self, event: FailureEvent) -> str | None:
        """The real signal the fault behind `event` was (SIGKILL, SIGSTOP), or None where it was simulated."""
        return next((s.signal for s in self.strikes if s.device == event.device), None)

    def detection_latency_s(self, event: FailureEvent) -> float:
        return event.detection.declared_at - self.failed_at(event)

    # ---------------------------------------------------------------------------------------
    # What recovery needs kept

    def keep(self, hidden_states: bool, replication: bool) -> None:
        """What every device keeps in normal running (hidden states from the next step on; switched on,
        replication first sends what is already cached)."""
        self.request(Broadcast(Keep(hidden_states, replication)))
        self.keeping = (hidden_states, replication)

    def enable_hidden_states(self) -> None:
        self.keep(True, self.keeping[1])

    def enable_replication(self) -> None:
        self.keep(self.keeping[0], True)

    # ---------------------------------------------------------------------------------------
    # Recovery led by the driver (when the leader holds)

    def recover(self, strategy: str) -> Recovery:
        """Handle the held failure: plan, inherit weights, rebuild with `strategy` (or a fallback). If
        the leader itself dies meanwhile, its successor holds the failures so far: recover again."""
        while True:
            try:
                self.prepare_recovery()
                recovery = self.rebuild(strategy)
            except StepFailed as failure:
                self.note_failures(failure.events)
                continue
            self.recoveries.append(recovery)
            self.note_failures(recovery.events)
            return recovery

    def note_failures(self, events: Sequence[FailureEvent]) -> None:
        """Record the failures the driver was told of, each once (a retried recovery repeats them)."""
        self.failures += [e for e in events if e not in self.failures]

    def prepare_recovery(self) -> PostFailure:
        """Plan where the dead devices' work goes, inherit the weight slices, snapshot the survivors."""
        post: PostFailure = self.request(Prepare())
        self.assignment = post.assignment
        self.cached_ids = list(post.context_ids)
        return post

    def rebuild(self, strategy: str) -> Recovery:
        """Rebuild the KV cache from the prepared post-failure state (each call starts from it again)."""
        recovery: Recovery = self.request(Recover(strategy))
        self.assignment = recovery.plans[-1].after if recovery.plans else self.assignment
        self.cached_ids = self.cached_ids[:recovery.context_tokens]
        return recovery

    def restore_post_failure(self) -> None:
        """Every survivor back to the prepared post-failure state (the KV not yet rebuilt)."""
        self.request(Broadcast(Restore()))

    def time_hidden_rebuild(self, device: int, inherited_only: bool) -> float:
        """The seed's device-level comparison on `device`: seconds to project from the stored inputs
        every KV head it holds, or only those it inherited."""
        return self.request(SendTo(device, TimeHiddenRebuild(inherited_only)))


def generate_with_failures(model: FaultTolerantLlama, prompt_ids: Sequence[int], max_new_tokens: int,
                           failures: Sequence[FailurePlan],
                           recover: Callable[[FaultTolerantLlama, StepFailed], object] | None = None) -> list[int]:
    """Greedy generation in which the planned failures strike. The leader recovers on its own, or,
    when it holds, `recover(model, failure)` does (e.g. `model.recover(strategy)`); the abandoned
    step is then redone."""
    pending = list(failures)
    tokens: list[int] = []
    while len(tokens) < max_new_tokens:
        for plan in [p for p in pending if p.after_tokens == len(tokens)]:
            model.arm(plan)
            pending.remove(plan)
        try:
            logits = model.prefill(prompt_ids) if not tokens else model.decode(tokens[-1])
        except StepFailed as failure:
            model.note_failures(failure.events)
            (recover or _recover_with_the_policys_strategy)(model, failure)
            continue
        tokens.append(int(logits.argmax()))
    return tokens


def _recover_with_the_policys_strategy(model: FaultTolerantLlama, failure: StepFailed) -> None:
    model.recover(model.policy.strategy)


def prefill_under_load(model: FaultTolerantLlama, ids: Sequence[int], seconds: float, burners: int = 2
                       ) -> tuple[int, int]:
    """Prefill `ids` again and again while `burners` extra processes keep cores busy for `seconds`
    (a loaded machine, for a detector's false alarms): (devices declared dead, each a false alarm
    since nothing failed; prefills done). The model must hold (`RecoveryPolicy(hold=True)`)."""
    load = [multiprocessing.get_context("spawn").Process(target=burn, args=(seconds,)) for _ in range(burners)]
    for process in load:
        process.start()
    prefills = 0
    try:
        while any(process.is_alive() for process in load):
            try:
                model.prefill(ids)
            except StepFailed as failure:
                return len(failure.events), prefills
            prefills += 1
    finally:
        for process in load:
            process.join()
    return 0, prefills


def burn(seconds: float) -> None:
    """Keep one core busy."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        pass
