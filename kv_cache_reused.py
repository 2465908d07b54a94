"""The four ways to rebuild the KV cache after a device is lost (docs/design.md, "Failure and recovery").

    full-recompute   drop every cache, prefill the whole context again on the new assignment
    reuse-replay     keep survivors' KV; one forward pass in which only lost K/V are projected
    reuse-hidden     keep survivors' KV; rebuild only the lost heads from stored layer inputs h_l
    replicate        keep survivors' KV; promote the copy of the lost KV that a survivor holds

A strategy has two halves. The leader's, `plan_rebuild`: from what each survivor says it holds
(`DeviceInfo`), one `RebuildOrder` per survivor, or RecoveryImpossible. The device's, `rebuild`:
what a survivor does with its own state and what it receives. Only orders (plain data) and the
collective's transfers cross between them. `keeps` says what a strategy needs kept during normal
running; `reuses_kv` whether survivors keep their own KV as it was (the lossless check then
demands the same bits).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Mapping, Sequence

import torch

from device_protocol import STRATEGY_NAMES, DeviceInfo
from head_assignment import Assignment
from tensor_parallel_model import (Collective, DeviceState, HiddenStateStore, KVCache, Rotary, device_forward,
                                   kv_weight_rows, project_kv_heads)


class RecoveryImpossible(Exception):
    """The strategy cannot rebuild the lost KV from what survived (e.g. a device and its buddy)."""


@dataclass(frozen=True)
class StrategyInfo:
    name: str
    keeps: str        # what it needs kept during normal running: "nothing", "hidden states", "KV replica"
    reuses_kv: bool   # survivors keep their own KV as it was (else every head is recomputed)


STRATEGIES: dict[str, StrategyInfo] = {s.name: s for s in (
    StrategyInfo("full-recompute", "nothing", False),
    StrategyInfo("reuse-replay", "nothing", True),
    StrategyInfo("reuse-hidden", "hidden states", True),
    StrategyInfo("replicate", "KV replica", True),
)}
assert tuple(STRATEGIES) == STRATEGY_NAMES, "the protocol's names and the strategies must agree"
FALLBACKS = ("reuse-hidden", "full-recompute")  # tried in order when the asked strategy is impossible


def strategy_info(name: str) -> StrategyInfo:
    if name not in STRATEGIES:
        raise ValueError(f"unknown recovery strategy {name!r} (choose from {', '.join(STRATEGIES)})")
    return STRATEGIES[name]


@dataclass(frozen=True)
class KVTransfer:
    """KV heads that go from one survivor to another: `peer` is the other end. On the sender's side
    `sources` says, head by head, where it reads each: None from its own cache, d from its copy of
    device d's KV (one transfer may mix both); the receiver's side lists none."""

    kv_heads: tuple[int, ...]
    peer: int
    sources: tuple[int | None, ...] = ()


@dataclass(frozen=True)
class RebuildOrder:
    """What one survivor does: hold `kv_heads` for the whole context afterwards, of which `missing`
    are new to it; send and receive KV heads as listed (replicate)."""

    strategy: str
    context_ids: tuple[int, ...]
    kv_heads: tuple[int, ...]
    missing: tuple[int, ...]
    sends: tuple[KVTransfer, ...] = ()
    receives: tuple[KVTransfer, ...] = ()


# --------------------------------------------------------------------------------------------
# The leader's half


def plan_rebuild(strategy: str, after: Assignment, survivors: Mapping[int, DeviceInfo],
                 context_ids: Sequence[int]) -> dict[int, RebuildOrder]:
    """One order per survivor for `strategy`, from what the survivors hold (RecoveryImpossible when
    what the strategy needs did not survive)."""
    context = tuple(context_ids)
    if strategy_info(strategy).reuses_kv:
        check_kv_covers(survivors, context)
    missing = {d: tuple(g for g in after.kv_heads(d) if g not in info.kv_heads) for d, info in survivors.items()}
    if strategy == "full-recompute":
        missing = {d: after.kv_heads(d) for d in survivors}
    if strategy == "reuse-hidden":
        check_hidden_states_cover(survivors, len(context))
    transfers = plan_transfers(survivors, missing, len(context)) if strategy == "replicate" and context else {}
    return {d: RebuildOrder(strategy, context, after.kv_heads(d), missing[d],
                            tuple(t for (sender, _), t in transfers.items() if sender == d),
                            tuple(KVTransfer(t.kv_heads, sender) for (sender, to), t in transfers.items() if to == d))
            for d in survivors}


def check_kv_covers(survivors: Mapping[int, DeviceInfo], context: tuple[int, ...]) -> None:
    """A survivor's KV heads can be kept only if they hold exactly the context: its tokens, at every
    position (a cache cut short, or holding positions past it, would be trusted as it is)."""
    for device, info in sorted(survivors.items()):
        if info.kv_positions != len(context):
            raise RecoveryImpossible(f"Device-{device}'s KV holds {info.kv_positions} positions, the context "
                                     f"{len(context)}")
        if info.cached_ids != context:
            raise RecoveryImpossible(f"Device-{device} cached other tokens than the context")


def check_hidden_states_cover(survivors: Mapping[int, DeviceInfo], length: int) -> None:
    """A rebuild from hidden states needs every position's layer inputs on every survivor."""
    for info in survivors.values():
        if info.hidden_positions is None:
            raise RecoveryImpossible("no hidden-state checkpoints were kept")
        if info.hidden_positions < length:
            raise RecoveryImpossible(f"the hidden states hold {info.hidden_positions} of the {length} cached "
                                     f"positions (they were switched on after the prefill)")


def plan_transfers(survivors: Mapping[int, DeviceInfo], missing: Mapping[int, tuple[int, ...]], length: int
                   ) -> dict[tuple[int, int], KVTransfer]:
    """(sender, receiver) -> what goes between them: each missing KV head from a survivor that holds
    it, else from a survivor's copy of a lost device's KV that covers the context (each head with
    its own source)."""
    transfers: dict[tuple[int, int], KVTransfer] = {}
    for receiver, heads in missing.items():
        for g in heads:
            sender, source = kv_source(survivors, g, length, receiver)
            old = transfers.get((sender, receiver), KVTransfer((), receiver))
            transfers[(sender, receiver)] = KVTransfer(old.kv_heads + (g,), receiver, old.sources + (source,))
    return transfers


def kv_source(survivors: Mapping[int, DeviceInfo], kv_head: int, length: int, receiver: int) -> tuple[int, int | None]:
    """Where a KV head survived: (survivor, None) for its own cache, (survivor, d) for its copy of d's."""
    for device, info in sorted(survivors.items()):
        if device != receiver and kv_head in info.kv_heads:
            return device, None
    for device, info in sorted(survivors.items()):
        if kv_head in info.replica_kv_heads and info.replica_positions >= length:
            return device, info.replica_of
    raise RecoveryImpossible(f"KV head {kv_head + 1} survived nowhere (its device and its buddy are both lost)")


# --------------------------------------------------------------------------------------------
# The device's half


def rebuild(state: DeviceState, order: RebuildOrder, collective: Collective) -> None:
    """Make `state`'s cache hold `order.kv_heads` for the whole context, as the strategy says (in the
    order of the device's own shard: inherited heads come after its own). The rebuild fills a new
    cache, installed only once complete: one interrupted by another failure leaves the cache as it
    was, so that the recovery planned again never trusts a half-filled head."""
    heads = state.shard.kv_heads
    if set(heads) != set(order.kv_heads):
        raise ValueError(f"Device-{state.device} holds weights for KV heads {heads}, the order asks {order.kv_heads}")
    cache = KVCache(state.config.num_hidden_layers, heads, state.config.head_dim, state.cache.dtype,
                    capacity=max(state.cache.capacity, len(order.context_ids), 1), device=state.cache.device) \
        if order.strategy == "full-recompute" else state.cache.regrouped(heads)
    trial = replace(state, cache=cache)
    if not order.context_ids:
        pass  # the failure struck during the prefill: nothing was cached
    elif order.strategy in ("full-recompute", "reuse-replay"):
        trial.kv_to_fill = order.missing if order.strategy == "reuse-replay" else None
        prefill_context(trial, order.context_ids, collective)
    elif order.strategy == "reuse-hidden":
        rebuild_from_hidden_states(trial, order.missing)
    else:
        exchange_kv(trial, order, collective)
    state.cache = trial.cache


def prefill_context(state: DeviceState, context_ids: Sequence[int], collective: Collective) -> None:
    """A forward pass over the whole context on `state` (a trial copy), keeping only the KV it writes:
    the hidden-state checkpoints are not re-recorded (the stored ones are still valid)."""
    device_forward(replace(state, hidden_states=None), torch.tensor(context_ids, dtype=torch.long), 0, collective,
                   logits="none")


def rebuild_from_hidden_states(state: DeviceState, kv_heads: Sequence[int]) -> None:
    """Project the given held KV heads from the stored inputs of every layer (HCache-style)."""
    config, store, cache = state.config, state.hidden_states, state.cache
    if not kv_heads or cache.length == 0:
        return
    check_store_covers(store, cache.length)
    rows = kv_weight_rows(state.shard, kv_heads, config.head_dim)
    rope = Rotary(config, cache.dtype, cache.device).factors(0, cache.length)
    for i, layer in enumerate(state.shard.layers):
        k, v = project_kv_heads(layer, rows, store.layer_inputs(i, cache.length), rope, config.head_dim)
        cache.put_heads(i, kv_heads, 0, k, v)
        state.on_tick()


def check_store_covers(store: HiddenStateStore | None, length: int) -> None:
    if store is None or store.length < length:
        held = 0 if store is None else store.length
        raise RecoveryImpossible(f"the hidden states hold {held} of the {length} cached positions")


def exchange_kv(state: DeviceState, order: RebuildOrder, collective: Collective) -> None:
    """Replicate: send the KV heads others lack (from the own cache or the held copy), then receive
    and store those this device lacks. A device that holds the copy it needs itself promotes it
    without a transfer."""
    length, promoted = state.cache.length, []
    for transfer in order.sends:
        payload = kv_heads_payload([source_cache(state, source) for source in transfer.sources], transfer.kv_heads,
                                   length)
        if transfer.peer == state.device:
            promoted.append(payload)
        else:
            collective.send(state.device, transfer.peer, payload)
    for transfer in order.receives:
        heads, keys, values = promoted.pop(0) if transfer.peer == state.device else \
            collective.recv(state.device, transfer.peer)
        for layer, (k, v) in enumerate(zip(keys, values)):
            state.cache.put_heads(layer, heads, 0, k, v)


def source_cache(state: DeviceState, source: int | None) -> KVCache:
    """The store a transfer reads a head from: the device's own cache (None), or its copy of `source`'s KV."""
    if source is None:
        return state.cache
    if source != state.replica_of or state.replica is None:
        raise RecoveryImpossible(f"Device-{state.device} holds no copy of Device-{source}'s KV")
    return state.replica


def kv_heads_payload(caches: Sequence[KVCache], kv_heads: Sequence[int], length: int
                     ) -> tuple[tuple[int, ...], list[torch.Tensor], list[torch.Tensor]]:
    """(heads, per-layer K [heads, length, head_dim], per-layer V): copies, for sending; head i is
    read from caches[i] (a transfer holds at least one head)."""
    def layer_heads(layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        pairs = [cache.head(layer, g) for cache, g in zip(caches, kv_heads, strict=True)]
        return torch.stack([k[:length] for k, _ in pairs]), torch.stack([v[:length] for _, v in pairs])

    layers = [layer_heads(layer) for layer in range(caches[0].num_layers)]
    return tuple(kv_heads), [k for k, _ in layers], [v for _, v in layers]
