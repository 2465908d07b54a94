"""Where a failed device's work goes: its query heads and MLP columns move to the survivors.

Strategies differ only in which survivor takes which lost heads (`random`: one survivor, the
seed scenario; `balanced`: whole KV groups spread to keep the busiest device light); the move
itself, the MLP cut and the list of KV heads to rebuild are shared, so their plans compare fairly.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping, Protocol, Sequence

from head_assignment import Assignment, Range, collapse_runs

STRATEGIES: tuple[str, ...] = ("random", "balanced")


@dataclass(frozen=True)
class ReassignmentPlan:
    """One failure's recovery: the assignment before and after, and what each receiver takes."""

    failed: int
    strategy: str
    before: Assignment
    after: Assignment
    moved_heads: Mapping[int, tuple[int, ...]]    # receiver -> lost query heads it takes (0-based)
    moved_mlp: Mapping[int, tuple[Range, ...]]    # receiver -> MLP column ranges it takes
    kv_to_rebuild: Mapping[int, tuple[int, ...]]  # receiver -> KV heads it must newly hold
    lost_kv_heads: tuple[int, ...]                # KV heads whose cache was on the failed device

    def __reduce__(self):
        """Plain data across processes (a mapping proxy does not pickle)."""
        return ReassignmentPlan, (self.failed, self.strategy, self.before, self.after, dict(self.moved_heads),
                                  dict(self.moved_mlp), dict(self.kv_to_rebuild), self.lost_kv_heads)

    @property
    def receivers(self) -> tuple[int, ...]:
        return tuple(self.moved_heads)

    def duplicated_kv_heads(self) -> dict[int, tuple[int, ...]]:
        return self.after.duplicated_kv_heads()

    def describe(self) -> list[str]:
        """Report lines, heads and KV heads 1-based, MLP columns as half-open 'start-stop'."""
        receivers = ", ".join(f"Device-{r}" for r in self.receivers)
        header = (f"Device-{self.failed} failed; {self.strategy} reassignment to {receivers} "
                  f"(largest load {max_load(self.after)} query heads)")
        return [header, *(self._describe_receiver(r) for r in self.receivers), self._describe_duplicates()]

    def _describe_receiver(self, receiver: int) -> str:
        heads = collapse_runs([h + 1 for h in self.moved_heads[receiver]])
        return f"Device-{receiver} takes heads {heads} ({self._describe_rebuild(receiver)}), {self._describe_mlp(receiver)}"

    def _describe_rebuild(self, receiver: int) -> str:
        rebuild = self.kv_to_rebuild[receiver]
        if not rebuild:
            return "no KV head to rebuild"
        noun = "KV head" if len(rebuild) == 1 else "KV heads"
        return f"{noun} {collapse_runs([g + 1 for g in rebuild])} to rebuild"

    def _describe_mlp(self, receiver: int) -> str:
        ranges = self.moved_mlp[receiver]
        if not ranges:
            return "no MLP columns"
        return "MLP columns " + ", ".join(f"{start}-{stop}" for start, stop in ranges)

    def _describe_duplicates(self) -> str:
        duplicated = self.duplicated_kv_heads()
        if not duplicated:
            return "no KV head is held twice"
        held = "; ".join(f"KV head {g + 1} on " + ", ".join(f"Device-{d}" for d in devices)
                         for g, devices in duplicated.items())
        return f"KV heads held twice: {held}"


class ReassignStrategy(Protocol):
    name: str

    def plan(self, assignment: Assignment, failed: int) -> ReassignmentPlan: ...


class RandomReassign:
    """The seed scenario: every lost head goes to one survivor drawn from a seeded generator."""

    name = "random"

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self._rng = random.Random(seed)  # one stream across successive failures

    def plan(self, assignment: Assignment, failed: int) -> ReassignmentPlan:
        receiver = self._rng.choice(survivors_of(assignment, failed))
        return move_lost_heads(assignment, failed, self.name, {receiver: assignment.heads[failed]})


class BalancedReassign:
    """FailSafe-style: whole lost KV groups, largest first, each to the least-loaded survivor."""

    name = "balanced"

    def plan(self, assignment: Assignment, failed: int) -> ReassignmentPlan:
        survivors = survivors_of(assignment, failed)
        loads = {d: len(assignment.heads[d]) for d in survivors}
        moves: dict[int, list[int]] = {}
        for group in largest_first(lost_kv_groups(assignment, failed)):
            kv_head = group[0] // assignment.group_size
            receiver = min(survivors, key=lambda d: (loads[d], kv_head not in assignment.kv_heads(d), d))
            moves.setdefault(receiver, []).extend(group)
            loads[receiver] += len(group)
        return move_lost_heads(assignment, failed, self.name, moves)


def make_strategy(name: str, seed: int = 0) -> ReassignStrategy:
    if name == "random":
        return RandomReassign(seed)
    if name == "balanced":
        return BalancedReassign()
    raise ValueError(f"unknown reassignment strategy {name!r} (choose from {', '.join(STRATEGIES)})")


def max_load(assignment: Assignment) -> int:
    """The largest number of query heads on one device: the straggler sets the step time."""
    return max(len(heads) for heads in assignment.heads.values())


def survivors_of(assignment: Assignment, failed: int) -> list[int]:
    """The devices left after `failed` goes; refuses unknown devices and the last device."""
    if failed not in assignment.heads:
        raise ValueError(f"Device-{failed} is not in the assignment (devices {list(assignment.devices)})")
    if len(assignment.devices) == 1:
        raise ValueError(f"Device-{failed} is the only device left; no survivor can take its heads")
    return [d for d in assignment.devices if d != failed]


def lost_kv_groups(assignment: Assignment, failed: int) -> list[tuple[int, ...]]:
    """The failed device's query heads, grouped by the KV head they read."""
    groups: dict[int, list[int]] = {}
    for head in assignment.heads[failed]:
        groups.setdefault(head // assignment.group_size, []).append(head)
    return [tuple(heads) for _, heads in sorted(groups.items())]


def largest_first(groups: Sequence[tuple[int, ...]]) -> list[tuple[int, ...]]:
    return sorted(groups, key=lambda group: (-len(group), group[0]))


def move_lost_heads(assignment: Assignment, failed: int, strategy: str,
                    moves: Mapping[int, Sequence[int]]) -> ReassignmentPlan:
    """The mechanics every strategy shares: given who takes which lost heads, move them, cut the
    failed device's MLP columns in proportion, and list the KV heads each receiver must rebuild."""
    survivors = survivors_of(assignment, failed)
    moved_heads = {r: tuple(sorted(heads)) for r, heads in sorted(moves.items()) if heads}
    check_moves(assignment, failed, survivors, moved_heads)
    moved_mlp = cut_in_proportion(assignment.mlp[failed], {r: len(hs) for r, hs in moved_heads.items()})
    after = Assignment(
        heads={d: assignment.heads[d] + moved_heads.get(d, ()) for d in survivors},
        mlp={d: merge_ranges(assignment.mlp[d] + moved_mlp.get(d, ())) for d in survivors},
        group_size=assignment.group_size,
    )
    kv_to_rebuild = {r: tuple(sorted(set(after.kv_heads(r)) - set(assignment.kv_heads(r)))) for r in moved_heads}
    return ReassignmentPlan(
        failed=failed, strategy=strategy, before=assignment, after=after,
        moved_heads=MappingProxyType(moved_heads), moved_mlp=MappingProxyType(moved_mlp),
        kv_to_rebuild=MappingProxyType(kv_to_rebuild), lost_kv_heads=assignment.kv_heads(failed),
    )


def check_moves(assignment: Assignment, failed: int, survivors: Sequence[int],
                moved_heads: Mapping[int, tuple[int, ...]]) -> None:
    """A strategy must hand every lost head, exactly once, to a survivor."""
    strangers = sorted(set(moved_heads) - set(survivors))
    if strangers:
        raise ValueError(f"receivers {strangers} are not survivors of Device-{failed}")
    handed = sorted(h for heads in moved_heads.values() for h in heads)
    if handed != sorted(assignment.heads[failed]):
        raise ValueError(f"moves hand out heads {handed}, but Device-{failed} lost {list(assignment.heads[failed])}")


def cut_in_proportion(ranges: Sequence[Range], weights: Mapping[int, int]) -> dict[int, tuple[Range, ...]]:
    """Cut the columns of `ranges` (in order) into contiguous pieces, one per receiver in order,
    sized in proportion to its weight; cut points are rounded down so the sizes add up exactly."""
    width, total = sum(stop - start for start, stop in ranges), sum(weights.values())
    pieces, taken, cut = {}, 0, 0
    for receiver, weight in weights.items():
        taken += weight
        next_cut = width * taken // total
        pieces[receiver] = columns_between(ranges, cut, next_cut)
        cut = next_cut
    return pieces


def columns_between(ranges: Sequence[Range], lo: int, hi: int) -> tuple[Range, ...]:
    """Columns number lo..hi-1 of the concatenation of `ranges`, as merged ranges."""
    found, offset = [], 0
    for start, stop in ranges:
        first, last = max(lo, offset), min(hi, offset + stop - start)
        if first < last:
            found.append((start + first - offset, start + last - offset))
        offset += stop - start
    return merge_ranges(found)


def merge_ranges(ranges: Sequence[Range]) -> tuple[Range, ...]:
    """Sort, drop empty ranges and join touching ones: [(4, 6), (0, 2), (2, 4)] -> ((0, 6),)."""
    merged: list[list[int]] = []
    for start, stop in sorted(r for r in ranges if r[1] > r[0]):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], stop)
        else:
            merged.append([start, stop])
    return tuple((start, stop) for start, stop in merged)
