"""The report's sections for many requests in flight (`--requests N`): the batch per strategy, request
by request, and its lossless checks. recovery_report.py renders the rest and calls these.
"""
from __future__ import annotations

from recovery_report import Report, heading, lossless_section


def render_batch(r: Report) -> str:
    """Many requests: per strategy what its runs preempted and kept lossless, and how many of the
    longest request the budget holds with its state kept; the KV in flight; then request by request."""
    b, rows = r["batch"], r["comparison"]
    names = [row["name"] for row in rows]
    lines = [heading("4. Many requests: every strategy on the same workload and failure"),
             f"in flight at the failure: {b['running_at_failure']} requests running ({b['kv_positions_in_flight']} "
             f"positions in {b['kv_blocks_in_flight']} KV blocks of {b['scheduling']['block_size']}), "
             f"{b['waiting_at_failure']} waiting, {b['finished_before_failure']} finished; the failure-free run "
             f"took {b['steps']} steps and preempted {b['reference_preemptions']}",
             f"{'strategy':<16}{'rebuild s':>10}{'preempted':>10}{'lossless':>10}{'kept MB':>9}"
             f"{'pool blocks':>12}{'holds longest':>14}"]
    for row in rows:
        if row["error"]:
            lines.append(f"{row['name']:<16}  could not run: {row['error']}")
            continue
        lines.append(f"{row['name']:<16}{row['median_s']:>10.4f}{'/'.join(map(str, row['preemptions'])):>10}"
                     f"{row['requests_lossless']:>7}/{len(r['requests']):<2}{row['kept_bytes'] / 1e6:>9.2f}"
                     f"{row['capacity_blocks']:>12}{row['capacity_requests']:>14}")
    lines.append("rebuild s: median of the runs; preempted: by the scheduler and the recovery, per run; lossless: "
                 "requests whose every token equals the failure-free run's, or differs only from a near-tie of it on "
                 "('tie' below), and whose kept KV is the same bits; "
                 "kept MB: the strategy's kept state for the blocks in flight (all survivors, counted from shapes); "
                 "pool blocks and holds longest: each device's pool, and the longest requests it holds at once, "
                 "with only this strategy's state kept")
    lines.append(f"{'request':>7}{'joins':>6}{'prompt':>7}{'output':>7}  " + "  ".join(names))
    for q in r["requests"]:
        verdicts = "  ".join(f"{request_verdict(q, name):<{len(name)}}" for name in names)
        lines.append(f"{q['request']:>7}{q['joins_at_step']:>6}{len(q['prompt_ids']):>7}"
                     f"{len(q['reference_ids']):>7}  {verdicts}".rstrip())
    return "\n".join(lines)


def request_verdict(request: dict, strategy: str) -> str:
    """'yes' (every token the failure-free run's), 'tie' (lossless, differing from a near-tie on), 'NO'."""
    if not request["lossless"].get(strategy):
        return "NO"
    return "tie" if request["near_tie"].get(strategy) else "yes"


def batch_lossless(r: Report) -> str:
    return lossless_section(
        r, "5. Lossless checks (every request against the failure-free run of the same workload)",
        "every request's tokens must be the failure-free run's, or differ only from a near-tie of it on (its "
        "top-2 margin at the first divergent token within twice the logits bound times that row's largest "
        "|logit|: listed in near_tie_requests); of the requests running before and after the "
        "recovery, kept KV must be the same bits and each rebuilt (layer, KV head), K and V apart, is bounded "
        "relative to its own largest |value|",
        lambda row: f" over {row['requests_kv_checked']} requests; lossless for {row['requests_lossless']} of "
                    f"{len(r['requests'])} requests")
