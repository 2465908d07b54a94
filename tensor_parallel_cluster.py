"""A Llama checkpoint split over device threads: the Python API for prefill, decode and generation.

    from tensor_parallel_cluster import TensorParallelLlama
    with TensorParallelLlama.load("path/to/Llama-3.2-1B", devices=4) as model:
        tokens = model.generate(model.tokenizer.encode("The capital of France is"), max_new_tokens=8)

Each device thread loads only its own weight slices and keeps its own KV cache; the replicated
parts (embedding, final norm) are read once and shared read-only between the threads.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from device_threads import DeviceWorker, ThreadCollective, run_on_devices
from head_assignment import Assignment, even_assignment
from llama_model_loader import Checkpoint, CheckpointLocation, Tokenizer, load_tokenizer, resolve_checkpoint
from synthetic_checkpoint import ensure_synthetic_checkpoint
from tensor_parallel_model import (DeviceShard, DeviceState, HiddenStateStore, KVCache, Rotary, device_forward,
                                   load_device_shard, load_replicated)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class LoadReport:
    """How the model was loaded, for the report."""

    location: CheckpointLocation
    folder: Path
    tensor_count: int
    stored_bytes: int
    stored_dtype: str
    seconds: float


def open_checkpoint(model_dir: str | Path | None = None, log=print) -> tuple[CheckpointLocation, Checkpoint, float]:
    """Resolve and check the checkpoint (headers only; no weights read yet) and time it."""
    started = time.perf_counter()
    location = resolve_checkpoint(model_dir)
    folder = location.path or ensure_synthetic_checkpoint("llama-3.2-1b", log=log)
    return location, Checkpoint(folder), time.perf_counter() - started


class TensorParallelLlama:
    """A model split by heads over device threads, with greedy generation."""

    def __init__(self, checkpoint: Checkpoint, assignment: Assignment, dtype: torch.dtype = torch.float32,
                 progress: bool = False):
        self.checkpoint, self.config, self.dtype = checkpoint, checkpoint.config, dtype
        self.assignment = assignment
        self.replicated = load_replicated(checkpoint, dtype)
        self.workers = {d: DeviceWorker(d) for d in assignment.devices}
        self.collective = ThreadCollective(assignment.devices)
        self.cached_ids: list[int] = []  # the tokens whose KV the devices hold, in order
        self.tokenizer: Tokenizer | None = None
        self.load_report: LoadReport | None = None
        try:
            with _progress_bar(len(self.workers) * self.config.num_hidden_layers, progress) as bar:
                run_on_devices(list(self.workers.values()), lambda w: self._load_state(w, bar.update),
                               self.collective)
        except BaseException:
            self.close()
            raise

    @classmethod
    def load(cls, model_dir: str | Path | None = None, devices: int = 4, dtype: torch.dtype = torch.float32,
             progress: bool = False, log=print, **options) -> "TensorParallelLlama":
        """Find the checkpoint (argument, $LLAMA_CHECKPOINT, HF cache, else synthetic) and split it
        evenly over `devices`. `options` go to the constructor (e.g. the fault-tolerant heartbeat)."""
        location, checkpoint, seconds = open_checkpoint(model_dir, log)
        config = checkpoint.config
        assignment = even_assignment(config, devices)
        return cls.from_checkpoint(location, checkpoint, assignment, dtype, progress, seconds, **options)

    @classmethod
    def from_checkpoint(cls, location: CheckpointLocation, checkpoint: Checkpoint, assignment: Assignment,
                        dtype: torch.dtype, progress: bool = False, seconds_so_far: float = 0.0,
                        **options) -> "TensorParallelLlama":
        """Split an opened checkpoint; the load report covers opening and splitting."""
        started = time.perf_counter()
        tokenizer = load_tokenizer(checkpoint.folder, checkpoint.config)
        model = cls(checkpoint, assignment, dtype, progress, **options)
        model.tokenizer = tokenizer
        model.load_report = LoadReport(location, checkpoint.folder, checkpoint.tensor_count, checkpoint.total_bytes,
                                       checkpoint.stored_dtype, seconds_so_far + time.perf_counter() - started)
        return model

    def _load_state(self, worker: DeviceWorker, on_layer) -> None:
        shard = load_device_shard(self.checkpoint, self.assignment, worker.device, self.dtype, on_layer)
        worker.state = self.new_state(shard)

    def new_state(self, shard: DeviceShard, cache: KVCache | None = None) -> DeviceState:
        """A device's state for a shard (under the current assignment's vocabulary split)."""
        config = self.config
        cache = cache or KVCache(config.num_hidden_layers, shard.kv_heads, config.head_dim, self.dtype)
        return DeviceState(config, shard, self.replicated, Rotary(config, self.dtype), cache,
                           self.assignment.vocab_range(shard.device, config.vocab_size))

    # ---------------------------------------------------------------------------------------
    # Running

    @property
    def position(self) -> int:
        """Tokens cached on every device (a step abandoned mid-way does not count)."""
        return len(self.cached_ids)

    def forward(self, token_ids: Sequence[int] | torch.Tensor, start: int | None = None,
                logits: str = "last") -> torch.Tensor | None:
        """Logits for `token_ids` placed after the first `start` cached tokens (default: all of them)."""
        ids = torch.as_tensor(token_ids, dtype=torch.long).reshape(-1)
        start = self.position if start is None else start
        self._check_length(start + ids.numel())
        self.cached_ids = self.cached_ids[:start]  # overwritten by this step, whether it finishes or not
        results = run_on_devices(list(self.workers.values()), self.step_task(ids, start, logits), self.collective)
        self.cached_ids += ids.tolist()
        leader = results[self.assignment.devices[0]]
        return None if leader is None else leader.float()

    def step_task(self, ids: torch.Tensor, start: int, logits: str) -> Callable[[DeviceWorker], object]:
        """What each device runs for one forward step (subclasses add work around it)."""
        collective = self.collective
        return lambda worker: device_forward(worker.state, ids, start, collective, logits)

    def prefill(self, token_ids: Sequence[int], all_logits: bool = False) -> torch.Tensor:
        """Forget the cache and run the prompt; logits of the last token (or of every token)."""
        return self.forward(token_ids, start=0, logits="all" if all_logits else "last")

    def decode(self, token_id: int) -> torch.Tensor:
        return self.forward([token_id])

    def generate(self, prompt_ids: Sequence[int], max_new_tokens: int, stop_at_eos: bool = False,
                 after_token: Callable[[list[int]], object] = lambda tokens: None) -> list[int]:
        """Greedy continuation of the prompt (the new tokens only).

        `after_token(tokens)` is called after each new token, before it is fed back: the point
        where a run can be observed (a KV snapshot) or interrupted.
        """
        logits = self.prefill(prompt_ids)
        new_tokens: list[int] = []
        while len(new_tokens) < max_new_tokens:
            new_tokens.append(int(logits.argmax()))
            after_token(new_tokens)
            if stop_at_eos and new_tokens[-1] in self.config.eos_token_ids:
                break
            if len(new_tokens) < max_new_tokens:
                logits = self.decode(new_tokens[-1])
        return new_tokens

    def enable_hidden_states(self) -> None:
        """Start keeping per-layer inputs (HCache-style checkpoints) on every device, from the next
        step on: a store holds only what it recorded from position 0 (switch it on before the prefill)."""
        for worker in self.workers.values():
            worker.state.hidden_states = HiddenStateStore(self.config.num_hidden_layers, self.config.hidden_size,
                                                          self.dtype)

    def _check_length(self, length: int) -> None:
        if length > self.config.max_position_embeddings:
            raise ValueError(f"{length} positions exceed the model's {self.config.max_position_embeddings}")

    # ---------------------------------------------------------------------------------------
    # Lifetime

    def close(self) -> None:
        """Stop every device thread (idempotent)."""
        self.collective.abort()
        for worker in self.workers.values():
            worker.stop(timeout=5)

    def __enter__(self) -> "TensorParallelLlama":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _progress_bar(total: int, enabled: bool):
    from tqdm import tqdm
    return tqdm(total=total, desc="loading weight slices", unit="layer-slice", leave=False, disable=not enabled)
