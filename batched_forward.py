"""One device's part of a forward step over a ragged batch: several sequences, each at its own
positions, packed as rows of one tensor, their KV in blocks of a paged cache.

Everything that does not mix positions runs once for the whole batch: the embedding, the norms,
each projection (one matmul for every row of every sequence), the MLP, the sums over devices.
Only attention is per sequence: each chunk's queries read its own sequence's keys and values,
gathered from the blocks its block table names (request_scheduler.py hands out the tables; every
device keeps its KV heads of a block at the same block number). Only the rows that need a token
are turned into logits, and by default only the greedy token and its margin over the runner-up
cross devices (two numbers per row from each device, not its share of a 128256-wide row).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from request_scheduler import ScheduledChunk, hidden_block_bytes, kv_block_bytes
from tensor_parallel_model import (CPU, Collective, DeviceState, ResidualStream, Rotary, blocks_linear,
                                   causal_attention, decode_attention, kv_weight_rows, linear, logits_partial,
                                   mlp_partial, project_kv_heads, project_qkv, project_queries)


Blocks = Sequence[tuple[int, int]]  # (old block number, new one) for every block carried into a new pool


class PagedKVCache:
    """A device's K and V for the KV heads it holds, in blocks of `block_size` positions.

    Per layer `[kv_heads, num_blocks * block_size, head_dim]`: block b holds positions of whichever
    sequence owns it in slots b * block_size ... A sequence's entries are read by gathering the
    slots its block table names, so sequences grow and end without any copying.
    """

    def __init__(self, num_layers: int, kv_heads: Sequence[int], head_dim: int, dtype: torch.dtype,
                 num_blocks: int, block_size: int, device: torch.device = CPU):
        self.kv_heads, self.num_blocks, self.block_size = tuple(kv_heads), num_blocks, block_size
        self.num_layers, self.head_dim, self.dtype, self.device = num_layers, head_dim, dtype, device
        shape = (len(self.kv_heads), num_blocks * block_size, head_dim)  # empty: a page costs memory once written
        self.k = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]

    @staticmethod
    def block_nbytes(num_layers: int, kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype) -> int:
        """What one block costs on a device holding `kv_heads` KV heads: K and V of every layer."""
        return kv_block_bytes(num_layers, kv_heads, head_dim, block_size, dtype.itemsize)

    def slots(self, block_table: Sequence[int], start: int, length: int) -> torch.Tensor:
        """The cache slots of positions start..start+length of the sequence with this block table."""
        return table_slots(block_table, start, length, self.block_size).to(self.device)

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v: [held KV heads, len(slots), head_dim], into the given slots."""
        self.k[layer].index_copy_(1, slots, k)
        self.v[layer].index_copy_(1, slots, v)

    def write_heads(self, layer: int, kv_heads: Sequence[int], slots: torch.Tensor, k: torch.Tensor,
                    v: torch.Tensor) -> None:
        """k, v: [len(kv_heads), len(slots), head_dim] of some held heads (those a rebuild fills)."""
        for i, g in enumerate(kv_heads):
            at = self.kv_heads.index(g)
            self.k[layer][at].index_copy_(0, slots, k[i])
            self.v[layer][at].index_copy_(0, slots, v[i])

    def read(self, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[held KV heads, len(slots), head_dim] each: a sequence's entries, in position order."""
        return self.k[layer].index_select(1, slots), self.v[layer].index_select(1, slots)

    def read_head(self, layer: int, kv_head: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        at = self.kv_heads.index(kv_head)
        return self.k[layer][at].index_select(0, slots), self.v[layer][at].index_select(0, slots)

    def carried(self, kv_heads: Sequence[int], num_blocks: int, blocks: Blocks) -> "PagedKVCache":
        """A new pool for `kv_heads` and `num_blocks`: the heads held before keep their entries in
        the given blocks, each at its new number (the same bits); heads new here start empty."""
        cache = PagedKVCache(self.num_layers, kv_heads, self.head_dim, self.dtype, num_blocks, self.block_size,
                             self.device)
        old, new = block_slots(blocks, self.block_size, self.device)
        for g in set(kv_heads) & set(self.kv_heads):
            src, dst = self.kv_heads.index(g), cache.kv_heads.index(g)
            for layer in range(self.num_layers):
                cache.k[layer][dst].index_copy_(0, new, self.k[layer][src].index_select(0, old))
                cache.v[layer][dst].index_copy_(0, new, self.v[layer][src].index_select(0, old))
        return cache


class PagedHiddenStates:
    """Every layer's normed input (`h_l`, the input of its K/V projections) at each slot of the
    pool, kept for reuse-hidden: paged like the KV, so a block's positions are at the same slots."""

    def __init__(self, num_layers: int, hidden_size: int, dtype: torch.dtype, num_blocks: int, block_size: int,
                 device: torch.device = CPU):
        self.num_blocks, self.block_size, self.device = num_blocks, block_size, device
        self.x = [torch.empty((num_blocks * block_size, hidden_size), dtype=dtype, device=device)
                  for _ in range(num_layers)]

    @staticmethod
    def block_nbytes(num_layers: int, hidden_size: int, block_size: int, dtype: torch.dtype) -> int:
        return hidden_block_bytes(num_layers, hidden_size, block_size, dtype.itemsize)

    def write(self, layer: int, slots: torch.Tensor, h: torch.Tensor) -> None:
        self.x[layer].index_copy_(0, slots, h)

    def read(self, layer: int, slots: torch.Tensor) -> torch.Tensor:
        return self.x[layer].index_select(0, slots)

    def carried(self, num_blocks: int, blocks: Blocks) -> "PagedHiddenStates":
        store = PagedHiddenStates(len(self.x), self.x[0].shape[1], self.x[0].dtype, num_blocks, self.block_size,
                                  self.device)
        old, new = block_slots(blocks, self.block_size, self.device)
        for layer, x in enumerate(self.x):
            store.x[layer].index_copy_(0, new, x.index_select(0, old))
        return store


@dataclass
class PagedPool:
    """Everything a device keeps per block for many requests: its KV, and as its pool's spec says
    (device_protocol.PoolSpec) the layers' inputs and a copy of its ring predecessor's KV."""

    spec: Any
    kv: PagedKVCache
    hidden: PagedHiddenStates | None = None
    replica: PagedKVCache | None = None
    replica_of: int | None = None

    def carried(self, spec: Any, kv_heads: Sequence[int], blocks: Blocks) -> "PagedPool":
        """The pool of a new generation holding the same blocks at their new numbers (the survivors'
        KV, hidden states and replica, as they were), for the KV heads the device holds now."""
        return PagedPool(spec, self.kv.carried(kv_heads, spec.num_blocks, blocks),
                         None if self.hidden is None else self.hidden.carried(spec.num_blocks, blocks),
                         None if self.replica is None else self.replica.carried(self.replica.kv_heads,
                                                                                spec.num_blocks, blocks),
                         self.replica_of)


def table_slots(block_table: Sequence[int], start: int, length: int, block_size: int) -> torch.Tensor:
    """The slots of positions start..start+length of a sequence with this block table."""
    positions = torch.arange(start, start + length)
    blocks = torch.tensor(block_table, dtype=torch.long)[positions // block_size]
    return blocks * block_size + positions % block_size


def block_slots(blocks: Blocks, block_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The slots of every (old, new) block pair: (old slots, new slots), in the same order."""
    pairs = torch.tensor(list(blocks), dtype=torch.long).view(-1, 2)
    within = torch.arange(block_size)
    return tuple((pairs[:, i, None] * block_size + within).reshape(-1).to(device) for i in (0, 1))


@dataclass(frozen=True)
class Greedy:
    """The greedy token of each row that samples, its logit's margin over the runner-up, and the
    row's largest |logit|: a near-tie is a margin within the noise relative to that scale
    (lossless_checks.near_ties)."""

    token_ids: tuple[int, ...]
    margins: tuple[float, ...]
    scales: tuple[float, ...]


def positions_of(chunks: Sequence[ScheduledChunk]) -> torch.Tensor:
    """Every row's position in its own sequence, chunk after chunk."""
    return torch.cat([torch.arange(c.start, c.start + len(c.token_ids)) for c in chunks])


def rope_at(rotary: Rotary, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin for arbitrary positions, one row each (the rows of a ragged batch)."""
    cos, signed_sin = rotary.factors(0, int(positions.max()) + 1)
    index = positions.to(cos.device)
    return cos.index_select(0, index), signed_sin.index_select(0, index)


def step_slots(cache: PagedKVCache, chunks: Sequence[ScheduledChunk]) -> torch.Tensor:
    """The slots every row of the step writes, chunk after chunk."""
    return torch.cat([cache.slots(c.block_table, c.start, len(c.token_ids)) for c in chunks])


@dataclass(frozen=True)
class DecodeBatch:
    """The step's one-token chunks, attended together: each row's keys gathered into a row of the
    longest context's width, the padding masked out (it repeats the row's first slot: a written
    one, so the masked scores are finite before the mask)."""

    rows: torch.Tensor   # their rows in the step
    slots: torch.Tensor  # [len(rows) * width]: row after row
    mask: torch.Tensor   # [len(rows), width]: 0 on the row's own keys, -inf on the padding
    width: int


@dataclass(frozen=True)
class StepReads:
    """What each chunk's attention reads, worked out once per step: it is the same in every layer."""

    context: tuple[torch.Tensor | None, ...]  # per chunk, the slots of its positions 0..end; None: in `decode`
    decode: DecodeBatch | None


def step_reads(cache: PagedKVCache, chunks: Sequence[ScheduledChunk]) -> StepReads:
    """Prefill chunks read their own contexts one by one; two or more one-token chunks (decodes) are
    read and attended as one padded batch, one kernel per layer instead of one per sequence. One
    decode alone keeps the one-sequence kernel, bit for bit."""
    ends = [c.start + len(c.token_ids) for c in chunks]
    decoding = [i for i, c in enumerate(chunks) if len(c.token_ids) == 1]
    decoding = decoding if len(decoding) > 1 else []
    context = tuple(None if i in decoding else cache.slots(c.block_table, 0, ends[i]) for i, c in enumerate(chunks))
    if not decoding:
        return StepReads(context, None)
    width = max(ends[i] for i in decoding)
    slots = torch.empty((len(decoding), width), dtype=torch.long)
    mask = torch.full((len(decoding), width), float("-inf"))
    for r, i in enumerate(decoding):
        own = table_slots(chunks[i].block_table, 0, ends[i], cache.block_size)
        slots[r, :ends[i]], slots[r, ends[i]:] = own, own[0]
        mask[r, :ends[i]] = 0.0
    first_rows = torch.cumsum(torch.tensor([0] + [len(c.token_ids) for c in chunks[:-1]]), 0)
    return StepReads(context, DecodeBatch(first_rows[decoding].to(cache.device), slots.view(-1).to(cache.device),
                                          mask.to(cache.device), width))


def attention_inputs(state: DeviceState, cache: PagedKVCache, layer_index: int,
                     slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The keys and values at `slots`, one per query head's KV head where a GQA group is split unevenly."""
    keys, values = cache.read(layer_index, slots)
    if not state.shard.grouped_in_order:  # a GQA group split unevenly: give each query head its KV head
        keys = keys.index_select(0, state.shard.kv_slot_of_query)
        values = values.index_select(0, state.shard.kv_slot_of_query)
    return keys, values


def batched_attention_partial(state: DeviceState, cache: PagedKVCache, layer_index: int, h: torch.Tensor,
                              chunks: Sequence[ScheduledChunk], rope: tuple[torch.Tensor, torch.Tensor],
                              slots: torch.Tensor, reads: StepReads,
                              fill: Sequence[int] | None = None) -> torch.Tensor:
    """This device's heads' share of the attention output for every row of the batch: [rows, hidden].
    Q, K and V of all rows in one projection; the new K and V into each sequence's blocks; then each
    prefill chunk's queries against its own sequence's keys, and the decodes' together (`reads`).
    With `fill` (replay after a failure) only the K and V of those KV heads are projected and
    written: the others are kept, and read."""
    shard, layer, hd = state.shard, state.shard.layers[layer_index], state.config.head_dim
    if fill is None:
        q, k, v = project_qkv(layer, len(shard.query_heads), len(shard.kv_heads), hd, h, rope)
        cache.write(layer_index, slots, k, v)
    else:
        q = project_queries(shard, layer, h, rope, hd)
        if fill:
            cache.write_heads(layer_index, fill, slots, *project_kv_heads(layer, kv_weight_rows(shard, fill, hd),
                                                                         h, rope, hd))
    out, row = q.new_empty(q.shape), 0
    for chunk, context in zip(chunks, reads.context):
        length = len(chunk.token_ids)
        if context is not None:
            keys, values = attention_inputs(state, cache, layer_index, context)
            out[:, row:row + length] = causal_attention(q[:, row:row + length], keys, values, chunk.start)
        row += length
    if reads.decode is not None:
        decode = reads.decode
        keys, values = attention_inputs(state, cache, layer_index, decode.slots)
        batched = (keys.shape[0], len(decode.rows), decode.width, hd)
        out[:, decode.rows] = decode_attention(q.index_select(1, decode.rows), keys.view(batched),
                                               values.view(batched), decode.mask)
    out = out.transpose(0, 1).reshape(h.shape[0], -1)
    return linear(out, layer.wo) if not layer.inherited else blocks_linear(layer, out, lambda b: b.wo)


def batched_forward(state: DeviceState, cache: PagedKVCache, chunks: Sequence[ScheduledChunk], collective: Collective,
                    logits: bool = False, hidden: PagedHiddenStates | None = None,
                    fill: Sequence[int] | None = None) -> Greedy | torch.Tensor | None:
    """One device's part of a step over a ragged batch (every chunk's tokens, packed as rows).

    Returns, for the rows of the chunks that sample: their greedy tokens and margins (`Greedy`), or
    with `logits` their whole logits rows ([sampling chunks, vocab]); None when no chunk samples.
    `hidden`: record every layer's normed input at the step's slots. `fill`: replay (see
    `batched_attention_partial`)."""
    token_ids = torch.tensor([t for chunk in chunks for t in chunk.token_ids], dtype=torch.long)
    rope = rope_at(state.rotary, positions_of(chunks))
    slots, reads = step_slots(cache, chunks), step_reads(cache, chunks)
    stream = ResidualStream(state, token_ids, collective)
    for i, layer in enumerate(state.shard.layers):
        h = stream.normed(layer.input_norm)
        if hidden is not None:
            hidden.write(i, slots, h)
        stream.add(batched_attention_partial(state, cache, i, h, chunks, rope, slots, reads, fill))
        stream.add(mlp_partial(layer, stream.normed(layer.post_norm)))
    ends = torch.cumsum(torch.tensor([len(c.token_ids) for c in chunks]), 0) - 1
    ends = ends[torch.tensor([c.samples for c in chunks])]
    if not len(ends):
        return None
    h = stream.normed(state.vocab.final_norm).index_select(0, ends.to(stream.x.device))
    partial = logits_partial(h, state.vocab)
    if logits:
        return torch.cat(collective.all_gather(state.device, partial), dim=-1)
    return greedy_over_devices(state, partial, collective)


def greedy_over_devices(state: DeviceState, partial: torch.Tensor, collective: Collective) -> Greedy:
    """The argmax over the whole vocabulary from each device's columns, and its margin over the
    runner-up: each device offers its own best two (logit and vocabulary id) per row, and the best
    two of all the offers win; among equal logits the lowest id, as torch.argmax over a whole row."""
    top = partial.float().topk(min(2, partial.shape[1]), dim=-1)
    k = top.values.shape[1]
    columns = torch.cat([torch.arange(b.start, b.stop) for b in state.vocab.blocks]).to(partial.device)
    largest = partial.float().abs().amax(dim=-1, keepdim=True)
    offers = torch.cat([top.values, columns[top.indices].float(), largest], dim=-1)  # ids < 2^24: exact as floats
    gathered = collective.all_gather(state.device, offers)
    values = torch.cat([g[:, :k] for g in gathered], dim=-1)
    vocab_ids = torch.cat([g[:, k:2 * k] for g in gathered], dim=-1).long()
    scales = torch.cat([g[:, 2 * k:] for g in gathered], dim=-1).amax(dim=-1)
    by_id = vocab_ids.argsort(dim=-1)
    values, vocab_ids = values.gather(-1, by_id), vocab_ids.gather(-1, by_id)
    ranked = (-values).argsort(dim=-1, stable=True)[:, :2]
    best = values.gather(-1, ranked)
    return Greedy(tuple(vocab_ids.gather(-1, ranked[:, :1]).squeeze(-1).tolist()),
                  tuple((best[:, 0] - best[:, -1]).tolist()), tuple(scales.tolist()))


def replicate_slots(pool: PagedPool, slots: torch.Tensor, device: int, collective: Collective, buddy: int,
                    predecessor: int) -> None:
    """This device's KV at `slots` (a step's, or every running request's after a recovery) to its
    ring buddy, a real transfer; the predecessor's into the replica, at the same slots (the block
    tables are the same on every device): the copy that `replicate` promotes after a failure."""
    kv = pool.kv
    collective.send(device, buddy, (device, kv.kv_heads, slots, [k.index_select(1, slots) for k in kv.k],
                                    [v.index_select(1, slots) for v in kv.v]))
    source, kv_heads, at, keys, values = collective.recv(device, predecessor)
    if pool.replica is None or pool.replica_of != source or pool.replica.kv_heads != kv_heads:
        pool.replica = PagedKVCache(kv.num_layers, kv_heads, kv.head_dim, kv.dtype, kv.num_blocks, kv.block_size,
                                    kv.device)
        pool.replica_of = source
    for layer, (k, v) in enumerate(zip(keys, values)):
        pool.replica.write(layer, at.to(kv.device), k.to(kv.device), v.to(kv.device))
