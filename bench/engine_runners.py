"""The three models bench_engine.py times: the engine, the same device code as one device in the main
thread, and Hugging Face `LlamaForCausalLM`. Apart from the script because they need torch and
transformers, which the script imports only once its arguments are known to be good."""
from __future__ import annotations

import inspect
import time
from pathlib import Path

import torch
from transformers import LlamaForCausalLM
from transformers.utils import logging as hf_logging

from device_threads import ThreadCollective
from head_assignment import even_assignment
from llama_model_loader import Checkpoint
from tensor_parallel_cluster import TensorParallelLlama
from tensor_parallel_model import device_forward, load_device_state

hf_logging.disable_progress_bar()  # the reference's loading bar would break up the tables on stdout


class EngineRunner:
    """The engine: `devices` device threads (or processes), one intra-op thread each."""

    def __init__(self, folder: Path, devices: int, dtype: torch.dtype, backend: str):
        self.model = TensorParallelLlama.load(folder, devices=devices, dtype=dtype, log=lambda m: None,
                                              backend=backend)

    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.prefill(ids.tolist())

    def decode_times(self, prompt: torch.Tensor, tokens: torch.Tensor) -> list[float]:
        self.model.prefill(prompt.tolist())
        times = []
        for token in tokens.tolist():
            started = time.perf_counter()
            self.model.decode(token)
            times.append(time.perf_counter() - started)
        return times

    def close(self) -> None:
        self.model.close()


class OneDeviceInMainThread:
    """The same device code for a single device, called in the main thread with its default threads
    (decode only): the split and the device threads taken apart from the arithmetic. It is a model of
    its own (no actor), so nothing reaches into a device."""

    def __init__(self, folder: Path, dtype: torch.dtype):
        checkpoint = Checkpoint(folder)
        self.state = load_device_state(checkpoint, even_assignment(checkpoint.config, 1), 0, dtype)
        self.collective = ThreadCollective([0], epoch=0)

    def decode_times(self, prompt: torch.Tensor, tokens: torch.Tensor) -> list[float]:
        device_forward(self.state, prompt, 0, self.collective)
        times = []
        for position, token in enumerate(tokens.tolist(), start=len(prompt)):
            started = time.perf_counter()
            device_forward(self.state, torch.tensor([token]), position, self.collective)
            times.append(time.perf_counter() - started)
        return times

    def close(self) -> None:
        del self.state


class ReferenceRunner:
    """`LlamaForCausalLM` with sdpa attention and its own KV cache, on the main thread's default threads."""

    def __init__(self, folder: Path, dtype: torch.dtype):
        self.model = LlamaForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa").eval()
        # transformers 5.x renamed past_key_values to cache (the old name still works, with a warning)
        self.cache_name = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"

    @torch.inference_mode()
    def prefill(self, ids: torch.Tensor, cache: bool = False):
        out = self.model(input_ids=ids[None], use_cache=True, logits_to_keep=1)
        return out if cache else out.logits[0, -1].float()

    @torch.inference_mode()
    def decode_times(self, prompt: torch.Tensor, tokens: torch.Tensor) -> list[float]:
        past = getattr(self.prefill(prompt, cache=True), self.cache_name)
        times = []
        for token in tokens:
            started = time.perf_counter()
            out = self.model(input_ids=token.view(1, 1), use_cache=True, logits_to_keep=1, **{self.cache_name: past})
            past = getattr(out, self.cache_name)
            times.append(time.perf_counter() - started)
        return times

    def close(self) -> None:
        del self.model
