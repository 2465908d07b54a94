"""Time every recovery strategy from the same post-failure state, count its FLOPs, prove it lossless.

Strategies run alternately, each from its own copy of the state, several times; the report gives
min / median / max seconds and ratios of medians against full recompute, beside the FLOP ratio
counted from shapes. Every strategy's rebuilt KV is checked against a failure-free run, and its
continuation must produce the failure-free run's tokens.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from fault_tolerant_cluster import FaultTolerantLlama, PostFailureState, Survivor
from head_assignment import Assignment
from kv_cache_reused import RecoveryImpossible, RecoveryStrategy, make_recovery, rebuild_from_hidden_states
from llama_model_loader import LlamaConfig
from tensor_parallel_cluster import TensorParallelLlama
from tensor_parallel_model import DeviceState

KVSnapshot = dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]]  # (layer, KV head) -> (K, V)

# Lossless means: every rebuilt K/V entry within this fraction of the largest |value| of the
# failure-free run. Recovery changes which device sums which heads, so the summation order (and,
# in bf16, the rounding of partial sums) differs from the failure-free run: a few ulps, no more.
KV_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2}


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
    kv_max_error: float = float("nan")
    kv_tolerance: float = float("nan")
    continuation: list[int] = field(default_factory=list)
    tokens_identical: bool = False
    error: str | None = None     # why it could not run, if it could not

    @property
    def kv_lossless(self) -> bool:
        return self.kv_max_error <= self.kv_tolerance

    @property
    def lossless(self) -> bool:
        return self.error is None and self.kv_lossless and self.tokens_identical


@dataclass(frozen=True)
class DeviceLevelComparison:
    """The seed's comparison on the new owner: rebuild all its KV heads, or only the inherited ones."""

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


def snapshot_kv(model: TensorParallelLlama) -> KVSnapshot:
    """Every (layer, KV head) of the cluster, copied: the failure-free reference."""
    snapshot: KVSnapshot = {}
    for worker in model.workers.values():
        cache = worker.state.cache
        for layer in range(cache.num_layers):
            for g in cache.kv_heads:
                snapshot.setdefault((layer, g), tuple(t.clone() for t in cache.head(layer, g)))
    return snapshot


def failure_free_run(model: TensorParallelLlama, prompt_ids: Sequence[int], new_tokens: int,
                     failure_after: int) -> tuple[list[int], KVSnapshot, float]:
    """A run without failure: its tokens, its KV when `failure_after` tokens are out (for checking
    only) and its prefill seconds."""
    started, seen = time.perf_counter(), {}

    def observe(tokens: list[int]) -> None:
        if len(tokens) == 1:
            seen["prefill_s"] = time.perf_counter() - started
        if len(tokens) == failure_after:
            seen["kv"] = snapshot_kv(model)
    tokens = model.generate(prompt_ids, new_tokens, after_token=observe)
    return tokens, seen.get("kv"), seen["prefill_s"]


def kv_error(states: dict[int, DeviceState], reference: KVSnapshot) -> tuple[float, float]:
    """(largest |difference| of any entry held by any device, largest |value| of the reference)."""
    worst, scale = 0.0, max(max(k.abs().max().item(), v.abs().max().item()) for k, v in reference.values())
    for state in states.values():
        cache = state.cache
        for layer in range(cache.num_layers):
            for g in cache.kv_heads:
                for got, want in zip(cache.head(layer, g), reference[(layer, g)]):
                    if got.shape != want.shape:
                        return float("inf"), scale
                    worst = max(worst, (got.float() - want.float()).abs().max().item())
    return worst, scale


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


def continue_generation(model: FaultTolerantLlama, last_token: int, count: int) -> list[int]:
    """Greedy tokens after feeding `last_token` (the step that the failure abandoned)."""
    tokens: list[int] = []
    logits = model.decode(last_token)
    while len(tokens) < count:
        tokens.append(int(logits.argmax()))
        if len(tokens) < count:
            logits = model.decode(tokens[-1])
    return tokens


def compare_recoveries(model: FaultTolerantLlama, post: PostFailureState, strategy_names: Sequence[str],
                       repeats: int, reference_kv: KVSnapshot, reference_tail: list[int],
                       last_token: int) -> list[StrategyOutcome]:
    """Time, cost and check every strategy; the model is left with the last checked strategy's state."""
    strategies = [make_recovery(n) for n in strategy_names]
    kept = {s.name: kept_bytes(s, post) for s in strategies}  # before any continuation grows the stores
    timings, states, errors = time_strategies(model, post, strategies, repeats)
    tolerance = KV_TOLERANCE[model.dtype]
    outcomes = []
    for strategy in strategies:
        outcome = StrategyOutcome(strategy.name, strategy.keeps, timings.get(strategy.name),
                                  recovery_flops(strategy.name, model.config, post), reuse_rate(strategy.name, post),
                                  kept[strategy.name], error=errors.get(strategy.name))
        if outcome.error is None:
            worst, scale = kv_error(states[strategy.name], reference_kv)
            outcome.kv_max_error, outcome.kv_tolerance = worst, tolerance * scale
            model.adopt(states[strategy.name], post.context_ids)
            outcome.continuation = continue_generation(model, last_token, len(reference_tail))
            outcome.tokens_identical = outcome.continuation == reference_tail
        outcomes.append(outcome)
    return outcomes


def compare_device_level(model: FaultTolerantLlama, post: PostFailureState, repeats: int
                         ) -> DeviceLevelComparison | None:
    """On the receiver that inherited most: rebuild every KV head it holds, or only the inherited."""
    receivers = [d for d in post.plan.moved_heads if post.survivors[d].missing_kv_heads]
    if not receivers or any(s.hidden_states is None for s in post.survivors.values()):
        return None
    device = max(receivers, key=lambda d: (len(post.plan.moved_heads[d]), -d))
    survivor = post.survivors[device]
    nothing_kept = Survivor(survivor.shard, survivor.cache.regrouped(()), survivor.hidden_states, {})
    worker = model.workers[device]

    def timed(rebuild_from: Survivor) -> float:
        started = time.perf_counter()
        worker.submit(lambda w: rebuild_from_hidden_states(model, rebuild_from)).result()
        return time.perf_counter() - started

    all_times, inherited_times = [], []
    for _ in range(repeats):
        all_times.append(timed(nothing_kept))
        inherited_times.append(timed(survivor))
    return DeviceLevelComparison(device, len(survivor.shard.query_heads), len(post.plan.moved_heads[device]),
                                 len(survivor.shard.kv_heads), len(survivor.missing_kv_heads),
                                 Timing(tuple(all_times)), Timing(tuple(inherited_times)))


def measure_step_overhead(model: FaultTolerantLlama, repeats: int) -> dict[str, Timing]:
    """Decode-step time with nothing kept, with hidden-state checkpoints, and with KV replication.

    Each measurement recomputes the last cached position from the token that filled it, so the
    cache neither grows nor changes; the three modes alternate, in an order rotated every round,
    so that machine noise and warm-up fall on all of them alike.
    """
    position, token = model.position - 1, model.cached_ids[-1]
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
            model.forward([token], start=position)
            seconds[name].append(time.perf_counter() - started)
    _keep(model, kept_hidden, hidden=True, replicate=replication)
    return {name: Timing(tuple(s)) for name, s in seconds.items()}


def _keep(model: FaultTolerantLlama, stores: dict, hidden: bool, replicate: bool) -> None:
    for device, worker in model.workers.items():
        worker.state.hidden_states = stores[device] if hidden else None
    model.replication = replicate
