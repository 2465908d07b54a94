"""Time every recovery strategy from the same post-failure state, count its FLOPs, prove it lossless.

Strategies run alternately, each from its own copy of the state, several times; the report gives
min / median / max seconds and ratios of medians against full recompute, beside the FLOP ratio
counted from shapes. Every strategy's KV is checked head by head against a failure-free run
(lossless_checks.py), and its continuation must produce the failure-free run's tokens with the
same logits.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from device_threads import run_on_devices
from fault_tolerant_cluster import FaultTolerantLlama, PostFailureState, Survivor
from head_assignment import Assignment
from kv_cache_reused import RecoveryImpossible, RecoveryStrategy, make_recovery, rebuild_from_hidden_states
from llama_model_loader import LlamaConfig
from lossless_checks import (LOGITS_TOLERANCE, KVCheck, KVSnapshot, check_kv, kept_heads, logits_rel_diff,
                             near_ties)
from tensor_parallel_cluster import TensorParallelLlama
from tensor_parallel_model import DeviceState


@dataclass(frozen=True)
class Timing:
    seconds: tuple[float, ...]

    @property
    def min(self) -> float:
        return min(self.seconds)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def max(self) -> float:
        return max(self.seconds)


@dataclass
class StrategyOutcome:
    """One strategy's measured recovery, its cost model, and the proof that it is lossless."""

    name: str
    keeps: str
    timing: Timing | None
    flops: float
    reuse_rate: float            # share of the KV entries needed after recovery that were kept
    kept_bytes: int              # state kept during normal running for this strategy (all survivors)
    kv: KVCheck | None = None    # the per-head check of its KV against the failure-free run
    logits_max_rel_diff: float = float("nan")  # worst step after recovery, relative to the logits' scale
    logits_tolerance: float = float("nan")
    continuation: list[int] = field(default_factory=list)  # the greedy token of each step after the failure
    tokens_identical: bool = False
    near_tie_mismatches: tuple[int, ...] = ()  # set when every differing step is a near-tie of the failure-free run
    redo_s: float = float("nan")  # the abandoned step, redone on the recovered state
    error: str | None = None     # why it could not run, if it could not

    @property
    def logits_ok(self) -> bool:
        return self.logits_max_rel_diff <= self.logits_tolerance

    @property
    def tokens_ok(self) -> bool:
        """Every token identical, or different only at near-ties (which rounding may flip)."""
        return self.tokens_identical or bool(self.near_tie_mismatches)

    @property
    def lossless(self) -> bool:
        return self.error is None and self.kv is not None and self.kv.ok and self.logits_ok and self.tokens_ok

    def verdict(self) -> str:
        """What failed, in words, or 'lossless'."""
        if self.error is not None:
            return f"could not run: {self.error}"
        problems = [] if self.kv.ok else [self.kv.describe()]
        if not self.logits_ok:
            problems.append(f"logits off by {self.logits_max_rel_diff:.3g} of their scale "
                            f"(bound {self.logits_tolerance:.3g})")
        if not self.tokens_ok:
            problems.append("the tokens after the recovery differ from the failure-free run's")
        return "; ".join(problems) or "lossless"


@dataclass(frozen=True)
class DeviceLevelComparison:
    """The seed's comparison on the new owner, both from the stored layer inputs: rebuild every KV
    head it now holds (as if it had kept nothing), or only the KV heads it inherited (keeping its own)."""

    device: int
    all_query_heads: int
    inherited_query_heads: int
    all_kv_heads: int
    inherited_kv_heads: int
    rebuild_all: Timing
    rebuild_inherited: Timing

    @property
    def speedup(self) -> float:
        return self.rebuild_all.median / self.rebuild_inherited.median


# --------------------------------------------------------------------------------------------
# Snapshots for checking (the leader never needs these to recover)


def snapshot_states(states: dict[int, DeviceState]) -> KVSnapshot:
    """Every (device, layer, KV head) the states hold, copied."""
    return {(device, layer, g): tuple(t.clone() for t in state.cache.head(layer, g))
            for device, state in states.items()
            for layer in range(state.cache.num_layers) for g in state.cache.kv_heads}


def snapshot_kv(model: TensorParallelLlama) -> KVSnapshot:
    """Every (device, layer, KV head) of the cluster, copied: the failure-free reference."""
    return snapshot_states({d: w.state for d, w in model.workers.items()})


@dataclass
class FailureFreeRun:
    """A generation without failure, for checking: its tokens, the logits of every step, the KV when
    the failure would strike, and how long the prefill took."""

    tokens: list[int]
    logits: list[torch.Tensor]
    kv: KVSnapshot
    prefill_s: float


def failure_free_run(model: TensorParallelLlama, prompt_ids: Sequence[int], new_tokens: int,
                     failure_after: int) -> FailureFreeRun:
    """A run without failure; its KV is snapshotted once `failure_after` tokens are out."""
    started = time.perf_counter()
    logits = [model.prefill(prompt_ids)]
    prefill_s = time.perf_counter() - started
    tokens, kv = [int(logits[0].argmax())], None
    while True:
        if len(tokens) == failure_after:
            kv = snapshot_kv(model)
        if len(tokens) == new_tokens:
            return FailureFreeRun(tokens, logits, kv, prefill_s)
        logits.append(model.decode(tokens[-1]))
        tokens.append(int(logits[-1].argmax()))


# --------------------------------------------------------------------------------------------
# FLOPs from shapes


def forward_flops(config: LlamaConfig, assignment: Assignment, length: int) -> float:
    """A prefill of `length` tokens on an assignment, logits excluded (duplicated KV heads count twice)."""
    H, hd, L = config.hidden_size, config.head_dim, length
    total = 0.0
    for d in assignment.devices:
        nq, nkv, m = len(assignment.heads[d]), len(assignment.kv_heads(d)), assignment.mlp_width(d)
        projections = 2 * L * H * (nq + 2 * nkv) * hd + 2 * L * nq * hd * H
        attention = 2 * 2 * (L * (L + 1) / 2) * hd * nq  # QK^T and PV over the causal half
        mlp = 2 * L * H * 2 * m + 2 * L * m * H
        total += projections + attention + mlp
    return total * config.num_hidden_layers


def kv_projection_flops(config: LlamaConfig, length: int, kv_heads: int) -> float:
    """K and V projections of `kv_heads` heads over `length` tokens, every layer."""
    return 2 * length * config.hidden_size * 2 * config.head_dim * kv_heads * config.num_hidden_layers


def recovery_flops(name: str, config: LlamaConfig, post: PostFailureState) -> float:
    """Arithmetic each strategy does to rebuild the cache (replication only copies)."""
    L = post.context_ids.numel()
    missing = sum(len(s.missing_kv_heads) for s in post.survivors.values())
    kept = sum(len(s.shard.kv_heads) for s in post.survivors.values()) - missing
    full = forward_flops(config, post.plan.after, L)
    return {"full-recompute": full,
            "reuse-replay": full - kv_projection_flops(config, L, kept),
            "reuse-hidden": kv_projection_flops(config, L, missing),
            "replicate": 0.0}[name]


def reuse_rate(name: str, post: PostFailureState) -> float:
    """Share of the (device, KV head) caches needed after recovery that were kept, not rebuilt."""
    needed = sum(len(s.shard.kv_heads) for s in post.survivors.values())
    kept = sum(len(s.shard.kv_heads) - len(s.missing_kv_heads) for s in post.survivors.values())
    return 0.0 if name == "full-recompute" else kept / needed


def kept_bytes(strategy: RecoveryStrategy, post: PostFailureState) -> int:
    """Memory the strategy needs kept during normal running, summed over the survivors."""
    if strategy.keeps == "hidden states":
        return sum(s.hidden_states.nbytes for s in post.survivors.values() if s.hidden_states is not None)
    if strategy.keeps == "KV replica":
        return sum(r.nbytes for s in post.survivors.values() for r in s.replicas.values())
    return 0


# --------------------------------------------------------------------------------------------
# Timing and checking


def time_strategies(model: FaultTolerantLlama, post: PostFailureState, strategies: Sequence[RecoveryStrategy],
                    repeats: int) -> tuple[dict[str, Timing], dict[str, dict[int, DeviceState]], dict[str, str]]:
    """Run every strategy `repeats` times, alternating (order rotated each round), each on a fresh copy.

    Returns timings, the last recovered states of each strategy, and the errors of those that
    could not run. Each run is logged on every survivor as a 'rebuild KV: <strategy>' span.
    """
    seconds: dict[str, list[float]] = {s.name: [] for s in strategies}
    states: dict[str, dict[int, DeviceState]] = {}
    errors: dict[str, str] = {}
    for round_index in range(repeats):
        order = list(strategies[round_index % len(strategies):]) + list(strategies[:round_index % len(strategies)])
        for strategy in order:
            if strategy.name in errors:
                continue
            copy = post.copy()
            began = model.clock()
            started = time.perf_counter()
            try:
                states[strategy.name] = strategy.recover(model, copy)
            except RecoveryImpossible as reason:
                errors[strategy.name] = str(reason)
                continue
            seconds[strategy.name].append(time.perf_counter() - started)
            for device in copy.survivors:
                model.log.span(device, f"rebuild KV: {strategy.name}", began)
    timings = {name: Timing(tuple(s)) for name, s in seconds.items() if s}
    return timings, states, errors


def continue_generation(model: FaultTolerantLlama, last_token: int, reference_next: Sequence[int]
                        ) -> tuple[list[int], list[torch.Tensor], float]:
    """The steps after the failure point, each fed the failure-free run's token (`last_token`, the
    step the failure abandoned, then `reference_next`), so that every step's logits compare with
    the failure-free run's: the greedy token of each step, its logits, and the seconds of the
    first step (the abandoned step, redone). Where every greedy token equals the failure-free
    one, these are exactly the tokens free-running generation gives."""
    inputs = [last_token, *reference_next[:-1]]
    started = time.perf_counter()
    logits = [model.decode(inputs[0])]
    redo_s = time.perf_counter() - started
    logits += [model.decode(token) for token in inputs[1:]]
    return [int(step.argmax()) for step in logits], logits, redo_s


def compare_recoveries(model: FaultTolerantLlama, post: PostFailureState, strategy_names: Sequence[str],
                       repeats: int, reference: FailureFreeRun, fail_after: int, last_token: int
                       ) -> list[StrategyOutcome]:
    """Time, cost and check every strategy; the model is left with the last checked strategy's state."""
    strategies = [make_recovery(n) for n in strategy_names]
    kept = {s.name: kept_bytes(s, post) for s in strategies}  # before any continuation grows the stores
    timings, states, errors = time_strategies(model, post, strategies, repeats)
    survivor_heads = {d: s.cache.kv_heads for d, s in post.survivors.items()}
    outcomes = []
    for strategy in strategies:
        outcome = StrategyOutcome(strategy.name, strategy.keeps, timings.get(strategy.name),
                                  recovery_flops(strategy.name, model.config, post), reuse_rate(strategy.name, post),
                                  kept[strategy.name], error=errors.get(strategy.name))
        if outcome.error is None:
            outcome.kv = check_kv(snapshot_states(states[strategy.name]), reference.kv,
                                  kept_heads(survivor_heads, strategy.reuses_kv), model.dtype)
            model.adopt(states[strategy.name], post.context_ids)
            want = reference.tokens[fail_after:]
            tokens, logits, outcome.redo_s = continue_generation(model, last_token, want)
            outcome.continuation = tokens
            outcome.tokens_identical = tokens == want
            outcome.logits_max_rel_diff = logits_rel_diff(logits, reference.logits[fail_after:])
            outcome.logits_tolerance = LOGITS_TOLERANCE[model.dtype]
            ties = near_ties(reference.logits[fail_after:], outcome.logits_tolerance)
            differ = [step for step, (got, expected) in enumerate(zip(tokens, want)) if got != expected]
            if differ and all(step in ties for step in differ):
                outcome.near_tie_mismatches = tuple(differ)
        outcomes.append(outcome)
    return outcomes


def compare_device_level(model: FaultTolerantLlama, post: PostFailureState, repeats: int
                         ) -> DeviceLevelComparison | None:
    """On the receiver that inherited most: rebuild every KV head it holds, or only the inherited.

    Each run waits on the device as a step does: it ends if the device is declared dead."""
    receivers = [d for d in post.plan.moved_heads if post.survivors[d].missing_kv_heads]
    if not receivers or any(s.hidden_states is None for s in post.survivors.values()):
        return None
    device = max(receivers, key=lambda d: (len(post.plan.moved_heads[d]), -d))
    survivor = post.survivors[device]
    nothing_kept = Survivor(survivor.shard, survivor.cache.regrouped(()), survivor.hidden_states, {})
    worker = model.workers[device]

    def timed(rebuild_from: Survivor) -> float:
        started = time.perf_counter()
        run_on_devices([worker], lambda w: rebuild_from_hidden_states(model, rebuild_from),
                       model.new_collective((device,)))
        return time.perf_counter() - started

    all_times, inherited_times = [], []
    for _ in range(repeats):
        all_times.append(timed(nothing_kept))
        inherited_times.append(timed(survivor))
    return DeviceLevelComparison(device, len(survivor.shard.query_heads), len(post.plan.moved_heads[device]),
                                 len(survivor.shard.kv_heads), len(survivor.missing_kv_heads),
                                 Timing(tuple(all_times)), Timing(tuple(inherited_times)))


@dataclass(frozen=True)
class KeepingCost:
    """What keeping state costs in normal running, per mode ('nothing kept', 'hidden states',
    'KV replica'): a prefill of the whole context and a decode step, timed alternately, warm."""

    prefill: dict[str, Timing]
    decode: dict[str, Timing]


def measure_keeping_cost(model: FaultTolerantLlama, decode_repeats: int, prefill_repeats: int) -> KeepingCost:
    """Prefill and decode-step time with nothing kept, with hidden-state checkpoints, and with KV replication.

    Each measurement recomputes cached positions from the tokens that filled them (the prefill
    all of them, the decode step the last), so the cache does not grow and its values change only
    by rounding (a prefill sums the positions that decode steps filled in another order); the modes
    alternate, in an order rotated every round, so that machine noise and warm-up fall on all
    of them alike (the process's first, cold prefill is never one of them).
    """
    cached = list(model.cached_ids)
    prefill = _alternate_modes(model, prefill_repeats, lambda: model.forward(cached, start=0))
    decode = _alternate_modes(model, decode_repeats, lambda: model.forward(cached[-1:], start=len(cached) - 1))
    return KeepingCost(prefill, decode)


def _alternate_modes(model: FaultTolerantLlama, repeats: int, step: Callable[[], object]) -> dict[str, Timing]:
    """Time `step` in every keeping mode, `repeats` rounds with the order rotated; settings restored."""
    kept_hidden = {d: w.state.hidden_states for d, w in model.workers.items()}
    modes: dict[str, Callable[[], None]] = {
        "nothing kept": lambda: _keep(model, kept_hidden, hidden=False, replicate=False),
        "hidden states": lambda: _keep(model, kept_hidden, hidden=True, replicate=False),
        "KV replica": lambda: _keep(model, kept_hidden, hidden=False, replicate=True),
    }
    if any(h is None for h in kept_hidden.values()):
        del modes["hidden states"]
    seconds: dict[str, list[float]] = {name: [] for name in modes}
    replication = model.replication
    names = list(modes)
    for round_index in range(repeats):
        for name in names[round_index % len(names):] + names[:round_index % len(names)]:  # order rotated
            modes[name]()
            started = time.perf_counter()
            step()
            seconds[name].append(time.perf_counter() - started)
    _keep(model, kept_hidden, hidden=True, replicate=replication)
    return {name: Timing(tuple(s)) for name, s in seconds.items() if s}


def _keep(model: FaultTolerantLlama, stores: dict, hidden: bool, replicate: bool) -> None:
    for device, worker in model.workers.items():
        worker.state.hidden_states = stores[device] if hidden else None
    model.replication = replicate
