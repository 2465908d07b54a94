"""The demo with many requests in flight (`--requests N`, N > 1): the same workload served without a
failure, then once per strategy and repeat on a fresh cluster, with the same device failing after
the same scheduler step, several requests in flight.

A batch cannot compare strategies from one held post-failure state (the leader recovers a batch on
its own), so each strategy gets its own run, the same requests joining at the same steps: its
tokens, request by request, must be the failure-free run's, and where it reuses KV the survivors'
blocks must be the same bits (the rebuilt heads within lossless_checks.py's bound).
"""
from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

from cluster_leader import Recovery
from demo_options import DTYPE_BYTES, Options, check_against_model, keeping, other_prompts, pool_blocks_for
from demo_scenario import (FAULT_VERBS, build_prompt, describe_environment, describe_failure, describe_model,
                           describe_system, keep_state_for, keeping_words)
from device_actor import DTYPES
from device_protocol import RecoveryPolicy, ServedStep
from fault_injection import FailurePlan
from fault_tolerant_cluster import FaultTolerantLlama
from head_assignment import Assignment, even_assignment
from interruption_phases import add_interruption_ratios, interruption_of
from kv_cache_reused import strategy_info
from llama_config import LlamaConfig
from lossless_checks import (LOGITS_TOLERANCE, REBUILT_KV_TOLERANCE, Divergence, KVCheck, check_kv, first_divergence,
                             kept_heads)
from performance_comparator import Timing
from provenance import SCHEMA_VERSION, git_commit, utc_now
from recovery_plots import plot_phases, plot_timeline
from recovery_report import Report
from report_files import picture_path
from request_scheduler import BlockCosts
from tensor_parallel_cluster import open_checkpoint

KEEPS = {"nothing": (False, False), "hidden states": (True, False), "KV replica": (False, True)}


@dataclass(frozen=True)
class RequestSpec:
    """One request of the workload: when it joins (before which scheduler step), its prompt, its output length."""

    joins_at: int
    prompt: str
    prompt_ids: list[int]
    new_tokens: int


@dataclass
class BatchRun:
    """One serving of the workload: each request's tokens (by its place in the workload) with each
    token's top-2 margin and its row's largest |logit| (where a divergence is judged), every step
    served, the running requests' KV after the step the failure follows and after the next."""

    outputs: list[list[int]]
    margins: list[list[float]]
    logit_scales: list[list[float]]
    index: dict[int, int] = field(default_factory=dict)  # request id -> its place in the workload
    steps: list[ServedStep] = field(default_factory=list)
    kv: dict[int, dict] = field(default_factory=dict)  # steps served -> request index -> KV snapshot

    @property
    def preemptions(self) -> int:
        return sum(len(step.preempted) for step in self.steps)


@dataclass
class FailedRun:
    """A run with the failure: the batch as served, and what the recovery measured."""

    batch: BatchRun
    recovery: Recovery
    detection_s: float
    signal: str | None  # the real signal the fault was, if it was one
    events: list        # the cluster's telemetry, for the timeline


def build_workload(tokenizer, o: Options) -> list[RequestSpec]:
    """Request i joins before step i. The first is --prompt padded to --context-tokens with
    --new-tokens; the others' prompts and outputs are spread below those lengths (prompts cut or
    padded to their length; with --context-tokens 0 each prompt is as it is)."""
    first = build_prompt(tokenizer, o.prompt, o.context_tokens)
    texts = [o.prompt, *other_prompts(o)]
    specs = []
    for i, text in enumerate(texts):
        share = (o.requests - i) / o.requests
        ids = first if i == 0 else spread_prompt(tokenizer, text, o.context_tokens and max(1, int(len(first) * share)))
        specs.append(RequestSpec(i, text, ids, max(1, round(o.new_tokens * share))))
    return specs


def spread_prompt(tokenizer, text: str, length: int | None) -> list[int]:
    """`text`'s tokens padded (build_prompt) or cut to `length`; as they are when `length` is None."""
    return build_prompt(tokenizer, text, length)[:length]


def serve(model: FaultTolerantLlama, workload: Sequence[RequestSpec], fail: FailurePlan | None,
          fail_after: int) -> BatchRun:
    """Serve the workload, each request joining at its step; `fail` is armed once `fail_after` steps
    are served. The KV of the running requests is taken after that step and the next."""
    run = BatchRun(*([[] for _ in workload] for _ in range(3)))
    index = run.index
    open_requests = set(range(len(workload)))
    while open_requests:
        for i, spec in enumerate(workload):
            if spec.joins_at == len(run.steps):
                index[model.submit(spec.prompt_ids, spec.new_tokens)] = i
        served = model.step()
        if not served.batch_tokens:
            raise RuntimeError(f"nothing could be scheduled ({served.waiting} waiting, {served.running} running)")
        run.steps.append(served)
        for request_id, token in served.tokens.items():
            run.outputs[index[request_id]].append(token)
            run.margins[index[request_id]].append(served.margins[request_id])
            run.logit_scales[index[request_id]].append(served.logit_scales[request_id])
        open_requests -= {index[r] for r in served.ended}
        if len(run.steps) in (fail_after, fail_after + 1):
            run.kv[len(run.steps)] = {index[r]: kv for r, kv in model.batch_kv_snapshot().items()}
        if len(run.steps) == fail_after and fail is not None:
            model.arm(fail)
    return run


# --------------------------------------------------------------------------------------------
# The scenario


def run_batch_scenario(o: Options, log: Callable[[str], None]) -> Report:
    started_at = utc_now()
    location, checkpoint, open_seconds = open_checkpoint(o.model_dir, log)
    check_against_model(o, checkpoint.config, 0)
    assignment = even_assignment(checkpoint.config, o.devices)

    def cluster(strategy: str) -> FaultTolerantLlama:
        model = FaultTolerantLlama.from_checkpoint(
            location, checkpoint, assignment, DTYPES[o.dtype], False, open_seconds, heartbeat=o.heartbeat,
            policy=RecoveryPolicy(o.reassign, o.seed, strategy=strategy, standby_weights=o.standby_weights),
            backend=o.backend, accelerator=o.accelerator, scheduling=o.scheduling)
        keep_state_for(model, o.recovery)  # every run keeps the same: the same pool, the same schedule
        return model

    with cluster(o.recovery[0]) as model:
        workload = build_workload(model.tokenizer, o)
        check_against_model(o, model.config, max(len(spec.prompt_ids) for spec in workload))
        log(f"failure-free reference run: {len(workload)} requests, prompts of "
            f"{min(len(s.prompt_ids) for s in workload)}-{len(workload[0].prompt_ids)} tokens")
        reference = serve(model, workload, None, o.fail_after)  # the first request alone takes --new-tokens steps
        described = {"model": describe_model(model, o.dtype), "system": describe_system(model),
                     "processes": model.transport.processes()}
        decode = model.tokenizer.decode
    runs = failed_runs(o, cluster, workload, reference, log)
    return batch_report(o, checkpoint.config, started_at, described, decode, workload, reference, runs, assignment)


def failed_runs(o: Options, cluster: Callable[[str], FaultTolerantLlama], workload: Sequence[RequestSpec],
                reference: BatchRun, log: Callable[[str], None]) -> dict[str, list[FailedRun]]:
    """`repeats` runs of every strategy, alternating with the order rotated each round (machine noise
    falls on all alike), each on a fresh cluster failing after the same step."""
    runs: dict[str, list[FailedRun]] = {name: [] for name in o.recovery}
    names = list(o.recovery)
    for round_index in range(o.repeats):
        for name in names[round_index % len(names):] + names[:round_index % len(names)]:
            log(f"{name}, run {round_index + 1} of {o.repeats}: Device-{o.fail_device} {FAULT_VERBS[o.fault]} "
                f"after step {o.fail_after}")
            with cluster(name) as model:
                batch = serve(model, workload, FailurePlan(o.fail_device, mode=o.fault), o.fail_after)
                if not model.recoveries:
                    raise RuntimeError("the injected failure was never recovered from")
                event = model.recoveries[0].events[0]
                runs[name].append(FailedRun(batch, model.recoveries[0], model.detection_latency_s(event),
                                            model.fault_signal(event), list(model.events)))
            check_same_before_failure(batch, reference, o.fail_after)
    return runs


def check_same_before_failure(run: BatchRun, reference: BatchRun, fail_after: int) -> None:
    """Up to the failure a run is the failure-free one (the same schedule): anything else is a bug."""
    for i, tokens in enumerate(before_failure(reference, fail_after)):
        if run.outputs[i][:len(tokens)] != tokens:
            raise RuntimeError(f"request {i + 1} diverged from the failure-free run before the failure")


def before_failure(run: BatchRun, fail_after: int) -> list[list[int]]:
    """Each request's tokens served in the first `fail_after` steps."""
    counts = [0] * len(run.outputs)
    for step in run.steps[:fail_after]:
        for request_id in step.tokens:
            counts[run.index[request_id]] += 1
    return [tokens[:count] for tokens, count in zip(run.outputs, counts)]


# --------------------------------------------------------------------------------------------
# Checking a run against the failure-free one


@dataclass(frozen=True)
class RequestCheck:
    divergence: Divergence | None  # where its tokens first leave the failure-free run's; None: identical
    kv: KVCheck | None  # None: not running before and after the recovery (finished, waiting, preempted)

    @property
    def tokens_identical(self) -> bool:
        return self.divergence is None

    @property
    def near_tie(self) -> bool:
        return self.divergence is not None and self.divergence.near_tie

    @property
    def lossless(self) -> bool:
        return (self.tokens_identical or self.near_tie) and (self.kv is None or self.kv.ok)


def check_run(name: str, run: FailedRun, reference: BatchRun, before: Assignment, dtype, fail_after: int
              ) -> list[RequestCheck]:
    """Every request's tokens against the failure-free run's (a difference judged at its first
    divergent token: a near-tie there is lossless, lossless_checks.first_divergence); the KV of those
    running before and after the recovery, after its step, against the failure-free KV after the
    step the failure followed (the kept heads the same bits where the strategy reuses KV)."""
    after = run.recovery.plans[-1].after
    kept = kept_heads({d: before.kv_heads(d) for d in after.devices}, strategy_info(name).reuses_kv)
    preempted = {run.batch.index[r] for r in run.batch.steps[fail_after].preempted}
    recovered_kv = run.batch.kv.get(fail_after + 1, {})
    checks = []
    for i, tokens in enumerate(reference.outputs):
        want, got = reference.kv[fail_after].get(i), recovered_kv.get(i)
        kv = None
        if want is not None and got is not None and i not in preempted:
            length = next(iter(want.values()))[0].shape[0]
            kv = check_kv({key: (k[:length], v[:length]) for key, (k, v) in got.items()}, want, kept, dtype, length)
        checks.append(RequestCheck(first_divergence(run.batch.outputs[i], tokens, reference.margins[i],
                                                    reference.logit_scales[i], LOGITS_TOLERANCE[dtype]), kv))
    return checks


def verdict(checks: Sequence[Sequence[RequestCheck]]) -> str:
    """What failed, in words (the first request of each kind), or 'lossless' (saying how many
    request runs differ only from a near-tie on)."""
    problems = [f"request {i + 1}: {c.kv.describe()}" for run in checks for i, c in enumerate(run)
                if c.kv is not None and not c.kv.ok][:1]
    problems += [f"request {i + 1}'s tokens differ from the failure-free run's at its token "
                 f"{c.divergence.token + 1}, not a near-tie" for run in checks
                 for i, c in enumerate(run) if not c.tokens_identical and not c.near_tie][:1]
    ties = sum(c.near_tie for run in checks for c in run)
    if problems or not ties:
        return "; ".join(problems) or "lossless"
    return f"lossless, {ties} request run(s) differing from a near-tie of the failure-free run on"


# --------------------------------------------------------------------------------------------
# The report


def batch_report(o: Options, config: LlamaConfig, started_at: str, described: dict, decode,
                 workload: Sequence[RequestSpec], reference: BatchRun, runs: dict[str, list[FailedRun]],
                 before: Assignment) -> Report:
    dtype = DTYPES[o.dtype]
    checks = {name: [check_run(name, run, reference, before, dtype, o.fail_after) for run in name_runs]
              for name, name_runs in runs.items()}
    in_flight = in_flight_at_failure(reference, o)
    longest = max(len(spec.prompt_ids) + spec.new_tokens - 1 for spec in workload)
    comparison = [strategy_row(name, runs[name], checks[name], o, config, in_flight["kv_blocks_in_flight"],
                               longest, before) for name in o.recovery]
    add_speedups(comparison)
    add_interruption_ratios(comparison, "name")
    befores = before_failure(reference, o.fail_after)
    first = runs[o.recovery[0]][0]
    pictures = {"timeline": picture_path(o.report, "timeline"), "phases": picture_path(o.report, "phases")}
    what = (f"Device-{o.fail_device} {FAULT_VERBS[o.fault]} after step {o.fail_after}, {in_flight['running_at_failure']} "
            f"of {o.requests} requests running; {o.backend}, {o.devices} devices")
    medians = {row["name"]: row["median_s"] for row in comparison[:1] if not row["error"]}
    plot_timeline(first.events, pictures["timeline"], f"{what} ({started_at[:10]})\nthe first {o.recovery[0]} run: "
                  f"the leader recovers the batch, then serving goes on", medians)
    plot_phases(comparison, pictures["phases"], f"The whole interruption of the batch per strategy: {what} "
                                                f"({started_at[:10]})")
    hidden, replication = keeping(o.recovery)
    system = described["system"] | {
        "processes": described["processes"], "context_tokens": len(workload[0].prompt_ids),
        "new_tokens": o.new_tokens, "kept_bytes_per_token": {}, "keeping": keeping_words(hidden, replication)}
    return {
        "schema_version": SCHEMA_VERSION,
        "run": {"started": started_at, "commit": git_commit(), "backend": o.backend, "accelerator": o.accelerator,
                "options": o.to_json()},
        "model": described["model"],
        "system": system,
        "failure": batch_failure(o, first, in_flight, before),
        "comparison_meta": {"repeats": o.repeats, "context_tokens": in_flight["kv_positions_in_flight"]},
        "comparison": comparison,
        "batch": in_flight | {"requests": o.requests, "steps": len(reference.steps), "fail_after_steps": o.fail_after,
                              "scheduling": asdict(o.scheduling), "reference_preemptions": reference.preemptions,
                              "pool_blocks": pool_blocks_for(o, config, hidden, replication)},
        "requests": [describe_request(i, spec, befores[i], reference, runs, checks, decode)
                     for i, spec in enumerate(workload)],
        "device_level": None, "overhead": None, "prefill_overhead": None,
        "environment": describe_environment(),
        "files": {name: str(path) for name, path in pictures.items()},
    }


def in_flight_at_failure(reference: BatchRun, o: Options) -> dict:
    """The batch when the failure strikes, from the failure-free run: requests running, waiting and
    finished, and the positions and KV blocks the running ones hold."""
    at = reference.steps[o.fail_after - 1]
    positions = [computed_positions(snapshot) for snapshot in reference.kv[o.fail_after].values()]
    return {"running_at_failure": at.running, "waiting_at_failure": at.waiting,
            "finished_before_failure": sum(len(step.ended) for step in reference.steps[:o.fail_after]),
            "kv_positions_in_flight": sum(positions),
            "kv_blocks_in_flight": sum(math.ceil(p / o.scheduling.block_size) for p in positions)}


def computed_positions(snapshot: dict) -> int:
    return next(iter(snapshot.values()))[0].shape[0] if snapshot else 0


def strategy_row(name: str, runs: Sequence[FailedRun], checks: Sequence[Sequence[RequestCheck]], o: Options,
                 config: LlamaConfig, blocks_in_flight: int, longest: int, before: Assignment) -> dict:
    """comparison[]'s fields for a strategy, each the worst over its runs and requests, beside what the
    batch adds: the preemptions of each run, the requests kept lossless, what the budget holds."""
    keeps = strategy_info(name).keeps
    error = next((run.recovery.fallback_reason.split("; fell back")[0] for run in runs
                  if run.recovery.strategy != name), None)
    flat = [check for run in checks for check in run]
    kv = [check.kv for check in flat if check.kv is not None]
    costs = BlockCosts.for_model(config, o.scheduling.block_size, DTYPE_BYTES[o.dtype])
    capacity = pool_blocks_for(o, config, *KEEPS[keeps])
    after = runs[0].recovery.plans[-1].after
    row = {"name": name, "keeps": keeps, "flops": None, "reuse_rate": reuse_rate(name, before, after),
           "kept_bytes": blocks_in_flight * kept_block_bytes(keeps, before, after.devices, costs),
           "kept_heads_max_abs_diff": max((k.kept_max_abs_diff for k in kv), default=0.0),
           "rebuilt_heads_max_rel_error": max((k.rebuilt_max_rel_error for k in kv), default=0.0),
           "rebuilt_heads_tolerance": REBUILT_KV_TOLERANCE[DTYPES[o.dtype]],
           "logits_max_rel_diff": None, "logits_tolerance": None,
           "verdict": f"could not run: {error}" if error else verdict(checks),
           "tokens_identical": all(check.tokens_identical for check in flat), "continuation_ids": None,
           "near_tie_mismatches": [], "near_tie_requests": near_tie_requests(checks),
           "lossless": error is None and all(check.lossless for check in flat),
           "error": error, "speedup": None, "flop_ratio": None,
           "flop_ratio_note": "not counted for a batch: see the rebuild seconds",
           "preemptions": [run.batch.preemptions for run in runs],
           "requests_lossless": sum(all(run[i].lossless for run in checks) for i in range(len(checks[0]))),
           "requests_kv_checked": sum(any(run[i].kv is not None for run in checks) for i in range(len(checks[0]))),
           "capacity_blocks": capacity, "capacity_requests": capacity // math.ceil(longest / o.scheduling.block_size),
           "redo_s": None, "interruption_s": None, "interruption_phases": None, "interruption_ratio": None}
    if error is None:
        redo = [run.batch.steps[o.fail_after].forward_s for run in runs]
        row |= Timing(tuple(run.recovery.rebuild_s for run in runs)).as_json() | {"redo_s": statistics.median(redo)}
        row |= interruption_of({"detection_s": [run.detection_s for run in runs],
                                "regroup_s": [run.recovery.regroup_s for run in runs],
                                "weights_s": [run.recovery.weight_load_s for run in runs],
                                "rebuild_s": [run.recovery.rebuild_s for run in runs], "redo_s": redo})
    return row


def near_tie_requests(checks: Sequence[Sequence[RequestCheck]]) -> list[dict]:
    """The requests of every run whose tokens differ only from a near-tie of the failure-free run on
    (1-based, as the report names them), with the margin and bound at their first divergent token."""
    return [{"run": r + 1, "request": i + 1, "first_divergent_token": c.divergence.token + 1,
             "margin": c.divergence.margin, "bound": c.divergence.bound}
            for r, run in enumerate(checks) for i, c in enumerate(run) if c.near_tie]


def add_speedups(rows: list[dict]) -> None:
    """Each row's `speedup`: full recompute's median rebuild over the row's own."""
    full = next((row for row in rows if row["name"] == "full-recompute" and not row["error"]), None)
    for row in rows:
        row["speedup"] = full["median_s"] / row["median_s"] if full and not row["error"] else None


def reuse_rate(name: str, before: Assignment, after: Assignment) -> float:
    """Share of the (device, KV head) caches needed after the recovery that were kept, not rebuilt."""
    if not strategy_info(name).reuses_kv:
        return 0.0
    kept = sum(len(set(after.kv_heads(d)) & set(before.kv_heads(d))) for d in after.devices)
    return kept / sum(len(after.kv_heads(d)) for d in after.devices)


def kept_block_bytes(keeps: str, before: Assignment, survivors: Sequence[int], costs: BlockCosts) -> int:
    """What one block of the strategy's kept state costs the survivors together: every layer's input,
    or a copy of the ring predecessor's KV heads."""
    if keeps == "hidden states":
        return costs.hidden * len(survivors)
    if keeps == "KV replica":
        ring = before.devices
        return costs.kv_head * sum(len(before.kv_heads(ring[ring.index(d) - 1])) for d in survivors)
    return 0


def batch_failure(o: Options, first: FailedRun, in_flight: dict, before: Assignment) -> dict:
    """The failure as the leader saw it in the first strategy's first run."""
    recovery = first.recovery
    return describe_failure(o, recovery.events[0], first.detection_s, first.signal, recovery.plans[-1], before,
                            recovery.regroup_s, recovery.weight_load_s, None, None) | {
        "after_tokens": None, "after_steps": o.fail_after, "running": in_flight["running_at_failure"],
        "waiting": in_flight["waiting_at_failure"], "seen_in": f"the first {o.recovery[0]} run"}


def describe_request(i: int, spec: RequestSpec, before: list[int], reference: BatchRun,
                     runs: dict[str, list[FailedRun]], checks: dict[str, list[list[RequestCheck]]], decode) -> dict:
    """requests[]: laid out as the one sequence's `text`, plus when it joined and whether each strategy
    kept it lossless (in every run) and whether a run differed from a near-tie on; after_ids are from
    each strategy's last run."""
    after = {name: name_runs[-1].batch.outputs[i][len(before):] for name, name_runs in runs.items()}
    return {"request": i + 1, "joins_at_step": spec.joins_at, "prompt": spec.prompt, "prompt_ids": spec.prompt_ids,
            "new_tokens": spec.new_tokens, "before_ids": before, "before_text": decode(before),
            "reference_ids": reference.outputs[i], "reference_text": decode(reference.outputs[i]),
            "reference_after_ids": reference.outputs[i][len(before):], "after_ids": after,
            "after_texts": {name: decode(before + ids) for name, ids in after.items()},
            "lossless": {name: all(run[i].lossless for run in checks[name]) for name in runs},
            "near_tie": {name: any(run[i].near_tie for run in checks[name]) for name in runs}}
