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
from typing import Sequence

import torch
import torch.nn.functional as F

from request_scheduler import ScheduledChunk
from tensor_parallel_model import (CPU, Collective, DeviceState, ResidualStream, Rotary, blocks_linear,
                                   causal_attention, logits_partial, mlp_partial, project_qkv)


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
        return 2 * num_layers * kv_heads * block_size * head_dim * dtype.itemsize

    def slots(self, block_table: Sequence[int], start: int, length: int) -> torch.Tensor:
        """The cache slots of positions start..start+length of the sequence with this block table."""
        positions = torch.arange(start, start + length)
        blocks = torch.tensor(block_table, dtype=torch.long)[positions // self.block_size]
        return (blocks * self.block_size + positions % self.block_size).to(self.device)

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v: [held KV heads, len(slots), head_dim], into the given slots."""
        self.k[layer].index_copy_(1, slots, k)
        self.v[layer].index_copy_(1, slots, v)

    def read(self, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[held KV heads, len(slots), head_dim] each: a sequence's entries, in position order."""
        return self.k[layer].index_select(1, slots), self.v[layer].index_select(1, slots)


@dataclass(frozen=True)
class Greedy:
    """The greedy token of each row that samples, and its logit's margin over the runner-up (a
    near-tie shows as a margin within the numerical noise)."""

    token_ids: tuple[int, ...]
    margins: tuple[float, ...]


def positions_of(chunks: Sequence[ScheduledChunk]) -> torch.Tensor:
    """Every row's position in its own sequence, chunk after chunk."""
    return torch.cat([torch.arange(c.start, c.start + len(c.token_ids)) for c in chunks])


def rope_at(rotary: Rotary, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin for arbitrary positions, one row each (the rows of a ragged batch)."""
    cos, signed_sin = rotary.factors(0, int(positions.max()) + 1)
    index = positions.to(cos.device)
    return cos.index_select(0, index), signed_sin.index_select(0, index)


def batched_attention_partial(state: DeviceState, cache: PagedKVCache, layer_index: int, h: torch.Tensor,
                              chunks: Sequence[ScheduledChunk], rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """This device's heads' share of the attention output for every row of the batch: [rows, hidden].
    Q, K and V of all rows in one projection; the new K and V into each sequence's blocks; then each
    chunk's queries against its own sequence's keys."""
    shard, layer, hd = state.shard, state.shard.layers[layer_index], state.config.head_dim
    q, k, v = project_qkv(layer, len(shard.query_heads), len(shard.kv_heads), hd, h, rope)
    cache.write(layer_index, torch.cat([cache.slots(c.block_table, c.start, len(c.token_ids)) for c in chunks]), k, v)
    outputs, row = [], 0
    for chunk in chunks:
        length = len(chunk.token_ids)
        keys, values = cache.read(layer_index, cache.slots(chunk.block_table, 0, chunk.start + length))
        if not shard.grouped_in_order:  # a GQA group split unevenly: give each query head its KV head
            keys = keys.index_select(0, shard.kv_slot_of_query)
            values = values.index_select(0, shard.kv_slot_of_query)
        outputs.append(causal_attention(q[:, row:row + length], keys, values, chunk.start))
        row += length
    out = torch.cat(outputs, dim=1).transpose(0, 1).reshape(h.shape[0], -1)
    return F.linear(out, layer.wo) if not layer.inherited else blocks_linear(layer, out, lambda b: b.wo)


def batched_forward(state: DeviceState, cache: PagedKVCache, chunks: Sequence[ScheduledChunk], collective: Collective,
                    logits: bool = False) -> Greedy | torch.Tensor | None:
    """One device's part of a step over a ragged batch (every chunk's tokens, packed as rows).

    Returns, for the rows of the chunks that sample: their greedy tokens and margins (`Greedy`), or
    with `logits` their whole logits rows ([sampling chunks, vocab]); None when no chunk samples."""
    token_ids = torch.tensor([t for chunk in chunks for t in chunk.token_ids], dtype=torch.long)
    rope = rope_at(state.rotary, positions_of(chunks))
    stream = ResidualStream(state, token_ids, collective)
    for i, layer in enumerate(state.shard.layers):
        stream.add(batched_attention_partial(state, cache, i, stream.normed(layer.input_norm), chunks, rope))
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
    columns = torch.cat([torch.arange(b.start, b.stop) for b in state.vocab.blocks]).to(partial.device)
    offers = torch.cat([top.values, columns[top.indices].float()], dim=-1)  # ids < 2^24: exact as floats
    gathered = collective.all_gather(state.device, offers)
    values = torch.cat([g[:, :g.shape[1] // 2] for g in gathered], dim=-1)
    vocab_ids = torch.cat([g[:, g.shape[1] // 2:] for g in gathered], dim=-1).long()
    by_id = vocab_ids.argsort(dim=-1)
    values, vocab_ids = values.gather(-1, by_id), vocab_ids.gather(-1, by_id)
    ranked = (-values).argsort(dim=-1, stable=True)[:, :2]
    best = values.gather(-1, ranked)
    return Greedy(tuple(vocab_ids.gather(-1, ranked[:, :1]).squeeze(-1).tolist()),
                  tuple((best[:, 0] - best[:, -1]).tolist()))
