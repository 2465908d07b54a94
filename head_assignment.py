"""Which device computes what: query heads, MLP columns and vocabulary rows.

An assignment is plain data, shared by the model (to slice weights), the reassignment
strategies (to plan a recovery) and the report (to show who holds what). Heads are
0-based here; the report shows them 1-based, as the scenario does.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping

Range = tuple[int, int]  # half-open [start, stop)


@dataclass(frozen=True)
class Assignment:
    """Query heads and MLP column ranges per device; KV heads follow from the heads."""

    heads: Mapping[int, tuple[int, ...]]
    mlp: Mapping[int, tuple[Range, ...]]
    group_size: int  # query heads per KV head (GQA)

    def __post_init__(self) -> None:
        object.__setattr__(self, "heads", MappingProxyType({d: tuple(sorted(h)) for d, h in sorted(self.heads.items())}))
        object.__setattr__(self, "mlp", MappingProxyType({d: tuple(r) for d, r in sorted(self.mlp.items())}))
        if set(self.heads) != set(self.mlp):
            raise ValueError("every device needs both heads and an MLP slice")

    def __reduce__(self):
        """Plain data across processes (a mapping proxy does not pickle)."""
        return Assignment, (dict(self.heads), dict(self.mlp), self.group_size)

    @property
    def devices(self) -> tuple[int, ...]:
        return tuple(self.heads)

    def kv_heads(self, device: int) -> tuple[int, ...]:
        """KV heads a device must hold: those its query heads read."""
        return tuple(sorted({h // self.group_size for h in self.heads[device]}))

    def mlp_width(self, device: int) -> int:
        return sum(stop - start for start, stop in self.mlp[device])

    def duplicated_kv_heads(self) -> dict[int, tuple[int, ...]]:
        """KV heads held by more than one device (a GQA group split across devices)."""
        holders: dict[int, list[int]] = {}
        for device in self.devices:
            for g in self.kv_heads(device):
                holders.setdefault(g, []).append(device)
        return {g: tuple(ds) for g, ds in sorted(holders.items()) if len(ds) > 1}

    def vocab_range(self, device: int, vocab_size: int) -> Range:
        """The slice of output logits this device computes: an even split over live devices."""
        rank = self.devices.index(device)
        return even_ranges(vocab_size, len(self.devices))[rank]

    def describe_heads(self, device: int) -> str:
        """1-based head list for people, with runs collapsed: '1-8' or '9-16, 25-32'."""
        return collapse_runs([h + 1 for h in self.heads[device]])


def even_ranges(total: int, parts: int) -> list[Range]:
    """Split [0, total) into `parts` contiguous ranges whose sizes differ by at most one."""
    base, extra = divmod(total, parts)
    ranges, start = [], 0
    for i in range(parts):
        stop = start + base + (1 if i < extra else 0)
        ranges.append((start, stop))
        start = stop
    return ranges


def initial_assignment(num_heads: int, num_kv_heads: int, intermediate_size: int, num_devices: int) -> Assignment:
    """Contiguous heads and MLP columns, as even as possible (32 over 4: 8 each; 9 over 4: 3,2,2,2)."""
    if not 1 <= num_devices <= num_heads:
        raise ValueError(f"devices must be between 1 and the number of query heads ({num_heads}), got {num_devices}")
    head_ranges = even_ranges(num_heads, num_devices)
    mlp_ranges = even_ranges(intermediate_size, num_devices)
    return Assignment(
        heads={d: tuple(range(*head_ranges[d])) for d in range(num_devices)},
        mlp={d: (mlp_ranges[d],) for d in range(num_devices)},
        group_size=num_heads // num_kv_heads,
    )


def even_assignment(config, num_devices: int) -> Assignment:
    """`initial_assignment` for a model config (a LlamaConfig: heads, KV heads, MLP width)."""
    return initial_assignment(config.num_attention_heads, config.num_key_value_heads, config.intermediate_size,
                              num_devices)


def custom_assignment(heads: Mapping[int, tuple[int, ...]], num_heads: int, num_kv_heads: int,
                      intermediate_size: int) -> Assignment:
    """Any head placement (each head exactly once); MLP columns split evenly in device order."""
    placed = sorted(h for hs in heads.values() for h in hs)
    if placed != list(range(num_heads)):
        raise ValueError(f"every query head 0..{num_heads - 1} needs exactly one device, got {placed}")
    if any(not hs for hs in heads.values()):
        raise ValueError("every device needs at least one query head")
    devices = sorted(heads)
    mlp_ranges = even_ranges(intermediate_size, len(devices))
    return Assignment(heads=dict(heads), mlp={d: (mlp_ranges[i],) for i, d in enumerate(devices)},
                      group_size=num_heads // num_kv_heads)


def collapse_runs(numbers: list[int]) -> str:
    """[1, 2, 3, 5] -> '1-3, 5'."""
    runs: list[list[int]] = []
    for n in sorted(numbers):
        if runs and n == runs[-1][-1] + 1:
            runs[-1].append(n)
        else:
            runs.append([n])
    return ", ".join(str(r[0]) if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in runs)
