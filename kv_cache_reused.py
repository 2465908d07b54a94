"""The four ways to rebuild the KV cache after a device is lost (docs/design.md, "Recovery").

    full-recompute   drop every cache, prefill the whole context again on the new assignment
    reuse-replay     keep survivors' KV; one forward pass in which only lost K/V are projected
    reuse-hidden     keep survivors' KV; rebuild only the lost heads from stored layer inputs h_l
    replicate        keep survivors' KV; promote the buddy's copy of the lost KV

Each strategy turns a `PostFailureState` into one new `DeviceState` per survivor. The work runs in
the survivors' own threads, as it would on real devices; the two strategies that need state kept
during normal running (hidden states, the buddy copy) say so in `keeps`; those that keep the
survivors' own KV untouched say so in `reuses_kv` (the lossless check then demands the same bits).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Protocol

import torch

from device_threads import ThreadCollective, run_on_devices
from tensor_parallel_model import (DeviceState, HiddenStateStore, KVCache, Rotary, device_forward, kv_weight_rows,
                                   project_kv_heads)

if TYPE_CHECKING:  # the cluster calls replicate_new_kv below, so import it only for type checking
    from fault_tolerant_cluster import FaultTolerantLlama, PostFailureState, Survivor


class RecoveryImpossible(Exception):
    """The strategy cannot rebuild the lost KV from what survived (e.g. a device and its buddy)."""


class RecoveryStrategy(Protocol):
    name: str
    keeps: str  # what it needs kept during normal running: "nothing", "hidden states", "KV replica"
    reuses_kv: bool  # survivors keep their own KV as it was (else every head is recomputed)

    def recover(self, model: FaultTolerantLlama, post: PostFailureState) -> dict[int, DeviceState]:
        """New device states with complete KV caches; `post` is this run's own copy."""


class FullRecompute:
    name, keeps, reuses_kv = "full-recompute", "nothing", False

    def recover(self, model: FaultTolerantLlama, post: PostFailureState) -> dict[int, DeviceState]:
        states = {d: model.state_for(s, fresh_cache(model, s)) for d, s in post.survivors.items()}
        prefill_context(model, states, post.context_ids)
        return states


class ReuseReplay:
    """Survivors keep their KV, but x_l for every layer still needs the whole forward pass."""

    name, keeps, reuses_kv = "reuse-replay", "nothing", True

    def recover(self, model: FaultTolerantLlama, post: PostFailureState) -> dict[int, DeviceState]:
        states = {d: model.state_for(s, s.cache.regrouped(s.shard.kv_heads)) for d, s in post.survivors.items()}
        for device, state in states.items():
            state.kv_to_fill = post.survivors[device].missing_kv_heads
        prefill_context(model, states, post.context_ids)
        for state in states.values():
            state.kv_to_fill = None
        return states


class ReuseHiddenStates:
    """HCache-style: K/V of a lost head at layer l is `rope(h_l Wk)`, `h_l Wv`, h_l the stored attention input."""

    name, keeps, reuses_kv = "reuse-hidden", "hidden states", True

    def recover(self, model: FaultTolerantLlama, post: PostFailureState) -> dict[int, DeviceState]:
        if any(s.hidden_states is None for s in post.survivors.values()):
            raise RecoveryImpossible("no hidden-state checkpoints were kept")
        for survivor in post.survivors.values():
            check_hidden_states_cover(survivor.hidden_states, post.context_ids.numel())
        return run_on_survivors(model, post, lambda s: model.state_for(s, rebuild_from_hidden_states(model, s)))


class Replicate:
    """DejaVu/FailSafe-style: each device's KV is copied to its buddy every step; promote the copy."""

    name, keeps, reuses_kv = "replicate", "KV replica", True

    def recover(self, model: FaultTolerantLlama, post: PostFailureState) -> dict[int, DeviceState]:
        sources = kv_sources(post)
        return run_on_survivors(model, post, lambda s: model.state_for(s, copy_from_peers(s, sources)))


STRATEGIES: dict[str, Callable[[], RecoveryStrategy]] = {
    s.name: s for s in (FullRecompute, ReuseReplay, ReuseHiddenStates, Replicate)}


def make_recovery(name: str) -> RecoveryStrategy:
    if name not in STRATEGIES:
        raise ValueError(f"unknown recovery strategy {name!r} (choose from {', '.join(STRATEGIES)})")
    return STRATEGIES[name]()


# --------------------------------------------------------------------------------------------
# The work itself


def fresh_cache(model: FaultTolerantLlama, survivor: Survivor) -> KVCache:
    return KVCache(model.config.num_hidden_layers, survivor.shard.kv_heads, model.config.head_dim, model.dtype,
                   capacity=survivor.cache.capacity)


def prefill_context(model: FaultTolerantLlama, states: dict[int, DeviceState], context_ids: torch.Tensor) -> None:
    """A forward pass over the whole context on the survivors, keeping only the KV it writes.

    Hidden-state checkpoints are not re-recorded: the survivors' stored ones are still valid.
    """
    if context_ids.numel() == 0:
        return  # the failure struck during the prefill: nothing was cached
    kept = {d: s.hidden_states for d, s in states.items()}
    for state in states.values():
        state.hidden_states = None
    collective = model.new_collective(tuple(states))

    def forward(worker) -> None:
        model.recovery_fault_point(worker.device)
        device_forward(states[worker.device], context_ids, 0, collective, logits="none")
    run_on_devices([model.workers[d] for d in states], forward, collective)
    for device, state in states.items():
        state.hidden_states = kept[device]


def run_on_survivors(model: FaultTolerantLlama, post: PostFailureState,
                     rebuild: Callable[[Survivor], DeviceState]) -> dict[int, DeviceState]:
    """Each survivor rebuilds its own cache in its own thread, all at once."""
    def task(worker) -> DeviceState:
        model.recovery_fault_point(worker.device)
        return rebuild(post.survivors[worker.device])
    devices = tuple(post.survivors)
    return run_on_devices([model.workers[d] for d in devices], task, model.new_collective(devices))


def check_hidden_states_cover(store: HiddenStateStore, length: int) -> None:
    """A rebuild from hidden states needs every position's layer inputs."""
    if store.length < length:
        raise RecoveryImpossible(f"the hidden states hold {store.length} of the {length} cached positions "
                                 f"(they were switched on after the prefill)")


def rebuild_from_hidden_states(model: FaultTolerantLlama, survivor: Survivor) -> KVCache:
    """Keep the held KV; project the missing KV heads from the stored inputs of every layer."""
    config, shard, store = model.config, survivor.shard, survivor.hidden_states
    cache = survivor.cache.regrouped(shard.kv_heads)
    missing = survivor.missing_kv_heads
    if not missing or cache.length == 0:
        return cache
    check_hidden_states_cover(store, cache.length)
    rows = kv_weight_rows(shard, missing, config.head_dim)
    rope = Rotary(config, model.dtype).factors(0, cache.length)
    for i, layer in enumerate(shard.layers):
        k, v = project_kv_heads(layer, rows, store.layer_inputs(i, cache.length), rope, config.head_dim)
        cache.put_heads(i, missing, 0, k, v)
    return cache


def kv_sources(post: PostFailureState) -> dict[int, KVCache]:
    """For every KV head, a surviving cache that holds it: a survivor's own, else a buddy's copy."""
    sources: dict[int, KVCache] = {}
    for survivor in post.survivors.values():
        for g in survivor.cache.kv_heads:
            sources.setdefault(g, survivor.cache)
    for survivor in post.survivors.values():
        for replica in survivor.replicas.values():
            for g in replica.kv_heads:
                if replica.length >= survivor.cache.length:  # a copy that covers the context
                    sources.setdefault(g, replica)
    return sources


def copy_from_peers(survivor: Survivor, sources: dict[int, KVCache]) -> KVCache:
    """Keep the held KV; copy each missing KV head from where it survived (a KV copy between devices)."""
    cache = survivor.cache.regrouped(survivor.shard.kv_heads)
    if cache.length == 0:
        return cache  # the failure struck during the prefill: nothing to copy
    for g in survivor.missing_kv_heads:
        if g not in sources:
            raise RecoveryImpossible(f"KV head {g + 1} survived nowhere (its device and its buddy are both lost)")
        for layer in range(cache.num_layers):
            k, v = sources[g].head(layer, g)
            cache.put_head(layer, g, k[:cache.length], v[:cache.length])
    return cache


# --------------------------------------------------------------------------------------------
# Replication during normal running


def replicate_new_kv(state: DeviceState, start: int, length: int, collective: ThreadCollective) -> None:
    """Send this step's new KV entries to the buddy (next device); store the predecessor's.

    A copy counts only the positions it holds from 0 on: one started in the middle of a run (its
    predecessor's earlier entries never sent) claims nothing until it is filled from 0.
    """
    cache = state.cache
    sent = (state.device, cache.kv_heads, [k[:, start:start + length] for k in cache.k],
            [v[:, start:start + length] for v in cache.v])
    source, kv_heads, keys, values = collective.ring_pass(state.device, sent)
    if source == state.device:
        return  # a single device has no buddy
    replica = state.replicas.get(source)
    if replica is None or replica.kv_heads != kv_heads:  # a new predecessor, or its heads changed
        replica = KVCache(cache.num_layers, kv_heads, cache.head_dim, cache.dtype, max(start + length, 1))
        state.replicas = {source: replica}  # a device keeps only its current predecessor's copy
    for layer, (k, v) in enumerate(zip(keys, values)):
        replica.write(layer, start, k, v)
    if start <= replica.length:
        replica.length = max(replica.length, start + length)
