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

With many requests in flight the same strategies work on paged pools (batched_forward.py): the
leader's `plan_batch_rebuild` gives each survivor a `BatchRebuildOrder` (the blocks to carry, at
their new numbers, into the new pool, and the KV heads to fill at every running request's slots),
and the device's `rebuild_batch` carries them and fills the heads: replay in packed passes, from
the paged layer inputs, or from a survivor's own KV or its replica. The planning of transfers and
the exchange are the one sequence's, over slots instead of positions. Full recompute of a batch is
packed steps on a fresh pool, run by the leader.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, Mapping, Sequence

import torch

from batched_forward import PagedPool, batched_forward, replicate_slots, rope_at, table_slots
from device_protocol import STRATEGY_NAMES, DeviceInfo, PoolInfo
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
    missing = missing_heads(strategy, after, {d: info.kv_heads for d, info in survivors.items()})
    if strategy == "reuse-hidden":
        check_hidden_states_cover(survivors, len(context))
    transfers = plan_transfers(survivors, missing, lambda info: info.replica_positions >= len(context)) \
        if strategy == "replicate" and context else {}
    return {d: RebuildOrder(strategy, context, after.kv_heads(d), missing[d], *transfers_of(transfers, d))
            for d in survivors}


def missing_heads(strategy: str, after: Assignment, held: Mapping[int, Sequence[int]]) -> dict[int, tuple[int, ...]]:
    """The KV heads each survivor must fill: every one it holds after (full recompute), else those new to it."""
    if strategy == "full-recompute":
        return {d: after.kv_heads(d) for d in held}
    return {d: tuple(g for g in after.kv_heads(d) if g not in heads) for d, heads in held.items()}


def transfers_of(transfers: Mapping[tuple[int, int], KVTransfer], device: int
                 ) -> tuple[tuple[KVTransfer, ...], tuple[KVTransfer, ...]]:
    """(what `device` sends, what it receives) of the planned transfers."""
    return (tuple(t for (sender, _), t in transfers.items() if sender == device),
            tuple(KVTransfer(t.kv_heads, sender) for (sender, to), t in transfers.items() if to == device))


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


def plan_transfers(survivors: Mapping[int, Any], missing: Mapping[int, tuple[int, ...]],
                   replica_covers: Callable[[Any], bool]) -> dict[tuple[int, int], KVTransfer]:
    """(sender, receiver) -> what goes between them: each missing KV head from a survivor that holds
    it, else from a survivor's copy of a lost device's KV that covers what is needed (each head with
    its own source). `survivors`: what each says it holds (`kv_heads`, `replica_of`, `replica_kv_heads`)."""
    transfers: dict[tuple[int, int], KVTransfer] = {}
    for receiver, heads in missing.items():
        for g in heads:
            sender, source = kv_source(survivors, g, receiver, replica_covers)
            old = transfers.get((sender, receiver), KVTransfer((), receiver))
            transfers[(sender, receiver)] = KVTransfer(old.kv_heads + (g,), receiver, old.sources + (source,))
    return transfers


def kv_source(survivors: Mapping[int, Any], kv_head: int, receiver: int, replica_covers: Callable[[Any], bool]
              ) -> tuple[int, int | None]:
    """Where a KV head survived: (survivor, None) for its own cache, (survivor, d) for its copy of d's."""
    for device, info in sorted(survivors.items()):
        if device != receiver and kv_head in info.kv_heads:
            return device, None
    for device, info in sorted(survivors.items()):
        if kv_head in info.replica_kv_heads and replica_covers(info):
            return device, info.replica_of
    raise RecoveryImpossible(f"KV head {kv_head + 1} survived nowhere (its device and its buddy are both lost)")


@dataclass(frozen=True)
class BatchRebuildOrder:
    """What one survivor does with its paged pool after a failure with requests in flight: carry
    every block a running request holds (`blocks`: old number, new) into the pool `pool`, hold
    `kv_heads` of which `missing` are new to it, and fill those for every running request's computed
    positions (`spans`: its block table and positions) as the strategy says; replay runs `steps`
    (packed chunks within the token budget), in which every survivor takes part."""

    strategy: str
    pool: Any
    blocks: tuple[tuple[int, int], ...]
    spans: tuple[tuple[tuple[int, ...], int], ...]
    kv_heads: tuple[int, ...]
    missing: tuple[int, ...]
    sends: tuple[KVTransfer, ...] = ()
    receives: tuple[KVTransfer, ...] = ()
    steps: tuple[tuple, ...] = ()


def plan_batch_rebuild(strategy: str, after: Assignment, pools: Mapping[int, PoolInfo | None], generation: int,
                       pool: Any, blocks: Sequence[tuple[int, int]], spans: Sequence[tuple[tuple[int, ...], int]],
                       steps: Sequence[tuple] = ()) -> dict[int, BatchRebuildOrder]:
    """One order per survivor for a reuse strategy over a batch, from what the survivors say their
    pools hold (RecoveryImpossible when what the strategy needs did not survive). The survivors'
    pools must be of `generation`, the one the leader's block tables describe; `pool` is the new one's spec."""
    if not strategy_info(strategy).reuses_kv:
        raise ValueError(f"{strategy} does not keep the survivors' KV: it is run as packed steps")
    computed = any(length for _, length in spans)
    if computed:
        check_pools_hold_the_batch(pools, strategy, generation)
    held = {d: () if info is None else info.kv_heads for d, info in pools.items()}
    missing = missing_heads(strategy, after, held)
    transfers = plan_transfers(pools, missing, lambda info: info.replica_of is not None) \
        if strategy == "replicate" and computed else {}
    return {d: BatchRebuildOrder(strategy, pool, tuple(blocks), tuple(spans), after.kv_heads(d), missing[d],
                                 *transfers_of(transfers, d), steps=tuple(steps) if strategy == "reuse-replay" else ())
            for d in pools}


def check_pools_hold_the_batch(pools: Mapping[int, PoolInfo | None], strategy: str, generation: int) -> None:
    """The survivors' blocks can be kept only if every pool is the one the block tables describe
    (a rebuild that another failure cut short leaves a pool of its own), with what the strategy reads."""
    for device, info in sorted(pools.items()):
        if info is None or info.generation != generation:
            held = "no pool" if info is None else f"a pool of generation {info.generation}"
            raise RecoveryImpossible(f"Device-{device} holds {held}, the batch's block tables are of {generation}")
    if strategy == "reuse-hidden" and not all(info.hidden_states for info in pools.values()):
        raise RecoveryImpossible("no hidden states were kept in the pool")


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
    and store those this device lacks."""
    length = state.cache.length

    def payload(transfer: KVTransfer) -> KVPayload:
        caches = [source_cache(state.cache, state.replica, state.replica_of, source, state.device)
                  for source in transfer.sources]
        return kv_heads_payload(transfer.kv_heads, caches[0].num_layers,
                                lambda i, layer: tuple(t[:length] for t in caches[i].head(layer, transfer.kv_heads[i])))

    def store(heads: tuple[int, ...], keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        for layer, (k, v) in enumerate(zip(keys, values)):
            state.cache.put_heads(layer, heads, 0, k, v)

    exchange(state.device, order, collective, payload, store)


KVPayload = tuple[tuple[int, ...], list[torch.Tensor], list[torch.Tensor]]


def exchange(device: int, order: RebuildOrder | BatchRebuildOrder, collective: Collective,
             payload: Callable[[KVTransfer], KVPayload], store: Callable[..., None]) -> None:
    """Send every transfer of the order, then receive and store each one this device is owed. A
    device that holds the copy it needs itself promotes it without a transfer."""
    promoted = []
    for transfer in order.sends:
        if transfer.peer == device:
            promoted.append(payload(transfer))
        else:
            collective.send(device, transfer.peer, payload(transfer))
    for transfer in order.receives:
        store(*(promoted.pop(0) if transfer.peer == device else collective.recv(device, transfer.peer)))


def source_cache(own, replica, replica_of: int | None, source: int | None, device: int):
    """The store a transfer reads a head from: the device's own (None), or its copy of `source`'s KV."""
    if source is None:
        return own
    if source != replica_of or replica is None:
        raise RecoveryImpossible(f"Device-{device} holds no copy of Device-{source}'s KV")
    return replica


def kv_heads_payload(kv_heads: Sequence[int], num_layers: int,
                     read: Callable[[int, int], tuple[torch.Tensor, torch.Tensor]]) -> KVPayload:
    """(heads, per-layer K [heads, positions, head_dim], per-layer V): copies, for sending; `read(i,
    layer)` gives head i's K and V (a transfer holds at least one head)."""
    def layer_heads(layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        pairs = [read(i, layer) for i in range(len(kv_heads))]
        return torch.stack([k for k, _ in pairs]), torch.stack([v for _, v in pairs])

    layers = [layer_heads(layer) for layer in range(num_layers)]
    return tuple(kv_heads), [k for k, _ in layers], [v for _, v in layers]


# --------------------------------------------------------------------------------------------
# The device's half, for many requests in flight


def rebuild_batch(state: DeviceState, pool: PagedPool, order: BatchRebuildOrder, collective: Collective,
                  ring: tuple[int, int] | None) -> PagedPool:
    """The pool of the order's generation: the blocks carried at their new numbers, the missing KV
    heads filled for every running request as the strategy says, and (replication kept) the new
    ring predecessor's KV copied at every slot (`ring`: (buddy, predecessor)). The old pool is left
    as it was: a rebuild cut short by another failure changes nothing."""
    if set(state.shard.kv_heads) != set(order.kv_heads):
        raise ValueError(f"Device-{state.device} holds weights for KV heads {state.shard.kv_heads}, the order asks "
                         f"{order.kv_heads}")
    trial = pool.carried(order.pool, state.shard.kv_heads, order.blocks)
    slots = torch.cat([table_slots(table, 0, length, trial.kv.block_size) for table, length in order.spans]
                      ).to(trial.kv.device) if order.spans else torch.zeros(0, dtype=torch.long, device=trial.kv.device)
    if order.strategy == "reuse-replay":
        for chunks in order.steps:
            batched_forward(state, trial.kv, chunks, collective, fill=order.missing)
    elif order.strategy == "reuse-hidden":
        rebuild_paged_from_hidden_states(state, trial, order, slots)
    else:
        exchange_paged_kv(state.device, trial, order, slots, collective)
    if order.pool.replication and ring is not None:
        replicate_slots(trial, slots, state.device, collective, *ring)
    return trial


def rebuild_paged_from_hidden_states(state: DeviceState, pool: PagedPool, order: BatchRebuildOrder,
                                     slots: torch.Tensor) -> None:
    """Project the missing KV heads at every running request's slots from the stored layer inputs."""
    if not order.missing or not len(slots):
        return
    hd = state.config.head_dim
    positions = torch.cat([torch.arange(length) for _, length in order.spans])
    rope, rows = rope_at(state.rotary, positions), kv_weight_rows(state.shard, order.missing, hd)
    for i, layer in enumerate(state.shard.layers):
        k, v = project_kv_heads(layer, rows, pool.hidden.read(i, slots), rope, hd)
        pool.kv.write_heads(i, order.missing, slots, k, v)


def exchange_paged_kv(device: int, pool: PagedPool, order: BatchRebuildOrder, slots: torch.Tensor,
                      collective: Collective) -> None:
    """Replicate over a batch: every running request's entries of the transferred heads, at its slots."""
    def payload(transfer: KVTransfer) -> KVPayload:
        caches = [source_cache(pool.kv, pool.replica, pool.replica_of, source, device) for source in transfer.sources]
        return kv_heads_payload(transfer.kv_heads, pool.kv.num_layers,
                                lambda i, layer: caches[i].read_head(layer, transfer.kv_heads[i], slots))

    def store(heads: tuple[int, ...], keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        for layer, (k, v) in enumerate(zip(keys, values)):
            pool.kv.write_heads(layer, heads, slots, k, v)

    exchange(device, order, collective, payload, store)
