"""The serving benchmark's pictures, from its JSON runs: output tokens per second over time (one line
per run, the failure marked), and each request's TTFT and longest stall against its arrival time.
Drawn as recovery_plots.py draws (its Agg figure and atomic save, its strategy colours).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from recovery_plots import SPARE_COLOURS, STRATEGY_COLOURS, new_figure, save

BASELINE_COLOURS = {"none": "#4e79a7", "abort": "#e15759"}


def run_label(run: Mapping[str, Any]) -> str:
    return run["strategy"] + (" + standby" if run.get("standby_weights") else "")


def run_colours(runs: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """One colour per run: the strategy's (as in the recovery pictures), a spare one for a second run of it."""
    colours, spare = {}, iter(SPARE_COLOURS * 4)
    for run in runs:
        known = {**BASELINE_COLOURS, **STRATEGY_COLOURS}[run["strategy"]]
        colours[run_label(run)] = known if known not in colours.values() else next(spare)
    return colours


def plot_throughput(runs: Sequence[Mapping[str, Any]], path: Path, caption: str) -> Path:
    """Output tokens per second (`output_tokens_per_s`: 1 s bins) against time, one line per run, each
    failure a dashed line."""
    figure, colours = new_figure((9, 4.5)), run_colours(runs)
    ax = figure.add_subplot()
    for run in runs:
        colour, rate = colours[run_label(run)], run["output_tokens_per_s"]
        ax.plot(range(len(rate) + 1), [*rate, rate[-1]], color=colour, label=run_label(run), linewidth=1.4,
                drawstyle="steps-post")
        if run.get("failure_s") is not None:
            ax.axvline(run["failure_s"], color=colour, linestyle="--", linewidth=0.9)
    ax.set_xlabel("seconds from the start (dashed: the device failed)")
    ax.set_ylabel("output tokens per second")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    ax.set_title("Output throughput over time", fontsize=10)
    figure.suptitle(caption, fontsize=6)
    return save(figure, path)


def plot_requests(runs: Sequence[Mapping[str, Any]], path: Path, caption: str) -> Path:
    """Each completed request's TTFT and longest stall against its arrival (failed ones left out)."""
    figure, colours = new_figure((9, 6.5)), run_colours(runs)
    ttft_ax, stall_ax = figure.subplots(2, 1, sharex=True)
    for run in runs:
        colour, label = colours[run_label(run)], run_label(run)
        arrivals = run["arrivals_s"]
        ttfts = [(a, t * 1000) for a, t in zip(arrivals, run["ttfts"]) if t is not None]
        stalls = [(a, s) for a, s in zip(arrivals, run["longest_stall_ms_per_request"]) if s is not None]
        for ax, points in ((ttft_ax, ttfts), (stall_ax, stalls)):
            if points:
                ax.scatter(*zip(*points), s=12, color=colour, label=label)
            if run.get("failure_s") is not None:
                ax.axvline(run["failure_s"], color=colour, linestyle="--", linewidth=0.9)
    ttft_ax.set_ylabel("TTFT ms")
    stall_ax.set_ylabel("longest stall ms")
    stall_ax.set_xlabel("arrival, seconds from the start (dashed: the device failed)")
    for ax in (ttft_ax, stall_ax):
        ax.set_yscale("log")
    ttft_ax.legend(fontsize=8)
    ttft_ax.set_title("Each completed request: time to first token and longest stall", fontsize=10)
    figure.suptitle(caption, fontsize=6)
    return save(figure, path)


def picture_paths(json_path: Path) -> tuple[Path, Path]:
    """Beside the JSON, named after it."""
    return json_path.with_suffix(".throughput.png"), json_path.with_suffix(".requests.png")
