"""Time every recovery strategy from the same post-failure state, count its FLOPs, prove it lossless.

Strategies run alternately, each from the survivors' snapshot of the same post-failure state,
several times; the report gives min / median / max seconds and ratios of medians against full
recompute, beside the FLOP ratio counted from shapes. Every strategy's KV is checked head by head
against a failure-free run (lossless_checks.py), and its continuation must produce the
failure-free run's tokens with the same logits. Everything goes through the driver's messages:
the devices report their KV, the leader times the rebuild it commands.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from cluster_leader import PostFailure
from fault_tolerant_cluster import FaultTolerantLlama
from head_assignment import Assignment
from kv_cache_reused import strategy_info
from llama_model_loader import LlamaConfig
from lossless_checks import LOGITS_TOLERANCE, KVCheck, KVSnapshot, check_kv, kept_heads, logits_rel_diff, near_ties


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

    def as_json(self) -> dict:
        """The report's fields for a timing: min, median, max and every sample, in seconds."""
        return {"min_s": self.min, "median_s": self.median, "max_s": self.max, "seconds": list(self.seconds)}


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
# The failure-free run (the reference of every check)


@dataclass
class FailureFreeRun:
    """A generation without failure, for checking: its tokens, the logits of every step, the KV when
    the failure would strike, and how long the prefill took."""

    tokens: list[int]
    logits: list[torch.Tensor]
    kv: KVSnapshot
    prefill_s: float


def failure_free_run(model: FaultTolerantLlama, prompt_ids: Sequence[int], new_tokens: int,
                     failure_after: int) -> FailureFreeRun:
    """A run without failure; its KV is reported by the devices once `failure_after` tokens are out."""
    started = time.perf_counter()
    logits = [model.prefill(prompt_ids)]
    prefill_s = time.perf_counter() - started
    tokens, kv = [int(logits[0].argmax())], None
    while True:
        if len(tokens) == failure_after:
            kv = model.kv_snapshot()
        if len(tokens) == new_tokens:
            return FailureFreeRun(tokens, logits, kv, prefill_s)
        logits.append(model.decode(tokens[-1]))
        tokens.append(int(logits[-1].argmax()))


# --------------------------------------------------------------------------------------------
# FLOPs from shapes, and what each strategy keeps


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


def kv_heads_kept_and_missing(post: PostFailure) -> tuple[int, int]:
    """(device, KV head) caches the survivors need after the recovery: held before, and not."""
    kept = missing = 0
    for device, info in post.survivors.items():
        needed = set(post.assignment.kv_heads(device))
        kept += len(needed & set(info.kv_heads))
        missing += len(needed - set(info.kv_heads))
    return kept, missing


def recovery_flops(name: str, config: LlamaConfig, post: PostFailure) -> float:
    """Arithmetic each strategy does to rebuild the cache (replication only copies)."""
    L = len(post.context_ids)
    kept, missing = kv_heads_kept_and_missing(post)
    full = forward_flops(config, post.assignment, L)
    return {"full-recompute": full,
            "reuse-replay": full - kv_projection_flops(config, L, kept),
            "reuse-hidden": kv_projection_flops(config, L, missing),
            "replicate": 0.0}[name]


def reuse_rate(name: str, post: PostFailure) -> float:
    """Share of the (device, KV head) caches needed after recovery that were kept, not rebuilt."""
    kept, missing = kv_heads_kept_and_missing(post)
    return 0.0 if name == "full-recompute" else kept / (kept + missing)


def kept_bytes(name: str, post: PostFailure) -> int:
    """Memory the strategy needs kept during normal running, summed over the survivors."""
    keeps = strategy_info(name).keeps
    if keeps == "hidden states":
        return sum(info.hidden_bytes for info in post.survivors.values())
    if keeps == "KV replica":
        return sum(info.replica_bytes for info in post.survivors.values())
    return 0


# --------------------------------------------------------------------------------------------
# Timing and checking


def compare_recoveries(model: FaultTolerantLlama, post: PostFailure, strategy_names: Sequence[str],
                       repeats: int, reference: FailureFreeRun, fail_after: int, last_token: int
                       ) -> list[StrategyOutcome]:
    """Time, cost and check every strategy: `repeats` rebuilds each from the prepared state,
    alternating (order rotated every round), checked after its last one; the model is left with
    the last checked strategy's state."""
    outcomes = {name: StrategyOutcome(name, strategy_info(name).keeps, None, recovery_flops(name, model.config, post),
                                      reuse_rate(name, post), kept_bytes(name, post))
                for name in strategy_names}
    kept = {name: kept_heads({d: info.kv_heads for d, info in post.survivors.items()}, strategy_info(name).reuses_kv)
            for name in strategy_names}

    def check_last(name: str) -> None:
        check(model, outcomes[name], kept[name], len(post.context_ids), reference, fail_after, last_token)

    timings, errors = time_rebuilds(model, strategy_names, repeats, after_last=check_last)
    for name, outcome in outcomes.items():
        outcome.timing, outcome.error = timings.get(name), errors.get(name)
    return list(outcomes.values())


def time_rebuilds(model: FaultTolerantLlama, strategy_names: Sequence[str], repeats: int,
                  after_last: Callable[[str], object] = lambda name: None
                  ) -> tuple[dict[str, Timing], dict[str, str]]:
    """`repeats` rebuilds of each strategy from the prepared post-failure state, alternating with the
    order rotated every round (machine noise falls on all alike); `after_last(name)` runs after a
    strategy's last rebuild, on its state. A strategy that cannot run (it fell back) is timed no
    more: its reason is in the errors."""
    seconds: dict[str, list[float]] = {name: [] for name in strategy_names}
    errors: dict[str, str] = {}
    names = list(strategy_names)
    for round_index in range(repeats):
        for name in names[round_index % len(names):] + names[:round_index % len(names)]:
            if name in errors:
                continue
            recovery = model.rebuild(name)
            if recovery.strategy != name:
                errors[name] = recovery.fallback_reason.split("; fell back")[0]
                continue
            seconds[name].append(recovery.rebuild_s)
            if round_index == repeats - 1:
                after_last(name)
    return {name: Timing(tuple(s)) for name, s in seconds.items() if s}, errors


def check(model: FaultTolerantLlama, outcome: StrategyOutcome, kept: frozenset[tuple[int, int]],
          context_length: int, reference: FailureFreeRun, fail_after: int, last_token: int) -> None:
    """The recovered state against the failure-free run: its KV head by head (each holding exactly
    the `context_length` positions the recovery rebuilt), then the steps after it."""
    outcome.kv = check_kv(model.kv_snapshot(), reference.kv, kept, model.dtype, context_length)
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


def compare_device_level(model: FaultTolerantLlama, post: PostFailure, repeats: int) -> DeviceLevelComparison | None:
    """On the receiver that inherited most: rebuild every KV head it holds, or only the inherited,
    both from the post-failure state (alternating; each on a copy on the device)."""
    plan = post.plans[-1]
    receivers = [d for d in plan.moved_heads if set(post.assignment.kv_heads(d)) - set(post.survivors[d].kv_heads)]
    if not receivers or any(info.hidden_positions is None for info in post.survivors.values()):
        return None
    device = max(receivers, key=lambda d: (len(plan.moved_heads[d]), -d))
    model.restore_post_failure()
    all_times, inherited_times = [], []
    for _ in range(repeats):
        all_times.append(model.time_hidden_rebuild(device, inherited_only=False))
        inherited_times.append(model.time_hidden_rebuild(device, inherited_only=True))
    held, needed = post.survivors[device].kv_heads, post.assignment.kv_heads(device)
    return DeviceLevelComparison(device, len(post.assignment.heads[device]), len(plan.moved_heads[device]),
                                 len(needed), len(set(needed) - set(held)), Timing(tuple(all_times)),
                                 Timing(tuple(inherited_times)))


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
    """Time `step` in every keeping mode, `repeats` rounds with the order rotated; settings restored.
    Hidden states switched off are parked on each device, not dropped."""
    keeping = model.keeping
    modes = {"nothing kept": (False, False), "hidden states": (True, False), "KV replica": (False, True)}
    if not keeping[0]:
        del modes["hidden states"]
    seconds: dict[str, list[float]] = {name: [] for name in modes}
    names = list(modes)
    for round_index in range(repeats):
        for name in names[round_index % len(names):] + names[:round_index % len(names)]:  # order rotated
            model.keep(*modes[name])
            started = time.perf_counter()
            step()
            seconds[name].append(time.perf_counter() - started)
    model.keep(*keeping)
    return {name: Timing(tuple(s)) for name, s in seconds.items() if s}


def measure_copy_bandwidth(source: torch.dtype, target: torch.dtype, elements: int = 64 << 20,
                           tries: int = 3) -> dict:
    """What this machine's memory gives one thread (a device computes on one) converting `source`
    to `target`, as inheriting weight slices does: bytes written per second into memory the copy
    touches first (a new slice: every page faulted in) and into memory already touched; best of
    `tries`. The yardsticks for the inheritance rate."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        src = torch.ones(elements, dtype=source)
        fresh, warm = [], []
        for _ in range(tries):
            started = time.perf_counter()
            dst = torch.empty(elements, dtype=target).copy_(src)
            fresh.append(time.perf_counter() - started)
            started = time.perf_counter()
            dst.copy_(src)
            warm.append(time.perf_counter() - started)
            del dst
    finally:
        torch.set_num_threads(threads)
    written = elements * target.itemsize
    return {"source_dtype": str(source).removeprefix("torch."), "target_dtype": str(target).removeprefix("torch."),
            "fresh_bytes_per_s": written / min(fresh), "warm_bytes_per_s": written / min(warm)}
