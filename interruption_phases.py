"""The whole interruption of a recovery, phase by phase: what every report and benchmark sums.

A recovery's interruption runs from the fault to the step that carried it: detection, regroup
(fencing and the survivors' new group), weights (the new owners' slices), the rebuild of the KV
cache and the redo of the abandoned step. Each phase is the median of its samples, the whole their
sum, and every figure says how many samples stand behind it.
"""
from __future__ import annotations

import statistics
from typing import Mapping, Sequence

PHASES = (("detection_s", "detect"), ("regroup_s", "regroup"), ("weights_s", "weights"), ("rebuild_s", "rebuild"),
          ("redo_s", "redo"))


def interruption(shared_phases: dict[str, float], rebuilds: Sequence[float], redo_s: float) -> dict:
    """A strategy's whole interruption (JSON fields): the phases every strategy shares (detection,
    regroup, weights: one sample each), its own rebuild (the median of its timed runs) and redo (one
    sample), their sum, and how many samples stand behind each phase."""
    return interruption_of({**{key: [value] for key, value in shared_phases.items()}, "rebuild_s": rebuilds,
                            "redo_s": [redo_s]})


def interruption_of(samples: Mapping[str, Sequence[float]]) -> dict:
    """The whole interruption from every phase's samples (seconds): each phase is their median, the
    whole their sum; how many samples stand behind each phase, and their range."""
    phases = {key: statistics.median(values) for key, values in samples.items()}
    return {"interruption_phases": phases, "interruption_s": sum(phases.values()),
            "interruption_samples": {key: {"samples": len(values), "min_s": min(values), "max_s": max(values)}
                                     for key, values in samples.items()}}


def add_interruption_ratios(rows: list[dict], strategy_key: str) -> None:
    """Each row's `interruption_ratio` (full recompute's whole interruption over the row's own) and
    `interruption_saved_fraction` (the share of full recompute's interruption the row saves)."""
    whole = next((r for r in rows if r[strategy_key] == "full-recompute" and r.get("interruption_s")), None)
    for row in rows:
        measured = bool(whole and row.get("interruption_s"))
        row["interruption_ratio"] = whole["interruption_s"] / row["interruption_s"] if measured else None
        row["interruption_saved_fraction"] = 1 - row["interruption_s"] / whole["interruption_s"] if measured else None
