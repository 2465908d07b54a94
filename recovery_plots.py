"""Pictures of a recovery: a per-device timeline of one run, and recovery time against context length.

A table says how long recovery took; the timeline shows where the time went (detection, weight
loading, KV rebuild, resumed generation) and the context plot shows how each strategy scales.
Drawn with matplotlib's Agg canvas (no display, no pyplot state); files are written atomically.
"""
from __future__ import annotations

import math
import os
import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.transforms import blended_transform_factory

Event = tuple[float, int, str, float]  # (time, device, kind, duration): fault_tolerant_cluster.EventLog

REBUILD = "rebuild KV"
SPAN_COLOURS = {"compute": "#9bb7d4", "load weights": "#f28e2b", "stalled": "#edc948", "regroup": "#7f7f7f",
                REBUILD: "#59a14f"}
STRATEGY_COLOURS = {"full-recompute": "#b07aa1", "reuse-replay": "#9c755f", "reuse-hidden": "#59a14f",
                    "replicate": "#17becf"}
SPARE_COLOURS = ("#ff9da7", "#76b7b2", "#bab0ac", "#e15759")
DETECTION_COLOUR = "#e15759"
RESUMED_COLOUR = "#2ca02c"


# --------------------------------------------------------------------------------------------
# Reading a run's events


@dataclass(frozen=True)
class Span:
    device: int
    kind: str     # 'compute', 'regroup', 'load weights', 'stalled' or 'rebuild KV' (strategy in `label`)
    label: str    # legend label: the kind, or the strategy of a rebuild
    start: float  # seconds after the first event
    duration: float

    @property
    def end(self) -> float:
        return self.start + self.duration


@dataclass(frozen=True)
class Detection:
    device: int
    died: float      # seconds after the first event
    declared: float  # when the monitor declared it dead

    @property
    def latency(self) -> float:
        return self.declared - self.died


@dataclass(frozen=True)
class Timeline:
    devices: tuple[int, ...]
    spans: tuple[Span, ...]
    beats: Mapping[int, tuple[float, ...]]
    died: tuple[tuple[int, float], ...]
    declared: tuple[tuple[int, float], ...]
    detections: tuple[Detection, ...]
    resumed: float | None  # the first compute after the last KV rebuild
    end: float


def read_events(events: Iterable[Event]) -> Timeline:
    """Sort a run's events into spans, beats and failure marks, in seconds after the first event."""
    ordered = sorted(events, key=lambda e: e[0])
    if not ordered:
        raise ValueError("no events to plot")
    t0 = ordered[0][0]
    spans: list[Span] = []
    beats: dict[int, list[float]] = defaultdict(list)
    died: list[tuple[int, float]] = []
    declared: list[tuple[int, float]] = []
    for at, device, kind, duration in ordered:
        t = at - t0
        if kind == "beat":
            beats[device].append(t)
        elif kind == "died":
            died.append((device, t))
        elif kind == "declared dead":
            declared.append((device, t))
        elif kind.startswith(REBUILD):
            label = kind[len(REBUILD):].lstrip(": ").strip() or REBUILD
            spans.append(Span(device, REBUILD, label, t, duration))
        else:
            spans.append(Span(device, kind, kind, t, duration))
    devices = tuple(sorted({e[1] for e in ordered}))
    end = max([s.end for s in spans] + [e[0] - t0 for e in ordered])
    return Timeline(devices, tuple(spans), {d: tuple(b) for d, b in beats.items()}, tuple(died), tuple(declared),
                    pair_detections(died, declared), resumed_at(spans), end)


def pair_detections(died: Sequence[tuple[int, float]], declared: Sequence[tuple[int, float]]) -> tuple[Detection, ...]:
    """Each death with the first declaration of the same device after it."""
    pairs = []
    for device, t in died:
        later = [d for dev, d in declared if dev == device and d >= t]
        if later:
            pairs.append(Detection(device, t, min(later)))
    return tuple(pairs)


def resumed_at(spans: Sequence[Span]) -> float | None:
    """Start of the first compute span after the end of the last KV rebuild (None without a rebuild)."""
    rebuilds = [s.end for s in spans if s.kind == REBUILD]
    if not rebuilds:
        return None
    after = [s.start for s in spans if s.kind == "compute" and s.start >= max(rebuilds)]
    return min(after) if after else None


def span_colour(span: Span, spare: dict[str, str]) -> str:
    if span.kind != REBUILD:
        return SPAN_COLOURS.get(span.kind, "#bab0ac")
    if span.label in STRATEGY_COLOURS or span.label == REBUILD:
        return STRATEGY_COLOURS.get(span.label, SPAN_COLOURS[REBUILD])
    if span.label not in spare:
        spare[span.label] = SPARE_COLOURS[len(spare) % len(SPARE_COLOURS)]
    return spare[span.label]


# --------------------------------------------------------------------------------------------
# The timeline


def plot_timeline(events: Iterable[Event], path: str | Path, title: str,
                  rebuild_medians: Mapping[str, float] | None = None) -> Path:
    """One row per device (Device-0 on top): spans as bars, heartbeats as ticks, failures marked.

    When the recovery is a small part of a long run, a second panel zooms on it: from the failure
    to the resumed generation. The detection window is shaded and its latency written on it.
    A device's rebuild bar is its own part of the rebuild; the legend gives beside it the whole
    rebuild's median as the report times it (`rebuild_medians`, from the leader's order to the
    last device's answer), so that the two are not mistaken for each other.
    """
    timeline = read_events(events)
    window = recovery_window(timeline)
    zoom = window is not None and window[1] - window[0] < ZOOM_BELOW * timeline.end
    height = 1.2 + 0.55 * len(timeline.devices)
    figure = new_figure((13, height * (2 if zoom else 1) + 1.6))
    axes = figure.subplots(2 if zoom else 1, 1, squeeze=False)[:, 0]
    spare: dict[str, str] = {}
    draw_timeline(axes[0], timeline, spare, None, detailed=not zoom, subtitle="whole run" if zoom else "")
    if zoom:
        draw_timeline(axes[1], timeline, spare, window, detailed=True, subtitle="the recovery, zoomed")
        mark_window(axes[0], window)
    axes[-1].set_xlabel("seconds since the first event")
    figure.suptitle(title, fontsize=13)
    handles = legend_handles(timeline, spare, rebuild_medians or {})
    figure.legend(handles=handles, loc="outside lower center", ncol=min(3, len(handles)), fontsize=9,
                  frameon=False)
    return save(figure, path)


ZOOM_BELOW = 0.6  # zoom on the recovery when it spans less than this share of the run


def recovery_window(timeline: Timeline) -> tuple[float, float] | None:
    """From just before the first failure to just after generation resumed (None without a failure)."""
    if not timeline.died:
        return None
    start = min(t for _, t in timeline.died)
    stop = timeline.resumed
    if stop is None:
        rebuilds = [s.end for s in timeline.spans if s.kind == REBUILD]
        stop = max(rebuilds + [t for _, t in timeline.declared] + [start])
    margin = max(0.04 * (stop - start), 0.01)
    return start - margin, min(stop + 3 * margin, timeline.end + margin)


def draw_timeline(ax, timeline: Timeline, spare: dict[str, str], window: tuple[float, float] | None,
                  detailed: bool, subtitle: str) -> None:
    """Bars, ticks and marks on one panel; `detailed` adds the written labels (on one panel only)."""
    rows = {device: i for i, device in enumerate(timeline.devices)}  # the y axis is inverted below
    for span in timeline.spans:
        colour = span_colour(span, spare)
        edge = "white" if span.kind == "compute" else colour  # steps apart; short rebuilds still visible
        ax.broken_barh([(span.start, max(span.duration, 0.0))], (rows[span.device] - 0.32, 0.5),
                       facecolors=colour, edgecolors=edge, linewidth=0.5)
    for device, beats in timeline.beats.items():
        ax.vlines(beats, rows[device] + 0.24, rows[device] + 0.42, colors="0.35", linewidth=0.7)
    for detection in timeline.detections:
        ax.axvspan(detection.died, detection.declared, color=DETECTION_COLOUR, alpha=0.12, linewidth=0)
    for _, t in timeline.declared:
        ax.axvline(t, color="black", linewidth=1.2)
    for device, t in timeline.died:
        ax.plot([t], [rows[device] - 0.07], marker="X", markersize=11, color=DETECTION_COLOUR,
                markeredgecolor="black", markeredgewidth=0.6, zorder=5, linestyle="none")
    if timeline.resumed is not None:
        ax.axvline(timeline.resumed, color=RESUMED_COLOUR, linewidth=1.4, linestyle="--")
    ax.set_yticks(range(len(timeline.devices)), [f"Device-{d}" for d in timeline.devices])
    ax.set_ylim(len(timeline.devices) - 0.4, -0.6)  # Device-0 at the top
    ax.set_xlim(*(window or (-0.01 * timeline.end, timeline.end * 1.01)))
    ax.grid(axis="x", color="0.9", linewidth=0.6)
    ax.set_axisbelow(True)
    if detailed:
        label_detections(ax, timeline, rows)
    if subtitle:
        ax.set_title(subtitle, loc="left", fontsize=10, color="0.3", pad=16 if detailed else 4)


def label_detections(ax, timeline: Timeline, rows: Mapping[int, int]) -> None:
    """Latency arrows in the detection windows; names of the vertical lines above the panel."""
    renderer = ax.get_figure().canvas.get_renderer()
    for detection in timeline.detections:
        y = rows[detection.device] - 0.07  # the dead device's row: empty once it has died
        ax.annotate("", xy=(detection.declared, y), xytext=(detection.died, y),
                    arrowprops={"arrowstyle": "<->", "color": DETECTION_COLOUR, "linewidth": 1.2,
                                "shrinkA": 7, "shrinkB": 0})
        label = ax.text((detection.died + detection.declared) / 2, y + 0.12, f"detection {detection.latency:.2f} s",
                        ha="center", va="top", fontsize=9, color="#8b1a1a")
        window = ax.transData.transform([(detection.died, 0), (detection.declared, 0)])
        if label.get_window_extent(renderer).width > 0.9 * (window[1][0] - window[0][0]):
            label.remove()  # too wide for the window: write it after the declaration, on the same row
            ax.annotate(f"detection {detection.latency:.2f} s", xy=(detection.declared, y), xytext=(6, 0),
                        textcoords="offset points", ha="left", va="center", fontsize=9, color="#8b1a1a")
    # "declared dead" reads leftwards over the (empty) detection window, "resumed" rightwards
    labels = [(t, f"Device-{device} declared dead", "black", "right") for device, t in timeline.declared]
    if timeline.resumed is not None:
        labels.append((timeline.resumed, "generation resumed", "#1b6b1b", "left"))
    place_top_labels(ax, labels)


def place_top_labels(ax, labels: Sequence[tuple[float, str, str, str]]) -> None:
    """Write each (x, text, colour, side) label just above the panel at x, on the preferred side
    unless it would leave the panel, and one level higher if it would overlap one already placed."""
    renderer = ax.get_figure().canvas.get_renderer()
    top = blended_transform_factory(ax.transData, ax.transAxes)
    frame = ax.get_window_extent(renderer)
    placed: list = []
    for x, text, colour, side in sorted(labels):
        for level in range(4):
            label = ax.text(x, 1.01 + 0.09 * level, f" {text} ", transform=top, ha=side, va="bottom",
                            fontsize=8.5, color=colour)
            box = label.get_window_extent(renderer)
            if box.x0 < frame.x0 or box.x1 > frame.x1:  # flip to the other side of the line
                label.set_horizontalalignment("left" if side == "right" else "right")
                box = label.get_window_extent(renderer)
            if not any(box.overlaps(other) for other in placed) or level == 3:
                placed.append(box)
                break
            label.remove()


def mark_window(ax, window: tuple[float, float]) -> None:
    """Outline, on the whole-run panel, the part that the zoomed panel shows."""
    ax.axvspan(*window, facecolor="none", edgecolor="0.3", linestyle=":", linewidth=1.0)


def legend_handles(timeline: Timeline, spare: dict[str, str], whole: Mapping[str, float]) -> list:
    """Legend entries for what the picture holds; a rebuild's entry gives the median of one
    device's own part and, where known, of the whole rebuild (`whole`, by strategy)."""
    seen: dict[str, str] = {}
    for span in timeline.spans:
        name = span.label if span.kind == REBUILD else span.kind
        if span.kind == REBUILD:
            runs, own = rebuild_median(timeline, span.label)
            name = f"rebuild KV: {name}" if name != REBUILD else name
            name += f" (x{runs}; a device's part: median {seconds(own)}"
            name += f"; whole rebuild: {seconds(whole[span.label])})" if span.label in whole else ")"
        seen.setdefault(name, span_colour(span, spare))
    order = ["compute", "regroup", "load weights", "stalled"]
    handles: list = [Patch(color=seen[k], label=k) for k in order if k in seen]
    handles += [Patch(color=c, label=k) for k, c in seen.items() if k not in order]
    handles.append(Line2D([], [], color="0.35", marker="|", linestyle="none", markersize=8, label="heartbeat"))
    if timeline.died:
        handles.append(Line2D([], [], color=DETECTION_COLOUR, marker="X", markeredgecolor="black", linestyle="none",
                              markersize=9, label="device died"))
        handles.append(Patch(color=DETECTION_COLOUR, alpha=0.2, label="detection window"))
    if timeline.declared:
        handles.append(Line2D([], [], color="black", linewidth=1.2, label="declared dead"))
    if timeline.resumed is not None:
        handles.append(Line2D([], [], color=RESUMED_COLOUR, linewidth=1.4, linestyle="--",
                              label="generation resumed"))
    return handles


def rebuild_median(timeline: Timeline, label: str) -> tuple[int, float]:
    """How many times one strategy's rebuild ran, and the median of its spans on the first device
    that ran it (a device's own part: the whole rebuild also waits for the slowest device)."""
    runs = [s for s in timeline.spans if s.kind == REBUILD and s.label == label]
    first = min(s.device for s in runs)
    own = [s.duration for s in runs if s.device == first]
    return len(own), statistics.median(own)


def seconds(value: float) -> str:
    return f"{value * 1e3:.0f} ms" if value < 1 else f"{value:.2f} s"


# --------------------------------------------------------------------------------------------
# The whole interruption per strategy


PHASE_COLOURS = {"detection_s": DETECTION_COLOUR, "regroup_s": SPAN_COLOURS["regroup"],
                 "weights_s": SPAN_COLOURS["load weights"], "rebuild_s": SPAN_COLOURS[REBUILD],
                 "redo_s": SPAN_COLOURS["compute"]}
PHASE_LABELS = {"detection_s": "detect", "regroup_s": "regroup", "weights_s": "weights", "rebuild_s": "rebuild KV",
                "redo_s": "redo the step"}


def plot_phases(rows: Sequence[Mapping[str, Any]], path: str | Path, title: str) -> Path:
    """One horizontal bar per strategy, its whole interruption stacked phase by phase (the report's
    first screen as a picture): where a user's wait goes, and what each strategy cuts of it.

    Each row needs 'name', 'interruption_s' and 'interruption_phases' (rows without them, a
    strategy that could not run, are left out).
    """
    rows = [r for r in rows if r.get("interruption_phases")]
    if not rows:
        raise ValueError("no interruption to plot")
    figure = new_figure((11, 1.6 + 0.7 * len(rows)))
    ax = figure.subplots()
    for y, row in enumerate(rows):
        left = 0.0
        for key, colour in PHASE_COLOURS.items():
            width = row["interruption_phases"].get(key, 0.0)
            ax.barh(y, width, left=left, color=colour, edgecolor="white", linewidth=0.6, height=0.6)
            left += width
        ax.text(left, y, f"  {row['interruption_s']:.2f} s", va="center", ha="left", fontsize=9)
    ax.set_yticks(range(len(rows)), [r["name"] for r in rows])
    ax.set_ylim(len(rows) - 0.4, -0.6)  # the first strategy on top, as in the report
    ax.set_xlim(0, max(r["interruption_s"] for r in rows) * 1.15)
    ax.set_xlabel("seconds from the crash to the next token (each phase measured in the run)")
    ax.grid(axis="x", color="0.88", linewidth=0.6)
    ax.set_axisbelow(True)
    figure.suptitle(title, fontsize=11)
    figure.legend(handles=[Patch(color=c, label=PHASE_LABELS[k]) for k, c in PHASE_COLOURS.items()],
                  loc="outside lower center", ncol=len(PHASE_COLOURS), fontsize=9, frameon=False)
    return save(figure, path)


# --------------------------------------------------------------------------------------------
# Recovery time against context length


REASSIGN_STYLES = {"random": "-", "balanced": "--"}
DEVICE_MARKERS = ("o", "s", "^", "D", "v")


def plot_recovery_vs_context(rows: Sequence[Mapping[str, Any]], path: str | Path, title: str | None = None,
                             measure: str = "median_s", ylabel: str = "KV rebuild time, median",
                             caption: str | None = None) -> Path:
    """Recovery seconds (log scale) against context length, one line per strategy: the rebuild's
    median, or another `measure` of the rows (e.g. 'interruption_s', the whole interruption).

    Each row needs 'strategy', 'context' and `measure`; 'reassign' and 'devices' (if present)
    give separate lines (line style and marker); with the median, 'min_s' and 'max_s' (if
    present) give bars. `caption`, written under the plot, says what was run and when. Both log
    axes carry labelled ticks to read values from (the y axis at least three, see readable_log_ticks).
    """
    if not rows:
        raise ValueError("no rows to plot")
    groups: dict[tuple[str, str, int], list[Mapping[str, Any]]] = defaultdict(list)
    for row in rows:
        groups[(row["strategy"], str(row.get("reassign", "")), int(row.get("devices", 0)))].append(row)
    strategies = list(dict.fromkeys(row["strategy"] for row in rows))
    reassigns = list(dict.fromkeys(key[1] for key in groups))
    device_counts = sorted({key[2] for key in groups})
    spare: dict[str, str] = {}
    colours = {s: STRATEGY_COLOURS.get(s) or spare.setdefault(s, SPARE_COLOURS[len(spare) % len(SPARE_COLOURS)])
               for s in strategies}
    markers = {n: DEVICE_MARKERS[i % len(DEVICE_MARKERS)] for i, n in enumerate(device_counts)}
    styles = {r: REASSIGN_STYLES.get(r, (":", "-.")[i % 2]) for i, r in enumerate(reassigns)}

    figure = new_figure((9, 5.8))
    ax = figure.subplots()
    variants = sorted({key[1:] for key in groups}, key=lambda v: (v[1], reassigns.index(v[0])))
    for (strategy, reassign, devices), group in groups.items():
        group = sorted(group, key=lambda r: r["context"])
        # dodge: each (reassign, devices) variant a little to the side, so that bars do not hide each other
        dodge = 2 ** (0.035 * (variants.index((reassign, devices)) - (len(variants) - 1) / 2))
        x = [r["context"] * dodge for r in group]
        y = [r[measure] for r in group]
        errors = None
        if measure == "median_s" and all("min_s" in r and "max_s" in r for r in group):
            errors = [[r["median_s"] - r["min_s"] for r in group], [r["max_s"] - r["median_s"] for r in group]]
        baseline = strategy == "full-recompute"  # drawn wide and below: reuse-replay often lies on top of it
        ax.errorbar(x, y, yerr=errors, color=colours[strategy], linestyle=styles[reassign],
                    marker=markers[devices], markersize=8 if baseline else 6, linewidth=3.4 if baseline else 1.6,
                    capsize=3, elinewidth=0.8, zorder=1 if baseline else 2)
    contexts = sorted({r["context"] for r in rows})
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(contexts, [str(c) for c in contexts])
    yticks, ylimits = readable_log_ticks(*ax.get_ylim())
    ax.set_ylim(*ylimits)
    ax.set_yticks(yticks, [f"{t:g}" for t in yticks])
    ax.minorticks_off()
    ax.set_xlabel("context length (tokens); variants drawn slightly apart")
    ax.set_ylabel(f"{ylabel} (s, log scale)")
    ax.grid(True, which="major", color="0.88", linewidth=0.6)
    figure.suptitle(title or "KV-cache rebuild time after a device failure", fontsize=12)
    if caption:
        figure.supxlabel(caption, fontsize=8, color="0.35", wrap=True)

    handles: list = [Line2D([], [], color=colours[s], linewidth=2.5, label=s) for s in strategies]
    if len(reassigns) > 1 or reassigns != [""]:
        handles += [Line2D([], [], color="0.3", linestyle=styles[r], label=f"{r} reassignment")
                    for r in reassigns if r]
    if len(device_counts) > 1 or device_counts != [0]:
        handles += [Line2D([], [], color="0.3", marker=markers[n], linestyle="none", label=f"{n} devices")
                    for n in device_counts if n]
    if measure == "median_s" and any(r.get("min_s", r["median_s"]) < r.get("max_s", r["median_s"]) for r in rows):
        handles.append(Line2D([], [], color="0.3", marker="|", markersize=10, linestyle="none",
                              label="bar: min to max"))
    figure.legend(handles=handles, loc="outside right center", fontsize=9, frameon=False)
    return save(figure, path)


# the labelled ticks of a decade, coarse to fine: 1; 1 2 5; 1..9; then steps of 0.5, 0.2, 0.1 (times 10^k)
LOG_TICK_MANTISSAS = ((1,), (1, 2, 5), tuple(range(1, 10)), *(tuple(i / n for i in range(n, 10 * n)) for n in (2, 5, 10)))


def readable_log_ticks(low: float, high: float) -> tuple[list[float], tuple[float, float]]:
    """Ticks to label on a log axis from `low` to `high` (> 0), and the limits to draw: the coarsest
    mantissas that put at least four ticks in the range (a range within one decade would otherwise
    show a single '10', or none, and three ticks over a decade leave 6 s and 8 s apart unreadable);
    a range too narrow even for steps of 0.1 is widened to the ticks around it."""
    decades = range(math.floor(math.log10(low)) - 1, math.ceil(math.log10(high)) + 1)
    for mantissas in LOG_TICK_MANTISSAS:
        candidates = sorted(m * 10.0 ** e for e in decades for m in mantissas)
        inside = [t for t in candidates if low <= t <= high]
        if len(inside) >= max(4, 2 * math.log10(high / low)):  # and two a decade over wide ranges
            return inside, (low, high)
    below, above = max(t for t in candidates if t <= low), min(t for t in candidates if t >= high)
    return [t for t in candidates if below <= t <= above], (below, above)


# --------------------------------------------------------------------------------------------


def new_figure(size: tuple[float, float]) -> Figure:
    """A figure on its own Agg canvas (no pyplot, no global backend), laid out without overlaps."""
    figure = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def save(figure: Figure, path: str | Path, dpi: int = 130) -> Path:
    """Write the figure as PNG atomically: a temporary file beside it, then os.replace."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        figure.savefig(tmp, format="png", dpi=dpi)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
