"""Proofs that a recovery lost nothing, strict enough that a wrong rebuild cannot pass.

The checks against a failure-free run of the same prompt on the same assignment:
- Every KV head held after the recovery covers exactly the context the recovery claims: a head
  shorter (even empty) or longer than it fails, whatever its values.
- KV that a survivor kept (held before the failure and reused by the strategy) must be the same
  bits: nothing touched it, so any difference is a bug.
- KV that was rebuilt is recomputed with another summation order, so it may differ by rounding.
  It is compared per (layer, KV head), K and V apart, relative to that head's own largest |value|:
  a small head cannot hide its error behind a large one.
- The logits of every step after the recovery are compared with the failure-free run's, relative
  to their own scale, so a recovery that keeps the argmax but shifts the distribution is caught.
  Each step is fed the failure-free run's token, so that every step compares like with like.
- The greedy token of every step must be the failure-free run's, except at a near-tie: a step
  whose top-2 margin in the failure-free run is within what the logits bound lets rounding move
  (twice the bound). A new device layout sums in another order; in bf16 that moves the logits by
  a few per cent, which can flip a near-tie without anything being lost.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import AbstractSet, Mapping, Sequence

import torch

KVKey = tuple[int, int, int]  # (device, layer, KV head)
KVSnapshot = dict[KVKey, tuple[torch.Tensor, torch.Tensor]]  # -> (K, V), each [positions, head_dim]

# Bounds on the rebuilt KV (per head, relative to its largest |value|) and on the logits (relative to
# the largest |logit| of the step). A rebuild sums the devices' partial outputs in another grouping,
# so the values move by rounding. Measured in fp32 on the default run (synthetic Llama-3.2-1B, 515
# tokens): at most 3.5e-6 for the KV and 3.8e-6 for the logits, so 1e-4 leaves a margin of 25x,
# and an error of 1% in one position of one head is 100x the bound. In bf16 rounding is 65536 times
# coarser: measured at most 4.9e-2 (KV) and 3.7e-2 (logits) on the same model at 67 tokens, 1.5e-2
# on the tiny preset; the bound is 1e-1, and bf16 is a check of gross errors only.
REBUILT_KV_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 1e-1}
LOGITS_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 1e-1}


@dataclass(frozen=True)
class HeadError:
    """The worst entry of one check: where it is, and how large."""

    device: int
    layer: int
    kv_head: int
    tensor: str  # "K" or "V"
    value: float

    def describe(self) -> str:
        return f"{self.tensor} of KV head {self.kv_head + 1}, layer {self.layer}, Device-{self.device}"


@dataclass(frozen=True)
class KVCheck:
    """The per-head verdict on a recovered KV cache."""

    kept_max_abs_diff: float            # 0.0 when every kept head is bit-identical
    rebuilt_max_rel_error: float        # worst rebuilt head, relative to its own scale
    tolerance: float                    # the bound on rebuilt_max_rel_error
    worst_kept: HeadError | None = None
    worst_rebuilt: HeadError | None = None
    problems: tuple[str, ...] = field(default=())  # heads missing or of the wrong length

    @property
    def ok(self) -> bool:
        return not self.problems and self.kept_max_abs_diff == 0.0 and self.rebuilt_max_rel_error <= self.tolerance

    def describe(self) -> str:
        """One line saying what failed, or that nothing did."""
        if self.problems:
            return "; ".join(self.problems)
        if self.kept_max_abs_diff != 0.0:
            return f"kept KV changed: {self.worst_kept.describe()} off by {self.kept_max_abs_diff:.3g}"
        if self.rebuilt_max_rel_error > self.tolerance:
            return (f"rebuilt KV off: {self.worst_rebuilt.describe()} by {self.rebuilt_max_rel_error:.3g} of its "
                    f"scale (bound {self.tolerance:.3g})")
        return "lossless"


def check_kv(recovered: KVSnapshot, reference: KVSnapshot, kept: AbstractSet[tuple[int, int]],
             dtype: torch.dtype, length: int) -> KVCheck:
    """Compare every (device, layer, KV head) of `recovered` with the failure-free `reference`.

    `length` is the context the recovery claims to hold: every recovered head must hold exactly that
    many positions (a shorter, longer or empty head fails). The reference may have been snapshotted
    later (a whole failure-free generation): its first `length` positions are compared, and one
    holding fewer fails. `kept` lists the (device, KV head) pairs the strategy reused: those must be
    bit-identical to the same device's reference. Every other head was rebuilt and is bounded
    relative to its own scale.
    """
    problems = [f"KV head {g + 1} of layer {layer} is held by no device"
                for layer, g in sorted({(l, g) for _, l, g in reference} - {(l, g) for _, l, g in recovered})]
    kept_worst, kept_at = 0.0, None
    rebuilt_worst, rebuilt_at = 0.0, None
    for (device, layer, g), pair in sorted(recovered.items()):
        want_pair = reference_head(reference, device, layer, g)
        if want_pair is None:
            problems.append(f"KV head {g + 1} of layer {layer} has no failure-free reference")
            continue
        for name, got, want in zip("KV", pair, want_pair):
            problem = coverage_problem(got, want, length)
            if problem is not None:
                problems.append(f"{name} of KV head {g + 1}, layer {layer}, Device-{device}: {problem}")
                continue
            want = want[:length]
            if (device, g) in kept:
                diff = _max_abs(got.float() - want.float())
                if diff > kept_worst or (kept_at is None and diff > 0):
                    kept_worst, kept_at = diff, HeadError(device, layer, g, name, diff)
            else:
                error = relative_error(got, want)
                if error > rebuilt_worst or rebuilt_at is None:
                    rebuilt_worst, rebuilt_at = error, HeadError(device, layer, g, name, error)
    return KVCheck(kept_worst, rebuilt_worst, REBUILT_KV_TOLERANCE[dtype], kept_at, rebuilt_at, tuple(problems))


def coverage_problem(got: torch.Tensor, want: torch.Tensor, length: int) -> str | None:
    """Why a recovered head [positions, head_dim] does not cover exactly `length` positions against
    its reference, or None when it does."""
    if got.shape[1:] != want.shape[1:]:
        return f"has shape {tuple(got.shape)}, the reference {tuple(want.shape)}"
    if got.shape[0] != length:
        return f"holds {got.shape[0]} positions, the context {length}"
    if want.shape[0] < length:
        return f"the failure-free reference holds only {want.shape[0]} of the {length} positions"
    return None


def reference_head(reference: KVSnapshot, device: int, layer: int, kv_head: int
                   ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The reference's K and V of a head: the same device's copy, else any device's that held it."""
    if (device, layer, kv_head) in reference:
        return reference[(device, layer, kv_head)]
    return next((kv for (_, l, g), kv in sorted(reference.items()) if (l, g) == (layer, kv_head)), None)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want| (absolute when `want` is all zeros)."""
    if got.numel() == 0:
        return 0.0
    scale = _max_abs(want.float())
    diff = _max_abs(got.float() - want.float())
    return diff / scale if scale > 0 else diff


def logits_rel_diff(got: Sequence[torch.Tensor], want: Sequence[torch.Tensor]) -> float:
    """The largest difference of any step's logits, relative to that step's largest |logit|."""
    if len(got) != len(want):
        return float("inf")
    return max((relative_error(g, w) for g, w in zip(got, want)), default=0.0)


def near_ties(logits: Sequence[torch.Tensor], tolerance: float) -> frozenset[int]:
    """Steps whose top-2 margin is at most twice `tolerance` times the step's largest |logit|:
    logits each moved by at most the bound can swap their order."""
    ties = set()
    for step, row in enumerate(logits):
        top2 = row.float().topk(2).values
        if (top2[0] - top2[1]).item() <= 2 * tolerance * _max_abs(row.float()):
            ties.add(step)
    return frozenset(ties)


@dataclass(frozen=True)
class Divergence:
    """Where a greedy output first leaves the failure-free one: the token's place, the failure-free
    run's top-2 margin there and the bound within which rounding may flip it (twice the logits
    bound times that row's largest |logit|, near_ties' rule for a step sampled once)."""

    token: int
    margin: float | None  # None: the outputs differ in length only, or no margin was served there
    bound: float

    @property
    def near_tie(self) -> bool:
        return self.margin is not None and self.margin <= self.bound


def first_divergence(got: Sequence[int], want: Sequence[int], margins: Sequence[float],
                     scales: Sequence[float], tolerance: float) -> Divergence | None:
    """None when `got` is `want`; else the first place they differ, judged by the failure-free run's
    margins and logit scales there (a length difference alone is never a near-tie)."""
    if list(got) == list(want):
        return None
    first = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
    if first >= min(len(got), len(want)) or first >= len(margins):
        return Divergence(first, None, 0.0)
    return Divergence(first, margins[first], 2 * tolerance * scales[first])


def kept_heads(survivor_kv_heads: Mapping[int, Sequence[int]], reuses_kv: bool) -> frozenset[tuple[int, int]]:
    """The (device, KV head) pairs a strategy keeps: every survivor's own heads, if it reuses them."""
    if not reuses_kv:
        return frozenset()
    return frozenset((d, g) for d, heads in survivor_kv_heads.items() for g in heads)


def _max_abs(t: torch.Tensor) -> float:
    return t.abs().max().item() if t.numel() else 0.0
