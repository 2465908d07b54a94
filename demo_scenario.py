"""The demo's scenario: a failure-free reference, the same generation with a fault, every recovery
strategy from one post-failure state, and the report's dict of what was measured.

The command line (execution_optimization_algorithm_demo.py) imports this only once the arguments
and the checkpoint's config have been checked, so that a mistake is answered without torch.
"""
from __future__ import annotations

import os
import platform
import time
from typing import Callable, Sequence

import torch

from cluster_leader import StepFailed
from demo_options import Options, check_against_model, keeping
from device_actor import DTYPES
from device_network import StepAbandoned, WaitStalled
from device_protocol import RecoveryPolicy
from fault_injection import FailurePlan
from fault_tolerant_cluster import FaultTolerantLlama
from head_assignment import even_assignment
from interruption_phases import add_interruption_ratios, interruption
from llama_config import checkpoint_name
from performance_comparator import (StrategyOutcome, compare_device_level, compare_recoveries,
                                    failure_free_run, measure_copy_bandwidth, measure_keeping_cost)
from provenance import SCHEMA_VERSION, cpu_features, cpu_name, git_commit, utc_now
from recovery_plots import plot_phases, plot_timeline
from recovery_report import Report
from report_files import picture_path
from synthetic_checkpoint import is_synthetic_checkpoint, synthetic_name
from tensor_parallel_cluster import open_checkpoint

PREFILL_REPEATS = 2  # warm prefills per keeping mode in the cost of keeping state (each is a whole prefill)
FAULT_VERBS = {"crash": "crashes", "hang": "hangs", "wedge": "wedges"}
SIGNAL_WORDS = {"heartbeat": "it missed its heartbeats", "no-progress": "it beat on but made no progress",
                "process-exit": "its process exited", "collective": "a peer's collective with it failed"}


def build_prompt(tokenizer, prompt: str, context_tokens: int | None) -> list[int]:
    """The tokenized prompt, padded in front with repetitions of itself to `context_tokens`."""
    ids = tokenizer.encode(prompt)
    if context_tokens is None or context_tokens <= len(ids):
        return ids
    bos = ids[:1] if tokenizer.bos_token_id is not None else []
    body = ids[len(bos):] or tokenizer.encode(" ")[len(bos):]
    filler = (body * (context_tokens // len(body) + 1))[:context_tokens - len(ids)]
    return bos + filler + body


# --------------------------------------------------------------------------------------------
# The scenario


def run_scenario(o: Options, log: Callable[[str], None]) -> Report:
    started_at = utc_now()
    location, checkpoint, open_seconds = open_checkpoint(o.model_dir, log)
    config = checkpoint.config
    check_against_model(o, config, 0)
    assignment = even_assignment(config, o.devices)
    model = FaultTolerantLlama.from_checkpoint(
        location, checkpoint, assignment, DTYPES[o.dtype], not o.quiet, open_seconds,
        heartbeat=o.heartbeat,
        policy=RecoveryPolicy(o.reassign, o.seed, hold=True, standby_weights=o.standby_weights),  # the comparison
        # drives every recovery
        backend=o.backend, accelerator=o.accelerator)
    kind = "synthetic" if is_synthetic_checkpoint(checkpoint.folder) else "real"
    log(f"model: {checkpoint.folder} ({kind}: {location.reason})")
    try:
        return run_on_model(o, model, started_at, log)
    finally:
        model.close()


def run_on_model(o: Options, model: FaultTolerantLlama, started_at: str, log: Callable[[str], None]) -> Report:
    prompt_ids = build_prompt(model.tokenizer, o.prompt, o.context_tokens)
    check_against_model(o, model.config, len(prompt_ids))
    initial = model.assignment
    system = describe_system(model)

    log(f"failure-free reference run: {len(prompt_ids)}-token context, {o.new_tokens} new tokens")
    reference = failure_free_run(model, prompt_ids, o.new_tokens, o.fail_after)

    keeping = keep_state_for(model, o.recovery)
    log(f"run with a failure: Device-{o.fail_device} {FAULT_VERBS[o.fault]} after {o.fail_after} tokens "
        f"(keeping {keeping})")
    before, prefill_keeping_s = generate_until_failure(model, prompt_ids, o, log)
    if before != reference.tokens[:o.fail_after]:
        raise RuntimeError("the run diverged from the failure-free run before the failure")
    post = model.prepare_recovery()
    event, plan = post.events[0], post.plans[-1]
    detection_s = model.detection_latency_s(event)
    log(f"Device-{event.device} declared dead after {detection_s:.2f} s; "
        f"comparing {len(o.recovery)} recovery strategies x {o.repeats}")
    outcomes = compare_recoveries(model, post, o.recovery, o.repeats, reference, o.fail_after, before[-1])
    device_level = compare_device_level(model, post, o.repeats)
    if device_level is not None:  # it left the survivors at the post-failure state: recover (quickly) again
        model.rebuild(min((row for row in outcomes if row.timing), key=lambda row: row.timing.median).name)
    cost = None
    if keeping != "nothing":
        log("cost of keeping state: prefills and decode steps, alternating")
        cost = measure_keeping_cost(model, decode_repeats=max(5, o.repeats), prefill_repeats=PREFILL_REPEATS)

    system["processes"] = model.transport.processes()  # each device process's memory, near the end of the run
    system["copy_bandwidth"] = measure_copy_bandwidth(model.checkpoint.embedding_dtype, DTYPES[o.dtype])
    system |= {"prefill_seconds": reference.prefill_s, "prefill_seconds_keeping": prefill_keeping_s,
               "keeping": keeping, "context_tokens": len(prompt_ids), "new_tokens": o.new_tokens,
               "kept_bytes_per_token": {row.keeps: row.kept_bytes / max(1, len(post.context_ids))
                                        for row in outcomes if row.kept_bytes}}
    comparison = comparison_rows(outcomes, {"detection_s": detection_s, "regroup_s": post.regroup_s,
                                            "weights_s": post.weight_load_s})
    pictures = {"timeline": picture_path(o.report, "timeline"), "phases": picture_path(o.report, "phases")}
    what = (f"Device-{event.device} {FAULT_VERBS[o.fault]} after {o.fail_after} tokens; {o.reassign} reassignment; "
            f"{len(post.context_ids)}-token context; {o.backend}, {o.devices} devices")
    plot_timeline(list(model.events), pictures["timeline"],
                  f"{what} ({started_at[:10]})\nafter the failure: each strategy's rebuild, {o.repeats}x each from the "
                  f"same post-failure state (the comparison), then generation resumes",
                  {row["name"]: row["median_s"] for row in comparison if row.get("median_s") is not None})
    plot_phases(comparison, pictures["phases"], f"The whole interruption per strategy: {what} ({started_at[:10]})")
    return {
        "schema_version": SCHEMA_VERSION,
        "run": {"started": started_at, "commit": git_commit(), "backend": o.backend, "accelerator": o.accelerator,
                "options": o.to_json()},
        "model": describe_model(model, o.dtype),
        "system": system,
        "failure": describe_failure(o, event, detection_s, model.fault_signal(event), plan, initial, post.regroup_s,
                                    post.weight_load_s, post.weight_bytes, post.weights_from_standby),
        "comparison_meta": {"repeats": o.repeats, "context_tokens": len(post.context_ids)},
        "comparison": comparison,
        "device_level": device_level_row(device_level),
        "overhead": {mode: t.as_json() for mode, t in cost.decode.items()} if cost else None,
        "prefill_overhead": {mode: t.as_json() for mode, t in cost.prefill.items()} if cost else None,
        "text": describe_text(model, o.prompt, prompt_ids, before, reference.tokens, outcomes, o.fail_after),
        "environment": describe_environment(),
        "files": {name: str(path) for name, path in pictures.items()},
    }


def keep_state_for(model: FaultTolerantLlama, strategies: Sequence[str]) -> str:
    """Switch on, before the failure, what the chosen strategies need kept during normal running."""
    hidden, replication = keeping(strategies)
    model.keep(hidden, replication)
    return keeping_words(hidden, replication)


def keeping_words(hidden: bool, replication: bool) -> str:
    return " and ".join(name for name, on in (("hidden states", hidden), ("KV replica", replication)) if on) \
        or "nothing"


def generate_until_failure(model: FaultTolerantLlama, prompt_ids: list[int], o: Options,
                           log: Callable[[str], None]) -> tuple[list[int], float]:
    """Generate `fail_after` tokens, then run the step in which the armed device fails."""
    started = time.perf_counter()
    logits = model.prefill(prompt_ids)
    prefill_s = time.perf_counter() - started
    tokens = [int(logits.argmax())]
    while len(tokens) < o.fail_after:
        tokens.append(int(model.decode(tokens[-1]).argmax()))
    model.arm(FailurePlan(o.fail_device, o.fail_after, mode=o.fault))
    log(f"Device-{o.fail_device} {FAULT_VERBS[o.fault]} in this step; waiting for its death to be declared "
        f"(heartbeat timeout {o.heartbeat_timeout} s; a process's exit is seen at once)...")
    try:
        model.decode(tokens[-1])
    except StepFailed:
        return tokens, prefill_s
    raise RuntimeError("the injected failure did not abandon the step")


def explain_abandoned(error: StepAbandoned) -> str:
    """What stopped a run that had no more faults to survive, in words: the device declared dead and
    on what evidence (no failure was injected there), or the wait that stalled, or the step given up."""
    if isinstance(error, StepFailed):
        return "; ".join(f"Device-{e.device} was declared dead because {why_declared(e.detection)}, with no "
                         f"failure injected there (a loaded machine? raise --heartbeat-timeout)" for e in error.events)
    if isinstance(error, WaitStalled):
        return f"a wait stalled: {error}"
    return f"a step was abandoned: {error}"


def why_declared(detection) -> str:
    why = SIGNAL_WORDS.get(detection.signal, detection.signal)
    return why + (f" in {detection.stuck_in}" if detection.stuck_in else "")


# --------------------------------------------------------------------------------------------
# Describing the run for the report


def describe_failure(o: Options, event, detection_s: float, signal: str | None, plan, initial, regroup_s: float,
                     weight_load_s: float, weight_bytes: int | None, weights_from_standby: bool | None) -> dict:
    """The report's `failure`: the fault, its detection, the plan and the shared phases of the recovery."""
    return {"device": event.device, "mode": o.fault, "after_tokens": o.fail_after, "signal": signal,
            "heartbeat_interval_s": o.heartbeat_interval, "heartbeat_timeout_s": o.heartbeat_timeout,
            "detector": o.detector, "phi_threshold": o.phi_threshold if o.detector == "phi" else None,
            "detection_latency_s": detection_s, "declared_by": event.detection.signal,
            "stuck_in": event.detection.stuck_in, "leader": event.leader,
            "reassign": o.reassign, "plan": plan.describe(), "regroup_seconds": regroup_s,
            "weight_load_seconds": weight_load_s, "weight_bytes_inherited": weight_bytes,
            "standby_weights": o.standby_weights, "weights_from_standby": weights_from_standby,
            "initial_assignment": {d: list(h) for d, h in initial.heads.items()},
            "assignment_after": {d: list(h) for d, h in plan.after.heads.items()}}


def describe_model(model: FaultTolerantLlama, dtype: str) -> dict:
    load = model.load_report
    return {"name": synthetic_name(load.folder) or checkpoint_name(load.folder), "path": str(load.folder), "source": load.location.source,
            "reason": load.location.reason,
            "synthetic": is_synthetic_checkpoint(load.folder), "config": model.config.to_dict(),
            "tensor_count": load.tensor_count, "stored_bytes": load.stored_bytes, "stored_dtype": load.stored_dtype,
            "compute_dtype": dtype, "load_seconds": load.seconds}


def describe_system(model: FaultTolerantLlama) -> dict:
    """The devices as they describe themselves, and who holds which KV head twice."""
    a, infos = model.assignment, model.describe()
    return {"devices": len(a.devices), "leader": model.leader,
            "assignment": [{"device": d, "heads": a.describe_heads(d),
                            "kv_heads": ", ".join(str(g + 1) for g in a.kv_heads(d)),
                            "mlp": ", ".join(f"{s}-{e}" for s, e in a.mlp[d]),
                            "weight_bytes": infos[d].weight_bytes, "standby_bytes": infos[d].standby_bytes}
                           for d in a.devices],
            "duplicated_kv": "; ".join(f"KV head {g + 1} on " + ", ".join(f"Device-{d}" for d in ds)
                                       for g, ds in a.duplicated_kv_heads().items())}


def comparison_rows(outcomes: Sequence[StrategyOutcome], shared_phases: dict[str, float]) -> list[dict]:
    """One row per strategy. `interruption_s` is what a user waited in this run with that strategy,
    the sum of `interruption_phases`: detection, re-forming the group and inheriting weights (shared
    by every strategy, measured once), its KV rebuild (median) and the abandoned step redone; the
    samples behind each phase are in `interruption_samples`."""
    baseline = next((o for o in outcomes if o.name == "full-recompute" and o.timing), None)
    rows = []
    for o in outcomes:
        kv = o.kv
        row = {"name": o.name, "keeps": o.keeps, "flops": o.flops, "reuse_rate": o.reuse_rate,
               "kept_bytes": o.kept_bytes,
               "kept_heads_max_abs_diff": kv.kept_max_abs_diff if kv else None,
               "rebuilt_heads_max_rel_error": kv.rebuilt_max_rel_error if kv else None,
               "rebuilt_heads_tolerance": kv.tolerance if kv else None,
               "logits_max_rel_diff": o.logits_max_rel_diff if kv else None,
               "logits_tolerance": o.logits_tolerance if kv else None, "verdict": o.verdict(),
               "tokens_identical": o.tokens_identical, "continuation_ids": o.continuation,
               "near_tie_mismatches": list(o.near_tie_mismatches),
               "lossless": o.lossless, "error": o.error, "speedup": None, "flop_ratio": None, "flop_ratio_note": None,
               "redo_s": o.redo_s if kv else None, "interruption_s": None, "interruption_phases": None,
               "interruption_ratio": None}
        if o.timing:
            row |= o.timing.as_json()
            if kv:
                row |= interruption(shared_phases, o.timing.seconds, o.redo_s)
        if baseline and o.timing:
            row["speedup"] = baseline.timing.median / o.timing.median
            if o.flops:
                row["flop_ratio"] = baseline.flops / o.flops
            else:
                row["flop_ratio_note"] = "no FLOPs: the strategy copies or promotes state, it computes nothing"
        rows.append(row)
    add_interruption_ratios(rows, "name")
    return rows


def device_level_row(d) -> dict | None:
    if d is None:
        return None
    return {"device": d.device, "all_query_heads": d.all_query_heads, "inherited_query_heads": d.inherited_query_heads,
            "all_kv_heads": d.all_kv_heads, "inherited_kv_heads": d.inherited_kv_heads,
            "rebuild_all_median_s": d.rebuild_all.median, "rebuild_inherited_median_s": d.rebuild_inherited.median,
            "rebuild_all": d.rebuild_all.as_json(), "rebuild_inherited": d.rebuild_inherited.as_json(),
            "speedup": d.speedup}


def describe_text(model, prompt: str, prompt_ids: list[int], before: list[int], reference: list[int], outcomes,
                  fail_after: int) -> dict:
    decode = model.tokenizer.decode
    return {"prompt": prompt, "prompt_ids": prompt_ids, "before_ids": before, "before_text": decode(before),
            "reference_ids": reference, "reference_text": decode(reference),
            "reference_after_ids": reference[fail_after:],
            "after_ids": {o.name: o.continuation for o in outcomes if o.error is None},
            "after_texts": {o.name: decode(before + o.continuation) for o in outcomes if o.error is None}}


def describe_environment() -> dict:
    return {"python": platform.python_version(), "torch": torch.__version__,
            "threads": f"{torch.get_num_threads()} intra-op in the main thread, 1 per device",
            "cpu": cpu_name(), "cpu_features": cpu_features(), "cores": os.cpu_count(), "platform": platform.platform()}
