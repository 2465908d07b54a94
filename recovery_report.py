"""The report of a run: one dict of measured figures, rendered as text (report_files.py writes it
with its JSON twin).

The text is rendered from the same dict that is saved as JSON, so the two never disagree.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from interruption_phases import PHASES

Report = dict[str, Any]


FAULT_PAST = {"crash": "crashed", "hang": "hung", "wedge": "wedged"}  # failure.mode, as the report says it


def inheritance_rate(failure: dict) -> str:
    """' (N MB, X MB/s)' for the inherited slices, when the run says how much was read."""
    read, seconds = failure.get("weight_bytes_inherited"), failure["weight_load_seconds"]
    if not read or seconds <= 0:
        return ""
    source = "from standby, read before the failure" if failure.get("weights_from_standby") else "written"
    return f" ({read / 1e6:.0f} MB {source}, {read / 1e6 / seconds:.0f} MB/s)"


def copy_yardstick(system: dict) -> str:
    """The machine's measured conversion bandwidth, the yardstick for the inheritance rate."""
    c = system.get("copy_bandwidth")
    if not c:
        return ""
    return (f"this machine converts {c['source_dtype']} to {c['target_dtype']} on one thread at "
            f"{c['fresh_bytes_per_s'] / 1e6:.0f} MB/s into new memory (each page faulted in, as a new slice is) "
            f"and {c['warm_bytes_per_s'] / 1e6:.0f} MB/s into memory already touched (measured in this run)")


# --------------------------------------------------------------------------------------------
# Rendering


def render(report: Report) -> str:
    if report.get("batch"):
        from batch_report import batch_lossless, render_batch  # it builds on this module's helpers
        middle = [render_batch(report), batch_lossless(report)]
    else:
        middle = [render_comparison(report), _device_level(report), _overhead(report), _lossless(report), _text(report)]
    sections = [_title(report), render_interruption(report), _model(report), _system(report), _failure(report),
                *middle, _environment(report)]
    return "\n\n".join(s for s in sections if s) + "\n"


def render_summary(report: Report) -> str:
    """What --quiet prints: the first screen and the table of the strategies (the rebuild's, or the batch's)."""
    if report.get("batch"):
        from batch_report import render_batch
        return render_interruption(report) + "\n\n" + render_batch(report)
    return render_interruption(report) + "\n\n" + render_comparison(report)


def heading(title: str) -> str:
    return f"{title}\n{'-' * len(title)}"


def _title(r: Report) -> str:
    title = "Losing a device mid-generation: the whole interruption, phase by phase, and the KV-cache rebuild"
    return (f"{title}\n{'=' * len(title)}\n"
            f"Every figure below was measured in this run ({r['run']['started']}), "
            f"unless it is marked as counted from shapes.")


def measured_on(r: Report) -> str:
    """One line that says what the figures were measured on, to be quoted with them."""
    m, s, e = r["model"], r["system"], r["environment"]
    kind = "random weights, real shapes" if m["synthetic"] else "real weights"
    cpu = e["cpu"] + (f" with {e['cpu_features']}" if e.get("cpu_features") else "")
    return (f"Measured on: {m.get('name', Path(m['path']).name)} ({kind}), {r['run']['backend']} backend, "
            f"{s['devices']} devices, {r['failure'].get('detector', 'timeout')} detector, {m['compute_dtype']}, "
            f"{_context_at_failure(r)}; {cpu}, {e['cores']} cores; commit {r['run'].get('commit', 'unknown')}; "
            f"{r['run']['started'][:10]}")


def _context_at_failure(r: Report) -> str:
    b = r.get("batch")
    if b:
        return (f"{b['requests']} requests, {b['running_at_failure']} running and {b['kv_positions_in_flight']} "
                f"positions ({b['kv_blocks_in_flight']} KV blocks) in flight at the failure")
    return f"{r['comparison_meta']['context_tokens']}-token context at the failure"


def render_interruption(r: Report) -> str:
    """The first screen: what losing the device cost this run, end to end, phase by phase, and what
    each strategy saved of it against full recomputation; it says what it was measured on and how
    many samples each figure is, so that it can be quoted on its own."""
    f, rows = r["failure"], [row for row in r["comparison"] if row.get("interruption_phases")]
    if not rows:
        return ""
    full = next((row for row in rows if row["name"] == "full-recompute"), None)
    fault = f.get("mode", "crash")
    batch = bool(r.get("batch"))
    lines = [heading(f"What losing Device-{f['device']} cost: from the {fault} to the next "
                     f"{'step of the batch' if batch else 'token'}"), measured_on(r),
             f"{'strategy':<16}" + "".join(f"{label:>9}" for _, label in PHASES) + f"{'total s':>10}"
             + ("   saved against full recompute" if full else "")]
    for row in rows:
        phases = row["interruption_phases"]
        saved = ""
        if full and row is not full:
            saved = f"   {full['interruption_s'] - row['interruption_s']:.3f} s ({_percent(row)})"
        lines.append(f"{row['name']:<16}" + "".join(f"{phases[key]:>9.3f}" for key, _ in PHASES)
                     + f"{row['interruption_s']:>10.3f}{saved}")
    lines.append(f"detect: {fault} to declared dead ({f.get('detector', 'timeout')} detector; declared by "
                 f"{f['declared_by']}); regroup: fencing, the survivors' first call on the new group and their "
                 f"agreeing on the context; weights: the new owners' slices; rebuild: the KV cache; redo: the "
                 f"abandoned step, redone, which gives "
                 f"{'every running request its next token' if batch else 'the next token'}. Seconds, each measured in this run.")
    lines.append(_batch_samples(rows) if batch else _samples(rows))
    return "\n".join(lines)


def _percent(row: dict) -> str:
    saved = row.get("interruption_saved_fraction")
    if saved is None:
        return "-"
    return f"{saved:.0%} shorter" if saved >= 0 else f"{-saved:.0%} longer"


def _batch_samples(rows: list[dict]) -> str:
    """With many requests every strategy has runs of its own: each phase is their median."""
    runs = rows[0]["interruption_samples"]["rebuild_s"]["samples"]
    text = (f"Samples: each strategy served the same workload, failing after the same step, {runs} time"
            f"{'s' if runs != 1 else ''} on a fresh cluster; each phase is the median of its runs")
    return text + (f" (rebuild min-max: {_rebuild_ranges(rows)})." if runs > 1 else ".")


def _rebuild_ranges(rows: list[dict]) -> str:
    return ", ".join(f"{row['name']} {row['interruption_samples']['rebuild_s']['min_s']:.3f}-"
                     f"{row['interruption_samples']['rebuild_s']['max_s']:.3f}"
                     for row in rows if row.get("interruption_samples"))


def _samples(rows: list[dict]) -> str:
    """How many samples stand behind each phase, and the rebuild's range where it has several."""
    counts = rows[0].get("interruption_samples") or {}
    rebuild = counts.get("rebuild_s", {}).get("samples", 1)
    ranges = _rebuild_ranges(rows)
    text = ("Samples: detect, regroup and weights are one each, shared by every strategy; redo is one per "
            f"strategy; rebuild is the median of {rebuild} alternating run{'s' if rebuild != 1 else ''}")
    return text + (f" (min-max: {ranges})." if rebuild > 1 and ranges else ".")


def _model(r: Report) -> str:
    m = r["model"]
    c = m["config"]
    kind = "SYNTHETIC (random weights, real shapes)" if m["synthetic"] else "real checkpoint"
    return "\n".join([
        heading("1. Model loading"),
        f"checkpoint        {m['path']}",
        f"kind              {kind}: {m['reason']}",
        f"architecture      {c['num_hidden_layers']} layers, hidden {c['hidden_size']}, "
        f"{c['num_attention_heads']} query heads, {c['num_key_value_heads']} KV heads, head_dim {c['head_dim']}, "
        f"MLP {c['intermediate_size']}, vocab {c['vocab_size']}",
        f"rope              theta {c['rope_theta']}, scaling {c['rope_scaling']}",
        f"tensors           {m['tensor_count']} ({m['stored_bytes'] / 1e9:.3f} GB stored as {m['stored_dtype']})",
        f"compute dtype     {m['compute_dtype']}",
        f"load time         {m['load_seconds']:.2f} s (every device reads only its own slices)",
    ])


def _system(r: Report) -> str:
    s = r["system"]
    backend, accelerator = r["run"].get("backend", "threads"), r["run"].get("accelerator", "cpu")
    collectives = "nccl, one GPU each" if accelerator == "cuda" else "gloo"
    kind = f"OS processes (torch.distributed, {collectives})" if backend == "processes" else "threads of one process"
    lines = [heading("2. System initialisation"),
             f"devices           {s['devices']} {kind}; leader Device-{s['leader']}",
             _workload(r)]
    for d in s["assignment"]:
        standby = f" + {d['standby_bytes'] / 1e6:.1f} MB standby" if d.get("standby_bytes") else ""
        lines.append(f"  Device-{d['device']}: query heads {d['heads']}, KV heads {d['kv_heads']}, "
                     f"MLP columns {d['mlp']}, {d['weight_bytes'] / 1e6:.1f} MB of weight slices{standby}")
    lines.append(f"KV heads held twice: {s['duplicated_kv'] or 'none'}")
    lines += _processes(s.get("processes") or [], r["model"])
    if "prefill_seconds" in s:
        lines.append(f"KV cache filled by the prefill: {s['prefill_seconds']:.3f} s (the failure-free run: the "
                     f"process's first prefill, cold; section 6 compares warm prefills)")
    return "\n".join(lines)


def _workload(r: Report) -> str:
    s, b = r["system"], r.get("batch")
    if not b:
        return f"context           {s['context_tokens']} tokens; {s['new_tokens']} new tokens to generate"
    prompts = [len(q["prompt_ids"]) for q in r["requests"]]
    c = b["scheduling"]
    return (f"workload          {b['requests']} requests, one joining per step: prompts of {min(prompts)}-"
            f"{max(prompts)} tokens, {min(q['new_tokens'] for q in r['requests'])}-{s['new_tokens']} new tokens; "
            f"budgets: {c['max_num_batched_tokens']} tokens and {c['max_num_seqs']} sequences per step, "
            f"{b['pool_blocks']} KV blocks of {c['block_size']} positions per device "
            f"({c['kv_cache_memory_bytes'] / 2**20:.1f} MiB each, with what is kept)")


def _processes(processes: list[dict], model: dict) -> list[str]:
    """Each device process's memory, measured at the end of the run, against the model's size."""
    if not processes:
        return []
    lines = [f"  Device-{p['device']} process {p['pid']}: resident {p['rss_bytes'] / 1e6:.0f} MB "
             f"(peak {p['peak_rss_bytes'] / 1e6:.0f} MB)" for p in processes]
    total = sum(p["rss_bytes"] for p in processes)
    return [f"memory            {len(processes)} device processes, {total / 1e6:.0f} MB resident in all "
            f"(the checkpoint stores {model['stored_bytes'] / 1e6:.0f} MB; each process holds only its slices "
            f"and its own interpreter with torch)"] + lines


def _failure(r: Report) -> str:
    f = r["failure"]
    lines = [heading("3. Failure detection and recovery"),
             f"injected          Device-{f['device']} {FAULT_PAST.get(f['mode'], f['mode'])} in the middle of the "
             f"step after "
             f"{_when(f)}",
             *([f"seen in           {f['seen_in']} (each strategy's runs: the first screen)"] if f.get("seen_in") else []),
             f"heartbeats        every {f['heartbeat_interval_s']} s; {_detector(f)}",
             f"detection         {f['detection_latency_s']:.3f} s from failure to declaration",
             f"declared by       {_declared_by(f)}",
             f"led by            Device-{f['leader']}",
             f"reassignment      {f['reassign']}"]
    lines += [f"  {line}" for line in f["plan"]]
    lines.append(f"regroup           {f.get('regroup_seconds', 0.0):.3f} s to fence the dead device, form the "
                 f"survivors' new group and cut them to the leader's record of the context")
    lines.append(f"weight slices     {f['weight_load_seconds']:.3f} s for the new owners to take what they inherit"
                 + inheritance_rate(f))
    yardstick = copy_yardstick(r["system"])
    if yardstick:
        lines.append(f"                  ({yardstick})")
    if r.get("files", {}).get("timeline"):
        lines.append(f"timeline          {r['files']['timeline']} (every device's work, beats and the failure)")
    return "\n".join(lines)


def _when(f: dict) -> str:
    if f.get("after_steps") is not None:
        return f"{f['after_steps']} scheduler steps, {f['running']} requests running and {f['waiting']} waiting"
    return f"{f['after_tokens']} generated tokens"


def _detector(f: dict) -> str:
    if f.get("detector") == "phi":
        return (f"phi accrual detector, threshold {f['phi_threshold']} (adaptive: from the observed gaps; the "
                f"fixed timeout {f['heartbeat_timeout_s']} s stays the longest silence tolerated)")
    return (f"fixed timeout: declared dead after {f['heartbeat_timeout_s']} s of silence (bound on detection: "
            f"timeout + one interval = {f['heartbeat_timeout_s'] + f['heartbeat_interval_s']:.1f} s)")


def _declared_by(f: dict) -> str:
    signal = f.get("signal")
    silence = "phi accrual" if f.get("detector") == "phi" else "heartbeat timeout"
    stuck = f" in {f['stuck_in']}" if f.get("stuck_in") else ""
    how = {"heartbeat": f"its silence ({silence})", "process-exit": "the launcher seeing its process exit",
           "collective": "a peer's failed collective (its connection closed)",
           "no-progress": f"its lack of progress (it beat on, but its compute was stuck{stuck})"
           }.get(f["declared_by"], f["declared_by"])
    if f.get("mode") == "wedge":
        return how + "; the fault was a really blocked compute thread (no signal)"
    return how + (f"; the fault was a real {signal}" if signal else "; the fault was simulated inside its threads")


def render_comparison(r: Report) -> str:
    rows = r["comparison"]
    lines = [heading("4. KV-cache rebuild: every strategy from the same post-failure state"),
             f"{r['comparison_meta']['repeats']} alternating runs each; context {r['comparison_meta']['context_tokens']} "
             f"tokens; FLOPs counted from shapes",
             f"{'strategy':<16}{'min s':>9}{'median s':>10}{'max s':>9}{'speedup':>9}{'GFLOP':>10}"
             f"{'FLOP ratio':>11}{'reuse':>7}{'kept MB':>9}{'lossless':>10}"]
    for row in rows:
        if row["error"]:
            lines.append(f"{row['name']:<16}  could not run: {row['error']}")
            continue
        lines.append(f"{row['name']:<16}{row['min_s']:>9.4f}{row['median_s']:>10.4f}{row['max_s']:>9.4f}"
                     f"{_ratio(row['speedup']):>9}{row['flops'] / 1e9:>10.2f}{_flop_ratio(row):>11}"
                     f"{row['reuse_rate']:>7.0%}{row['kept_bytes'] / 1e6:>9.1f}{'yes' if row['lossless'] else 'NO':>10}")
    lines.append("speedup = median of full-recompute / median of the strategy; FLOP ratio likewise from FLOPs; "
                 "kept MB = state kept during normal running for the strategy (all survivors)")
    return "\n".join(lines)


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}x"


def _flop_ratio(row: dict) -> str:
    return "no FLOPs" if row.get("flop_ratio_note") else _ratio(row["flop_ratio"])


def _device_level(r: Report) -> str:
    d = r.get("device_level")
    if not d:
        return ""
    return "\n".join([
        heading("5. Device-level comparison (the seed's): the new owner's rebuild from hidden states"),
        f"Device-{d['device']} now holds {d['all_query_heads']} query heads ({d['all_kv_heads']} KV heads), "
        f"of which {d['inherited_query_heads']} inherited ({d['inherited_kv_heads']} KV heads)",
        "both project K and V from the stored layer inputs, every layer, every cached position:",
        f"rebuild all {d['all_kv_heads']} KV heads it now holds, as if it kept nothing ('traditional')  "
        f"median {d['rebuild_all_median_s']:.4f} s",
        f"rebuild only the {d['inherited_kv_heads']} inherited KV heads, keeping its own ('optimized')  "
        f"median {d['rebuild_inherited_median_s']:.4f} s",
        f"speedup                                   {d['speedup']:.2f}x",
    ])


def _overhead(r: Report) -> str:
    o = r.get("overhead")
    if not o:
        return ""
    lines = [heading("6. Cost in normal running (same positions recomputed, modes alternating, warm)")]
    for label, timings, unit, scale in (("prefill of the context", r.get("prefill_overhead"), "s", 1.0),
                                        ("decode step", o, "ms", 1e3)):
        if not timings:
            continue
        base = timings["nothing kept"]["median_s"]
        lines.append(f"{label} ({len(timings['nothing kept']['seconds'])} runs per mode):")
        for mode, t in timings.items():
            extra = "" if mode == "nothing kept" else \
                f"  ({(t['median_s'] - base) * scale:+.3f} {unit}, {(t['median_s'] / base - 1):+.1%})"
            lines.append(f"  {mode:<15} median {t['median_s'] * scale:.3f} {unit}{extra}")
    for name, per_token in r["system"]["kept_bytes_per_token"].items():
        lines.append(f"{name:<15} keeps {per_token / 1024:.1f} KiB per token of context")
    return "\n".join(lines)


def _lossless(r: Report) -> str:
    return lossless_section(
        r, "7. Lossless checks (against a failure-free run of the same prompt)",
        "kept KV must be the same bits; each rebuilt (layer, KV head), K and V apart, is bounded relative "
        "to its own largest |value|; each step after the recovery is fed the failure-free token, and its "
        "logits are bounded relative to theirs and its greedy token must be the failure-free one",
        lambda row: f"; logits max relative difference {row['logits_max_rel_diff']:.3g} (bound "
                    f"{row['logits_tolerance']:.3g}); next {len(r['text']['reference_after_ids'])} tokens "
                    f"{_tokens_verdict(row)}")


def lossless_section(r: Report, title: str, rule: str, detail: Callable[[dict], str]) -> str:
    """The lossless checks, one line per strategy: its kept and rebuilt heads against their bounds,
    then `detail` (what the sequence or the batch adds), and the verdict where it is not lossless."""
    lines = [heading(title), rule]
    for row in r["comparison"]:
        if row["error"]:
            lines.append(f"{row['name']:<16} not run: {row['error']}")
            continue
        lines.append(f"{row['name']:<16} kept heads max |diff| {row['kept_heads_max_abs_diff']:.3g}; rebuilt heads "
                     f"max relative error {row['rebuilt_heads_max_rel_error']:.3g} (bound "
                     f"{row['rebuilt_heads_tolerance']:.3g}){detail(row)}")
        if not row["lossless"]:
            lines.append(f"{'':<16} NOT LOSSLESS: {row['verdict']}")
    return "\n".join(lines)


def _tokens_verdict(row: dict) -> str:
    if row["tokens_identical"]:
        return "identical"
    ties = row.get("near_tie_mismatches")
    if ties:
        steps = ", ".join(str(step + 1) for step in ties)
        return (f"identical but at step {steps}, a near-tie of the failure-free run (top-2 margin within what "
                f"the logits bound lets rounding move): not a loss")
    return "DIFFERENT"


def _text(r: Report) -> str:
    t = r["text"]
    lines = [heading("8. Generated text"),
             f"prompt ({len(t['prompt_ids'])} tokens): {t['prompt']!r}",
             f"before the failure:  {t['before_text']!r}",
             f"failure-free run:    {t['reference_text']!r}",
             "after a recovery, the greedy token of each step (each step fed the failure-free token):"]
    for name, text in t["after_texts"].items():
        lines.append(f"after, {name + ':':<14}{text!r}")
    return "\n".join(lines)


def _environment(r: Report) -> str:
    e = r["environment"]
    number = 6 if r.get("batch") else 9
    return "\n".join([heading(f"{number}. Environment")] + [f"{k:<17} {v}" for k, v in e.items()])
