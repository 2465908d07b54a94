"""The Llama forward pass split by attention heads, MLP columns and vocabulary rows, as one device computes it.

Everything a device does is a plain function of its shard, its KV cache and its inputs; the only
thing that crosses devices is the `Collective`: the embedding of the step's tokens (each device
looks up the rows of its own vocabulary slice), partial outputs summed twice per layer (all-reduce,
or reduce-scatter then all-gather of the normed rows when a step has many tokens) and a gather of
the logits. Threads implement it (device_threads.py); torch.distributed implements the same calls
(all_reduce, reduce_scatter_tensor, all_gather_into_tensor, send/recv), so a process backend can
replace the threads without touching this file.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Callable, Protocol, Sequence

import torch
import torch.nn.functional as F

from head_assignment import Assignment, Range
from llama_model_loader import Checkpoint, LlamaConfig

CPU = torch.device("cpu")


def settle(device: torch.device) -> None:
    """Wait for the work queued on `device` (a GPU runs it asynchronously: a clock read before it
    finishes would time the queueing, not the compute). Nothing to wait for on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Collective(Protocol):
    """What crosses the device boundary during a forward pass. Results may be shared between
    devices (threads): read them, never modify them in place."""

    def all_reduce(self, device: int, tensor: torch.Tensor) -> torch.Tensor:
        """The sum of every device's `tensor` (same shape), returned to each device."""

    def own_rows(self, device: int, length: int) -> slice:
        """The rows of a `length`-row tensor that `device` holds when it is split by rows."""

    def reduce_scatter(self, device: int, tensor: torch.Tensor) -> torch.Tensor:
        """This device's rows (`own_rows`) of the sum of every device's `tensor`."""

    def all_gather_rows(self, device: int, rows: torch.Tensor, length: int) -> torch.Tensor:
        """Every device's `rows` (its `own_rows` of a `length`-row tensor), joined: the whole tensor."""

    def all_gather(self, device: int, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Every device's `tensor`, in device order."""

    def send(self, device: int, to: int, payload: object) -> None:
        """Hand `payload` to device `to` (point to point: KV copies between devices)."""

    def recv(self, device: int, source: int) -> object:
        """What device `source` sent to this device."""

    def flush(self) -> None:
        """Return once every send this device started has been taken by its receiver."""


# --------------------------------------------------------------------------------------------
# RoPE and RMSNorm (Hugging Face conventions: rotate_half layout, norm computed in fp32)


def rope_inverse_frequencies(config: LlamaConfig) -> torch.Tensor:
    """inv_freq per rotary pair, with llama3 scaling of the long wavelengths when configured."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = config.rope_scaling or {}
    if scaling.get("rope_type") != "llama3":
        return inv_freq
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    original = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    smooth = (original / wavelen - low) / (high - low)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    scaled = torch.where(wavelen > original / low, inv_freq / factor, inv_freq)
    in_between = (wavelen >= original / high) & (wavelen <= original / low)
    return torch.where(in_between, blended, scaled)


class Rotary:
    """cos/sin tables for positions, grown on demand (shared read-only by a device's layers)."""

    def __init__(self, config: LlamaConfig, dtype: torch.dtype, device: torch.device = CPU):
        self.inv_freq = rope_inverse_frequencies(config).to(device)
        self.dtype = dtype
        self.cos = self.sin = self.signed_sin = torch.empty(0, config.head_dim, dtype=dtype, device=device)

    def tables(self, start: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin for positions start..start+length: [length, head_dim] each (HF's tables)."""
        self._reserve(start + length)
        return self.cos[start:start + length], self.sin[start:start + length]

    def factors(self, start: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and `signed_sin` (sin with its first half negated), the factors `apply_rope` takes."""
        self._reserve(start + length)
        return self.cos[start:start + length], self.signed_sin[start:start + length]

    def _reserve(self, positions: int) -> None:
        if positions <= self.cos.shape[0]:
            return
        positions = max(positions, 2 * self.cos.shape[0], 256)
        freqs = torch.outer(torch.arange(positions, dtype=torch.float32, device=self.inv_freq.device), self.inv_freq)
        angles = torch.cat([freqs, freqs], dim=-1)
        sign = torch.cat([-torch.ones_like(freqs[0]), torch.ones_like(freqs[0])])
        self.cos, self.sin = angles.cos().to(self.dtype), angles.sin().to(self.dtype)
        self.signed_sin = (angles.sin() * sign).to(self.dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """HF's `x * cos + rotate_half(x) * sin` for x: [..., T, heads, head_dim] or [heads, T, head_dim].

    rotate_half(x) = (-x2, x1) is a roll by half a head with the first half negated, so with the
    sign folded into `signed_sin` it is one roll and three elementwise ops.
    """
    return x * cos + torch.roll(x, x.shape[-1] // 2, dims=-1) * signed_sin


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """As HF: normalise in fp32, cast back, then scale by the weight (one fused op in fp32)."""
    if x.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    return F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype) * weight


# --------------------------------------------------------------------------------------------
# Shards: the weight slices a device holds


@dataclass
class LayerShard:
    """One layer's slices on one device. Norm weights are replicated (every device has them).

    Slices inherited in a recovery are kept as blocks of their own (`inherited`, each laid out as
    this one), never copied into the first: the heads and columns a device holds are the first
    block's then each inherited block's, in order. Inheriting then writes only the new slices.
    """

    wqkv: torch.Tensor       # [(q_heads + 2 * kv_heads) * head_dim, hidden]: own Q rows, held K rows, held V rows
    wo: torch.Tensor         # [hidden, q_heads * head_dim]: the columns of own heads
    w_gate_up: torch.Tensor  # [2 * mlp_width, hidden]: gate rows then up rows of own MLP columns
    w_down: torch.Tensor     # [hidden, mlp_width]
    input_norm: torch.Tensor
    post_norm: torch.Tensor
    inherited: tuple["LayerShard", ...] = ()

    @property
    def blocks(self) -> tuple["LayerShard", ...]:
        return (self, *self.inherited)

    @property
    def block_nbytes(self) -> int:
        """Bytes of this block's own matrices (norms apart: each block refers to the first's)."""
        return sum(t.nbytes for t in (self.wqkv, self.wo, self.w_gate_up, self.w_down))

    def heads(self, head_dim: int) -> tuple[int, int]:
        """(query heads, KV heads) of this block alone."""
        nq = self.wo.shape[1] // head_dim
        return nq, (self.wqkv.shape[0] // head_dim - nq) // 2


@dataclass(frozen=True)
class VocabBlock:
    """Consecutive vocabulary rows from `start`: of the embedding (its tokens' lookups) and of the
    output projection (its share of the logits), the same tensor when they are tied."""

    start: int
    embed: torch.Tensor    # [rows, hidden]
    lm_head: torch.Tensor  # [rows, hidden]: `embed` itself when tied

    @property
    def stop(self) -> int:
        return self.start + self.embed.shape[0]

    def cut(self, start: int, stop: int) -> "VocabBlock":
        """Rows start..stop of this block, as views (nothing copied)."""
        a, b = start - self.start, stop - self.start
        tied = self.lm_head is self.embed
        embed = self.embed[a:b]
        return VocabBlock(start, embed, embed if tied else self.lm_head[a:b])


@dataclass
class VocabSlice:
    """A device's rows of the vocabulary, `rows` [start, stop), as blocks in order (one at load; a
    recovery adds the rows it inherits as blocks of their own and keeps the rest as views), and the
    final norm."""

    rows: Range
    blocks: tuple[VocabBlock, ...]
    final_norm: torch.Tensor

    @property
    def nbytes(self) -> int:
        """Bytes of memory held, counted once per storage (a view keeps its whole storage alive)."""
        tensors = [t for b in self.blocks for t in (b.embed, b.lm_head)] + [self.final_norm]
        return held_bytes(tensors)


def held_bytes(tensors: Sequence[torch.Tensor]) -> int:
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


@dataclass
class DeviceShard:
    device: int
    query_heads: tuple[int, ...]
    kv_heads: tuple[int, ...]
    mlp: tuple[Range, ...]
    layers: list[LayerShard]
    group_size: int
    kv_slot_of_query: torch.Tensor = field(init=False)  # local KV index read by each local query head
    grouped_in_order: bool = field(init=False)  # query heads come in equal runs per KV slot (SDPA's GQA)

    def __post_init__(self) -> None:
        slots = [self.kv_heads.index(h // self.group_size) for h in self.query_heads]
        self.kv_slot_of_query = torch.tensor(slots, dtype=torch.long, device=self.layers[0].wqkv.device)
        nq, nkv = len(slots), len(self.kv_heads)
        self.grouped_in_order = nq % nkv == 0 and slots == [i // (nq // nkv) for i in range(nq)]

    @property
    def nbytes(self) -> int:
        return sum(block.block_nbytes for layer in self.layers for block in layer.blocks) + \
            sum(layer.input_norm.nbytes + layer.post_norm.nbytes for layer in self.layers)


def head_rows(heads: Sequence[int], head_dim: int) -> list[Range]:
    """Row ranges of a projection for the given heads, adjacent heads merged into one read."""
    ranges: list[Range] = []
    for h in heads:
        start, stop = h * head_dim, (h + 1) * head_dim
        if ranges and ranges[-1][1] == start:
            ranges[-1] = (ranges[-1][0], stop)
        else:
            ranges.append((start, stop))
    return ranges


def load_layer_shard(checkpoint: Checkpoint, layer: int, query_heads: Sequence[int], kv_heads: Sequence[int],
                     mlp: Sequence[Range], dtype: torch.dtype) -> LayerShard:
    """Read only this device's rows and columns of one layer."""
    hd, p = checkpoint.config.head_dim, f"model.layers.{layer}."
    q_rows, kv_rows = head_rows(query_heads, hd), head_rows(kv_heads, hd)
    read = checkpoint.read
    nq, nkv, width = (sum(b - a for a, b in r) for r in (q_rows, kv_rows, mlp))
    wqkv = torch.empty(nq + 2 * nkv, checkpoint.config.hidden_size, dtype=dtype,
                       device=checkpoint.device)  # read in place: no cat copy
    read(p + "self_attn.q_proj.weight", dtype, rows=q_rows, out=wqkv[:nq])
    read(p + "self_attn.k_proj.weight", dtype, rows=kv_rows, out=wqkv[nq:nq + nkv])
    read(p + "self_attn.v_proj.weight", dtype, rows=kv_rows, out=wqkv[nq + nkv:])
    w_gate_up = torch.empty(2 * width, checkpoint.config.hidden_size, dtype=dtype, device=checkpoint.device)
    read(p + "mlp.gate_proj.weight", dtype, rows=mlp, out=w_gate_up[:width])
    read(p + "mlp.up_proj.weight", dtype, rows=mlp, out=w_gate_up[width:])
    return LayerShard(
        wqkv=wqkv,
        wo=read(p + "self_attn.o_proj.weight", dtype, cols=q_rows),
        w_gate_up=w_gate_up,
        w_down=read(p + "mlp.down_proj.weight", dtype, cols=mlp),
        input_norm=read(p + "input_layernorm.weight", dtype),
        post_norm=read(p + "post_attention_layernorm.weight", dtype),
    )


def load_device_shard(checkpoint: Checkpoint, assignment: Assignment, device: int, dtype: torch.dtype,
                      on_layer: Callable[[], object] = lambda: None) -> DeviceShard:
    """The device's slices of every layer (`on_layer` is called after each, for a progress bar)."""
    heads, kv_heads, mlp = assignment.heads[device], assignment.kv_heads(device), assignment.mlp[device]
    layers = []
    for i in range(checkpoint.config.num_hidden_layers):
        layers.append(load_layer_shard(checkpoint, i, heads, kv_heads, mlp, dtype))
        on_layer()
    return DeviceShard(device, heads, kv_heads, mlp, layers, assignment.group_size)


def extend_shard(shard: DeviceShard, checkpoint: Checkpoint, heads: Sequence[int], mlp: Sequence[Range],
                 dtype: torch.dtype, blocks: Sequence[LayerShard] | None = None,
                 on_layer: Callable[[], object] = lambda: None) -> DeviceShard:
    """The shard plus inherited query heads and MLP columns: one new block per layer, read from the
    checkpoint (only the new slices), or `blocks` already held (standby slices). `on_layer` is
    called after each block is read (the device's progress).

    Attention and the MLP do not depend on the order of heads or columns, only on Q rows, Wo
    columns and KV slots agreeing: the new heads come after the old ones, their new KV heads too.
    """
    new_kv = tuple(sorted({h // shard.group_size for h in heads} - set(shard.kv_heads)))
    if blocks is None:
        blocks = []
        for i in range(len(shard.layers)):
            blocks.append(load_layer_shard(checkpoint, i, heads, new_kv, mlp, dtype))
            on_layer()
    layers = [replace(old, inherited=old.inherited + (replace(new, input_norm=old.input_norm,
                                                              post_norm=old.post_norm),))
              for old, new in zip(shard.layers, blocks)]
    return DeviceShard(shard.device, shard.query_heads + tuple(heads), shard.kv_heads + new_kv,
                       shard.mlp + tuple(mlp), layers, shard.group_size)


@dataclass(frozen=True)
class StandbySlices:
    """What a device would inherit if `failed` died first (the reassignment is known in advance),
    read before any failure, so that inheriting it costs no read (`--standby-weights`)."""

    failed: int
    heads: tuple[int, ...]
    mlp: tuple[Range, ...]
    vocab_rows: Range
    layers: tuple[LayerShard, ...]
    vocab: tuple[VocabBlock, ...]

    @property
    def nbytes(self) -> int:
        return sum(layer.block_nbytes for layer in self.layers) + held_bytes(
            [t for b in self.vocab for t in (b.embed, b.lm_head)])


def load_standby(checkpoint: Checkpoint, before: Assignment, afters: dict[int, Assignment], device: int,
                 dtype: torch.dtype) -> tuple[StandbySlices, ...]:
    """For each failure `afters` plans (failed device -> the assignment after it), the slices
    `device` would inherit: heads, MLP columns and vocabulary rows it does not hold."""
    vocab_size, held_rows = checkpoint.config.vocab_size, before.vocab_range(device, checkpoint.config.vocab_size)
    standby = []
    for failed, after in sorted(afters.items()):
        heads = tuple(h for h in after.heads[device] if h not in before.heads[device])
        columns = missing_ranges(after.mlp[device], before.mlp[device])
        new_kv = tuple(sorted({h // before.group_size for h in heads} - set(before.kv_heads(device))))
        layers = tuple(load_layer_shard(checkpoint, i, heads, new_kv, columns, dtype)
                       for i in range(checkpoint.config.num_hidden_layers)) if heads or columns else ()
        rows = after.vocab_range(device, vocab_size)
        vocab = tuple(read_vocab_block(checkpoint, piece, dtype) for piece in missing_ranges((rows,), (held_rows,)))
        standby.append(StandbySlices(failed, heads, columns, rows, layers, vocab))
    return tuple(standby)


def load_vocab_slice(checkpoint: Checkpoint, rows: Range, dtype: torch.dtype, held: VocabSlice | None = None,
                     standby: Sequence[VocabBlock] = ()) -> VocabSlice:
    """The embedding and output rows `rows` [start, stop): those `held` already has kept as views,
    those in `standby` blocks taken as they are, the rest read."""
    have = rows_of(held.blocks if held else (), [rows])
    have += rows_of(standby, missing_ranges((rows,), [(b.start, b.stop) for b in have]))
    have += [read_vocab_block(checkpoint, piece, dtype)
             for piece in missing_ranges((rows,), [(b.start, b.stop) for b in have])]
    final_norm = held.final_norm if held else checkpoint.read("model.norm.weight", dtype)
    return VocabSlice(rows, tuple(sorted(have, key=lambda b: b.start)), final_norm)


def rows_of(blocks: Sequence[VocabBlock], ranges: Sequence[Range]) -> list[VocabBlock]:
    """The parts of `blocks` that fall in `ranges`, as views."""
    return [b.cut(max(start, b.start), min(stop, b.stop)) for start, stop in ranges for b in blocks
            if max(start, b.start) < min(stop, b.stop)]


def read_vocab_block(checkpoint: Checkpoint, rows: Range, dtype: torch.dtype) -> VocabBlock:
    embed = checkpoint.read("model.embed_tokens.weight", dtype, rows=[rows])
    tied = checkpoint.config.tie_word_embeddings
    return VocabBlock(rows[0], embed, embed if tied else checkpoint.read("lm_head.weight", dtype, rows=[rows]))


def missing_ranges(wanted: Sequence[Range], held: Sequence[Range]) -> tuple[Range, ...]:
    """The parts of `wanted` ranges not covered by `held` ones."""
    missing: list[Range] = []
    for start, stop in wanted:
        cursor = start
        for a, b in sorted(held):
            if b <= cursor or a >= stop:
                continue
            if a > cursor:
                missing.append((cursor, a))
            cursor = max(cursor, b)
        if cursor < stop:
            missing.append((cursor, stop))
    return tuple(missing)


def embed_partial(token_ids: torch.Tensor, vocab: VocabSlice) -> torch.Tensor:
    """This device's share of the embedding of `token_ids`: the rows of its own tokens, zeros for the
    others ([T, hidden]); the sum over devices is the embedding (each token has exactly one owner)."""
    out = vocab.blocks[0].embed.new_zeros((token_ids.shape[0], vocab.blocks[0].embed.shape[1]))
    token_ids = token_ids.to(out.device)
    for block in vocab.blocks:  # gather every token's row (clamped), keep its own: no data-dependent shape to wait for
        local = token_ids - block.start
        own = (local >= 0) & (local < block.embed.shape[0])
        out = torch.where(own[:, None], block.embed[local.clamp(0, block.embed.shape[0] - 1)], out)
    return out


# Rows for which x @ W^T goes as W @ x^T. For a few rows (a decode batch) MKL's sgemm repacks the
# whole of W on every call, so 8 rows cost 3x one row; W @ x^T takes another kernel that streams W
# much as a matrix-vector product does. Measured on one thread (2026-12-05, the 2-core Xeon with
# AVX-512, fp32, W 4096 x 2048): 8 rows 3.5 -> 2.6 ms, 16 rows 4.2 -> 2.5, 32 rows 5.8 -> 4.0; one
# row is the same kernel either way, 2 to 4 rows and 64 or more are faster as x @ W^T.
TRANSPOSED_ROWS = range(5, 49)


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight^T, as F.linear (no bias), by the faster of two fp32 CPU kernels for x's rows."""
    if (x.dim() == 2 and x.shape[0] in TRANSPOSED_ROWS and x.dtype == weight.dtype == torch.float32
            and x.device.type == "cpu"):
        return torch.mm(weight, x.t()).t().contiguous()
    return F.linear(x, weight)


def logits_partial(h: torch.Tensor, vocab: VocabSlice) -> torch.Tensor:
    """This device's columns of the logits for normed rows h: [T, its vocabulary rows]."""
    parts = [linear(h, block.lm_head) for block in vocab.blocks]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)


# --------------------------------------------------------------------------------------------
# KV cache: per device, per layer, per KV head


class KVCache:
    """A device's K and V for the KV heads it holds: per layer `[kv_heads, capacity, head_dim]`.

    Recovery strategies read and write single (layer, KV head) entries through `head` and
    `put_head`; the forward pass writes all held heads of a layer at once through `write`.
    """

    def __init__(self, num_layers: int, kv_heads: Sequence[int], head_dim: int, dtype: torch.dtype,
                 capacity: int = 256, device: torch.device = CPU):
        self.kv_heads = tuple(kv_heads)
        self.num_layers, self.head_dim, self.dtype, self.device = num_layers, head_dim, dtype, device
        shape = (len(self.kv_heads), capacity, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.length = 0

    @property
    def capacity(self) -> int:
        return self.k[0].shape[1]

    @property
    def nbytes(self) -> int:
        """Bytes of the entries in use (not the spare capacity)."""
        return 2 * self.num_layers * len(self.kv_heads) * self.length * self.head_dim * self.dtype.itemsize

    def reserve(self, length: int) -> None:
        """Grow capacity (doubling) so that `length` positions fit."""
        if length <= self.capacity:
            return
        capacity = max(length, 2 * self.capacity)
        for store in (self.k, self.v):
            for i, old in enumerate(store):
                store[i] = old.new_zeros((old.shape[0], capacity, self.head_dim))
                store[i][:, :old.shape[1]] = old

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v: [held KV heads, T, head_dim] for positions start..start+T."""
        self.reserve(start + k.shape[1])
        self.k[layer][:, start:start + k.shape[1]] = k
        self.v[layer][:, start:start + v.shape[1]] = v

    def upto(self, layer: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[layer][:, :length], self.v[layer][:, :length]

    def head(self, layer: int, kv_head: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One KV head's entries in use: ([length, head_dim], [length, head_dim])."""
        slot = self.kv_heads.index(kv_head)
        return self.k[layer][slot, :self.length], self.v[layer][slot, :self.length]

    def put_head(self, layer: int, kv_head: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Entries of one KV head for positions 0..len(k)."""
        self.put_head_at(layer, kv_head, 0, k, v)

    def put_head_at(self, layer: int, kv_head: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        self.put_heads(layer, [kv_head], start, k[None], v[None])

    def put_heads(self, layer: int, kv_heads: Sequence[int], start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Entries of several KV heads ([heads, T, head_dim]) from position `start`; one copy when
        the heads sit side by side in this cache."""
        slots = [self.kv_heads.index(g) for g in kv_heads]
        self.reserve(start + k.shape[1])
        stop = start + k.shape[1]
        if slots == list(range(slots[0], slots[0] + len(slots))):
            self.k[layer][slots[0]:slots[-1] + 1, start:stop] = k
            self.v[layer][slots[0]:slots[-1] + 1, start:stop] = v
            return
        for i, slot in enumerate(slots):
            self.k[layer][slot, start:stop] = k[i]
            self.v[layer][slot, start:stop] = v[i]

    def regrouped(self, kv_heads: Sequence[int]) -> "KVCache":
        """A cache for a new set of KV heads that keeps the entries of heads held before.

        Heads new to this device start empty and must be filled by a recovery strategy.
        """
        cache = KVCache(self.num_layers, kv_heads, self.head_dim, self.dtype, max(self.capacity, 1), self.device)
        cache.length = self.length
        for g in set(kv_heads) & set(self.kv_heads):
            for layer in range(self.num_layers):
                cache.put_head(layer, g, *self.head(layer, g))
        return cache

    def clone(self) -> "KVCache":
        return self.regrouped(self.kv_heads)


class HiddenStateStore:
    """Per-layer attention inputs of every past token (HCache-style checkpoints).

    What is stored is `h_l = rmsnorm(x_l) * w_input`, the input of layer l's K/V projections.
    Under tensor parallelism it is the same on every device, so any survivor can rebuild a lost
    KV head from it with one small matmul, `h_l Wk/Wv[lost]`, without the layers below. (Storing
    h_l rather than the residual x_l costs the same memory and saves the norm at recovery.)

    `length` counts only positions recorded in every layer from position 0: a store switched on
    after a prefill, or one that missed a step, never claims positions it does not hold.
    """

    def __init__(self, num_layers: int, hidden_size: int, dtype: torch.dtype, capacity: int = 256,
                 device: torch.device = CPU):
        self.x = torch.zeros((num_layers, capacity, hidden_size), dtype=dtype, device=device)
        self.length = 0
        self._recorded = [0] * num_layers  # per layer: positions 0.._recorded[l] are held

    @property
    def nbytes(self) -> int:
        return self.x[:, :self.length].numel() * self.x.dtype.itemsize

    def record(self, layer: int, start: int, x: torch.Tensor) -> None:
        if start + x.shape[0] > self.x.shape[1]:
            grown = self.x.new_zeros((self.x.shape[0], max(start + x.shape[0], 2 * self.x.shape[1]), self.x.shape[2]))
            grown[:, :self.x.shape[1]] = self.x
            self.x = grown
        self.x[layer, start:start + x.shape[0]] = x
        if start <= self._recorded[layer]:  # contiguous with what is held: the held prefix grows
            self._recorded[layer] = max(self._recorded[layer], start + x.shape[0])

    def commit(self, length: int) -> None:
        """A step finished: up to `length` positions count, as far as every layer holds them."""
        self.length = min(length, *self._recorded)

    def layer_inputs(self, layer: int, length: int) -> torch.Tensor:
        """Inputs of the first `length` positions (a store can run ahead of a cache being rebuilt)."""
        return self.x[layer, :min(length, self.length)]


# --------------------------------------------------------------------------------------------
# The forward pass of one device


@dataclass
class StepProgress:
    """How far this device got in its current (or abandoned) few-token step: the step's position and
    tokens, and for every layer it started, the residual stream entering it (the same on every
    device: it is the sum of all of them) and the layer's normed attention input. A step abandoned
    in layer j can resume there: of the layers before j only the K and V of the step's positions
    are needed again (for every head the device holds after the recovery), and the recorded inputs
    give them."""

    start: int
    token_ids: tuple[int, ...]
    x: list[torch.Tensor] = field(default_factory=list)
    h: list[torch.Tensor] = field(default_factory=list)

    @property
    def resumable_layer(self) -> int | None:
        """The layer a redo can start from (the last one started), or None (none started)."""
        return len(self.x) - 1 if self.x else None

    def upto(self, layer: int) -> "StepProgress":
        return StepProgress(self.start, self.token_ids, self.x[:layer + 1], self.h[:layer])


@dataclass
class DeviceState:
    """Everything one device holds: its shard, its cache, and (optionally) hidden-state checkpoints."""

    config: LlamaConfig
    shard: DeviceShard
    vocab: VocabSlice
    rotary: Rotary
    cache: KVCache
    hidden_states: HiddenStateStore | None = None
    kv_to_fill: tuple[int, ...] | None = None  # replay: compute K/V only for these KV heads, reuse the rest
    replica_of: int | None = None  # the device whose KV copy `replica` is (its ring predecessor)
    replica: KVCache | None = None
    progress: StepProgress | None = None  # the few-token step in progress, or abandoned
    on_tick: Callable[[], object] = lambda: None  # told after each layer of long work (the device's progress)

    @property
    def device(self) -> int:
        return self.shard.device

    @property
    def placement(self) -> torch.device:
        """Where this device's tensors live (the CPU, or its accelerator)."""
        return self.vocab.final_norm.device

    def commit(self, length: int) -> None:
        """A step finished on every device: its positions now count as cached."""
        self.cache.length = length
        if self.hidden_states is not None:
            self.hidden_states.commit(length)


def load_device_state(checkpoint: Checkpoint, assignment: Assignment, device: int, dtype: torch.dtype,
                      on_layer: Callable[[], object] = lambda: None) -> DeviceState:
    """What a device starts with: its weight slices and vocabulary rows, and an empty KV cache."""
    config = checkpoint.config
    shard = load_device_shard(checkpoint, assignment, device, dtype, on_layer)
    vocab = load_vocab_slice(checkpoint, assignment.vocab_range(device, config.vocab_size), dtype)
    cache = KVCache(config.num_hidden_layers, shard.kv_heads, config.head_dim, dtype, device=checkpoint.device)
    return DeviceState(config, shard, vocab, Rotary(config, dtype, checkpoint.device), cache)


def project_qkv(layer: LayerShard, num_q: int, num_kv: int, head_dim: int, h: torch.Tensor,
                rope: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q, K (both rotated, in one op) and V of a device's heads for normed input h: [heads, T, head_dim]."""
    T = h.shape[0]
    qkv = linear(h, layer.wqkv) if not layer.inherited else blocks_qkv(layer, h, head_dim)
    qk = apply_rope(qkv[:, :(num_q + num_kv) * head_dim].view(T, num_q + num_kv, head_dim).transpose(0, 1), *rope)
    q, k = qk.split([num_q, num_kv])
    return q, k, qkv[:, (num_q + num_kv) * head_dim:].view(T, num_kv, head_dim).transpose(0, 1)


def blocks_qkv(layer: LayerShard, h: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Every block's Q, K and V of h, laid out as one block's: all Q, then all K, then all V."""
    parts: tuple[list[torch.Tensor], ...] = ([], [], [])
    for block in layer.blocks:
        nq, nkv = block.heads(head_dim)
        for part, piece in zip(parts, linear(h, block.wqkv).split([nq * head_dim, nkv * head_dim,
                                                                     nkv * head_dim], dim=-1)):
            part.append(piece)
    return torch.cat([piece for part in parts for piece in part], dim=-1)


def blocks_linear(layer: LayerShard, x: torch.Tensor, weight: Callable[[LayerShard], torch.Tensor]) -> torch.Tensor:
    """x @ W^T where W's columns are split over the blocks (Wo, W_down): each block's share, summed."""
    out, at = None, 0
    for block in layer.blocks:
        w = weight(block)
        if w.shape[1] == 0:
            continue
        part = linear(x[..., at:at + w.shape[1]], w)
        out, at = part if out is None else out.add_(part), at + w.shape[1]
    return out if out is not None else x.new_zeros((*x.shape[:-1], weight(layer).shape[0]))


def attention_partial(state: DeviceState, layer_index: int, h: torch.Tensor, start: int,
                      rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """This device's heads' share of the attention output, before the sum over devices: [T, hidden]."""
    shard, layer, hd = state.shard, state.shard.layers[layer_index], state.config.head_dim
    T = h.shape[0]
    if state.kv_to_fill is None:
        q, k, v = project_qkv(layer, len(shard.query_heads), len(shard.kv_heads), hd, h, rope)
        state.cache.write(layer_index, start, k, v)
    else:
        q = project_queries_and_fill_kv(state, layer_index, h, start, rope)
    keys, values = state.cache.upto(layer_index, start + T)
    if not shard.grouped_in_order:  # a GQA group split unevenly: give each query head its KV head
        keys = keys.index_select(0, shard.kv_slot_of_query)
        values = values.index_select(0, shard.kv_slot_of_query)
    out = causal_attention(q, keys, values, start).transpose(0, 1).reshape(T, -1)
    return linear(out, layer.wo) if not layer.inherited else blocks_linear(layer, out, lambda b: b.wo)


KVRows = tuple[tuple[int, slice | torch.Tensor, slice | torch.Tensor], ...]


def kv_weight_rows(shard: DeviceShard, kv_heads: Sequence[int], head_dim: int) -> KVRows:
    """Where K and V of the given held KV heads come from: (block, K rows, V rows) of the blocks'
    wqkv, in the order of `kv_heads`; rows are slices (views) when the heads sit side by side in a
    block, as inherited ones do, else index tensors."""
    layer, runs = shard.layers[0], []
    firsts = [0]
    for block in layer.blocks:
        firsts.append(firsts[-1] + block.heads(head_dim)[1])
    for g in kv_heads:
        slot = shard.kv_heads.index(g)
        block = max(b for b, first in enumerate(firsts[:-1]) if first <= slot)
        if runs and runs[-1][0] == block:
            runs[-1][1].append(slot - firsts[block])
        else:
            runs.append((block, [slot - firsts[block]]))
    return tuple((block, *block_kv_rows(layer.blocks[block], slots, head_dim)) for block, slots in runs)


def block_kv_rows(block: LayerShard, slots: Sequence[int], head_dim: int) -> tuple[slice | torch.Tensor, ...]:
    nq, nkv = block.heads(head_dim)
    if slots == list(range(slots[0], slots[0] + len(slots))):
        first, last = slots[0] * head_dim, (slots[-1] + 1) * head_dim
        return slice(nq * head_dim + first, nq * head_dim + last), slice((nq + nkv) * head_dim + first,
                                                                          (nq + nkv) * head_dim + last)
    within = (torch.tensor(slots)[:, None] * head_dim + torch.arange(head_dim)).reshape(-1).to(block.wqkv.device)
    return nq * head_dim + within, (nq + nkv) * head_dim + within


def project_kv_heads(layer: LayerShard, rows: KVRows, h: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                     head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K (rotated) and V of some held KV heads for normed input h: [heads, T, head_dim] each."""
    T, blocks = h.shape[0], layer.blocks
    keys = [linear(h, blocks[b].wqkv[k_rows]) for b, k_rows, _ in rows]
    values = [linear(h, blocks[b].wqkv[v_rows]) for b, _, v_rows in rows]
    k, v = (parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1) for parts in (keys, values))
    return apply_rope(k.view(T, -1, head_dim).transpose(0, 1), *rope), v.view(T, -1, head_dim).transpose(0, 1)


def project_queries(shard: DeviceShard, layer: LayerShard, h: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                    head_dim: int) -> torch.Tensor:
    """Q (rotated) of the device's query heads alone, [heads, T, head_dim]: replay reads the kept K/V."""
    T, nq = h.shape[0], len(shard.query_heads)
    queries = [linear(h, block.wqkv[:block.heads(head_dim)[0] * head_dim]) for block in layer.blocks]
    q = queries[0] if len(queries) == 1 else torch.cat(queries, dim=-1)
    return apply_rope(q.view(T, nq, head_dim).transpose(0, 1), *rope)


def project_queries_and_fill_kv(state: DeviceState, layer_index: int, h: torch.Tensor, start: int,
                                rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Replay: Q of own heads, K/V only for the KV heads in `state.kv_to_fill` (the others are cached)."""
    shard, layer, hd = state.shard, state.shard.layers[layer_index], state.config.head_dim
    q = project_queries(shard, layer, h, rope, hd)
    if state.kv_to_fill:
        k, v = project_kv_heads(layer, kv_weight_rows(shard, state.kv_to_fill, hd), h, rope, hd)
        state.cache.put_heads(layer_index, state.kv_to_fill, start, k, v)
    return q


ATTENTION_BLOCK = 128  # query rows per block of causal_attention


def causal_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, start: int) -> torch.Tensor:
    """softmax(q k^T / sqrt(head_dim) + causal mask) v, HF's attention for new tokens at start..start+T.

    q: [query heads, T, head_dim]; keys, values: [KV heads, start + T, head_dim], query head i
    reading KV head i // (query heads / KV heads). Query rows go in blocks, each block against
    only the keys it may see, and a KV head's query heads share one matmul; scores and softmax
    are fp32 in any dtype, as in SDPA. On one thread (a device) this measured 3x faster than
    torch's SDPA CPU kernel at 512 tokens (4x in bf16), 7x at 2048, and 40x for one new token
    after 1024, a kernel tiled for many threads and long query blocks.
    """
    heads, T, head_dim = q.shape
    kv_heads, group = keys.shape[0], heads // keys.shape[0]
    dtype, keys, values = q.dtype, keys.float(), values.float()  # in fp32 whatever the dtype, as SDPA
    q = q.float() * head_dim ** -0.5
    blocks = []
    for first in range(0, T, ATTENTION_BLOCK):
        last = min(first + ATTENTION_BLOCK, T)
        rows, visible = last - first, start + last
        block_q = q[:, first:last].reshape(kv_heads, group * rows, head_dim)
        scores = torch.bmm(block_q, keys[:, :visible].transpose(1, 2)).view(kv_heads, group, rows, visible)
        if rows > 1:
            scores[..., start + first:] += _future_mask(rows, scores.device)
        block_out = torch.bmm(torch.softmax(scores, dim=-1).view(kv_heads, group * rows, visible), values[:, :visible])
        blocks.append(block_out.view(heads, rows, head_dim))
    return (blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=1)).to(dtype)


def decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """One new token of each of B sequences against its own keys: causal_attention's arithmetic for
    B one-token chunks at once. q: [query heads, B, head_dim]; keys, values: [KV heads, B, width,
    head_dim], each sequence's keys padded to the widest; mask: [B, width], 0 on a sequence's own
    keys and -inf on its padding. Returns [query heads, B, head_dim]."""
    heads, batch, head_dim = q.shape
    kv_heads, group = keys.shape[0], heads // keys.shape[0]
    dtype = q.dtype
    q = (q.float() * head_dim ** -0.5).view(kv_heads, group, batch, head_dim).transpose(1, 2)
    scores = torch.matmul(q, keys.float().transpose(-1, -2)) + mask[:, None, :]  # [KV heads, B, group, width]
    out = torch.matmul(torch.softmax(scores, dim=-1), values.float())             # [KV heads, B, group, head_dim]
    return out.transpose(1, 2).reshape(heads, batch, head_dim).to(dtype)


def _future_mask(rows: int, device: torch.device) -> torch.Tensor:
    """-inf above the diagonal of a rows x rows block: query row r may not see keys after r."""
    return torch.full((rows, rows), float("-inf"), device=device).triu(1)


def mlp_partial(layer: LayerShard, h: torch.Tensor) -> torch.Tensor:
    """This device's MLP columns' share of the MLP output: [T, hidden] (summed over its blocks)."""
    out = None
    for block in layer.blocks:
        width = block.w_down.shape[1]
        if width == 0 and out is not None:
            continue
        gate_up = linear(h, block.w_gate_up)
        hidden = F.silu(gate_up[..., :width], inplace=True).mul_(gate_up[..., width:])  # in place: no temporaries
        part = linear(hidden, block.w_down)
        out = part if out is None else out.add_(part)
    return out


# Steps of this many tokens or more split the residual stream by rows. Measured (4 devices, fp32):
# the same time either way from 8 to 64 tokens, 3-4% faster split at 128 and 512; a decode step
# keeps the single all-reduce (splitting one row costs a second synchronisation and saves nothing).
SEQUENCE_PARALLEL_MIN_TOKENS = 32


class ResidualStream:
    """The residual stream x of one step on one device: partial outputs go in, normed inputs come out.

    Few tokens (decode): every device holds all of x; partials are all-reduced and each device adds
    and normalises the whole (a few KB). Many tokens (prefill): sequence parallel, as in
    Megatron-LM: each device holds only its own rows of x; partials are reduce-scattered, each
    device adds and normalises its rows, and the normed rows are all-gathered. The same data
    crosses devices, and each device does 1/N of the norms and residual adds instead of all of them.
    """

    def __init__(self, state: DeviceState, token_ids: torch.Tensor, collective: Collective,
                 x: torch.Tensor | None = None):
        """From the embedding of the tokens, or from `x` (a resumed step's stream, not split)."""
        self.device, self.collective, self.eps = state.device, collective, state.config.rms_norm_eps
        self.length = token_ids.shape[0]
        self.split = self.length >= SEQUENCE_PARALLEL_MIN_TOKENS
        self.x = self._reduce(embed_partial(token_ids, state.vocab)) if x is None else x

    def add(self, partial: torch.Tensor) -> None:
        """x += the sum over devices of every device's `partial` ([T, hidden])."""
        self.x = self.x + self._reduce(partial)

    def _reduce(self, partial: torch.Tensor) -> torch.Tensor:
        """The sum over devices of `partial`: this device's rows of it when split, else all of it."""
        reduce = self.collective.reduce_scatter if self.split else self.collective.all_reduce
        return reduce(self.device, partial)

    def normed(self, weight: torch.Tensor) -> torch.Tensor:
        """rmsnorm(x) * weight for every token, [T, hidden]: the same on every device."""
        h = rms_norm(self.x, weight, self.eps)
        return self.collective.all_gather_rows(self.device, h, self.length) if self.split else h


def device_forward(state: DeviceState, token_ids: torch.Tensor, start: int, collective: Collective,
                   logits: str = "last", resume: StepProgress | None = None) -> torch.Tensor | None:
    """One device's part of a forward pass over `token_ids` at positions start..start+T.

    Each layer's two partial outputs (attention, MLP) are summed over devices into the residual
    stream; everything else is local. `logits` is "last" ([vocab]), "all" ([T, vocab]) or "none"
    (only fill the KV cache, as a recovery does). `resume`: this step was abandoned; go on from its
    last started layer instead of redoing the layers before it (few-token steps only).
    """
    rope = state.rotary.factors(start, token_ids.shape[0])
    if resume is None:
        stream = ResidualStream(state, token_ids, collective)
        state.progress = None if stream.split else StepProgress(start, tuple(token_ids.tolist()))
    else:
        stream = ResidualStream(state, token_ids, collective, x=resume.x[-1])
        state.progress = resume
        fill_done_layers(state, resume, rope)
    first = 0 if resume is None else len(resume.h)
    for i, layer in enumerate(state.shard.layers[first:], start=first):
        if state.progress is not None and len(state.progress.x) == i:
            state.progress.x.append(stream.x)
        h = stream.normed(layer.input_norm)
        if state.progress is not None:
            state.progress.h.append(h)
        if state.hidden_states is not None:
            state.hidden_states.record(i, start, h)
        stream.add(attention_partial(state, i, h, start, rope))
        stream.add(mlp_partial(layer, stream.normed(layer.post_norm)))
        state.on_tick()
    result = None
    if logits != "none":
        h = stream.normed(state.vocab.final_norm)
        partial_logits = logits_partial(h if logits == "all" else h[-1:], state.vocab)
        result = torch.cat(collective.all_gather(state.device, partial_logits), dim=-1)
        result = result if logits == "all" else result[0]
    state.commit(start + token_ids.shape[0])
    state.progress = None
    return result


def fill_done_layers(state: DeviceState, resume: StepProgress, rope: tuple[torch.Tensor, torch.Tensor]) -> None:
    """The layers a resumed step does not redo: the K and V of every KV head this device holds now
    (its own are recomputed too: a recovery may have rebuilt its cache), from the recorded inputs."""
    hd, kv_heads = state.config.head_dim, state.cache.kv_heads
    rows = kv_weight_rows(state.shard, kv_heads, hd)
    for i, h in enumerate(resume.h):
        k, v = project_kv_heads(state.shard.layers[i], rows, h, rope, hd)
        state.cache.write(i, resume.start, k, v)
        if state.hidden_states is not None:
            state.hidden_states.record(i, resume.start, h)


# --------------------------------------------------------------------------------------------
# KV replication in normal running: the step's new entries go to the buddy


def replicate_step(state: DeviceState, start: int, length: int, collective: Collective, buddy: int,
                   predecessor: int) -> None:
    """Send this step's new KV entries (positions start..start+length) to the buddy, a real transfer,
    and store what the predecessor sends: the copy that `replicate` promotes after a failure.

    A copy counts only the positions it holds from 0 on: one started in the middle of a run (its
    predecessor's earlier entries never sent) claims nothing until it is filled from 0.
    """
    cache = state.cache
    collective.send(state.device, buddy, (state.device, cache.kv_heads, start,
                                          [k[:, start:start + length].clone() for k in cache.k],
                                          [v[:, start:start + length].clone() for v in cache.v]))
    source, kv_heads, at, keys, values = collective.recv(state.device, predecessor)
    replica = state.replica
    if replica is None or state.replica_of != source or replica.kv_heads != kv_heads:
        replica = KVCache(cache.num_layers, kv_heads, cache.head_dim, cache.dtype, max(at + keys[0].shape[1], 1),
                          cache.device)
        state.replica_of, state.replica = source, replica
    for layer, (k, v) in enumerate(zip(keys, values)):
        replica.write(layer, at, k, v)
    if at <= replica.length:
        replica.length = max(replica.length, at + keys[0].shape[1])
