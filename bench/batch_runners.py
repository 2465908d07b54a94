"""Throughput at a batch size, one side per process: the engine serving `batch` requests at once, or
transformers' `LlamaForCausalLM` on the same prompts as one batch (attention mask, KV cache), same
weights and dtype. bench_engine.py starts each side in a process of its own, the two alternating:
in one process the reference runs up to 1.8x slower beside a loaded engine, which would flatter the
engine. The third side, `invariance`, serves the batch on the engine and then each request alone,
and compares their greedy tokens. Each run prints one JSON line:

    python bench/batch_runners.py engine|reference|invariance FOLDER --batch 8 --prompt 128 --steps 8 ...
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import torch

from common import torch_dtype  # first: it puts the repository on sys.path

if TYPE_CHECKING:
    from request_scheduler import SchedulerConfig
    from tensor_parallel_cluster import TensorParallelLlama


def prompts(vocab_size: int, batch: int, length: int, seed: int) -> torch.Tensor:
    """`batch` prompts of `length` random token ids: the same ones on both sides."""
    return torch.randint(0, vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


def fitting_scheduling(folder: Path, dtype: torch.dtype, batch: int, positions: int) -> SchedulerConfig:
    """Room for `batch` requests of `positions` each, all prefilled in one step, and little more:
    the engine allocates its pool up front, the reference only what its batch needs, so the two
    sides hold like amounts of KV memory."""
    from batched_forward import PagedKVCache
    from llama_model_loader import Checkpoint
    from request_scheduler import SchedulerConfig

    config, block_size = Checkpoint(folder).config, SchedulerConfig.block_size
    block = PagedKVCache.block_nbytes(config.num_hidden_layers, config.num_key_value_heads, config.head_dim,
                                      block_size, dtype)
    return SchedulerConfig(kv_cache_memory_bytes=batch * (-(-positions // block_size) + 1) * block,
                           max_num_seqs=batch, max_num_batched_tokens=batch * positions)


def engine_side(folder: Path, dtype: torch.dtype, batch: int, length: int, steps: int, seed: int, devices: int,
                backend: str) -> dict:
    """The engine: every prompt submitted at once, prefilled in one packed step, then `steps` decode
    steps of the whole batch, each timed; and one sequence as long as the batch's prompts together,
    prefilled alone (the packed prefill's yardstick). One untimed prefill first warms both up."""
    from tensor_parallel_cluster import TensorParallelLlama

    scheduling = fitting_scheduling(folder, dtype, batch, length + steps + 2)
    with TensorParallelLlama.load(folder, devices=devices, dtype=dtype, log=lambda m: None, backend=backend,
                                  scheduling=scheduling) as model:
        ids = prompts(model.config.vocab_size, batch, length, seed)
        model.prefill(ids[0].tolist())  # untimed warm-up: the first step of a fresh engine pays for first calls
        for prompt in ids.tolist():
            model.submit(prompt, steps + 2)
        started = time.perf_counter()
        first = model.step()
        prefill_s = time.perf_counter() - started
        if first.batch_tokens != batch * length:
            raise RuntimeError(f"the first step computed {first.batch_tokens} tokens, not the whole batch's prompts")
        model.step()  # warm-up decode
        step_s = []
        for _ in range(steps):
            started = time.perf_counter()
            served = model.step()
            step_s.append(time.perf_counter() - started)
            assert served.batch_tokens == batch, "every request decodes in every timed step"
        started = time.perf_counter()
        model.prefill(ids.reshape(-1).tolist())
        alone_s = time.perf_counter() - started
    return {"decode_step_ms": statistics.median(step_s) * 1e3, "decode_tokens_per_s": batch / statistics.median(step_s),
            "prefill_tokens_per_s": batch * length / prefill_s, "one_sequence_prefill_tokens_per_s": batch * length / alone_s}


@torch.inference_mode()
def reference_side(folder: Path, dtype: torch.dtype, batch: int, length: int, steps: int, seed: int) -> dict:
    """The reference: the prompts as one batch (all of one length: the attention mask is all ones),
    its KV cache, greedy decode of the whole batch, each step timed."""
    from engine_runners import ReferenceRunner

    reference = ReferenceRunner(folder, dtype)
    model, cache_name = reference.model, reference.cache_name
    ids = prompts(model.config.vocab_size, batch, length, seed)
    mask = torch.ones_like(ids)
    started = time.perf_counter()
    out = model(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1)
    prefill_s = time.perf_counter() - started
    step_s = []
    for step in range(steps + 1):  # the first is a warm-up
        token = out.logits[:, -1].argmax(dim=-1, keepdim=True)
        mask = torch.cat([mask, torch.ones_like(token)], dim=1)
        started = time.perf_counter()
        out = model(input_ids=token, attention_mask=mask, use_cache=True, logits_to_keep=1,
                    **{cache_name: getattr(out, cache_name)})
        if step:
            step_s.append(time.perf_counter() - started)
    return {"decode_step_ms": statistics.median(step_s) * 1e3, "decode_tokens_per_s": batch / statistics.median(step_s),
            "prefill_tokens_per_s": batch * length / prefill_s}


def ragged_prompts(vocab_size: int, batch: int, length: int, seed: int) -> list[list[int]]:
    """`batch` prompts of lengths spread from about half of `length` to `length`: a ragged batch,
    in which every request's rows sit at other offsets than when it runs alone."""
    rows = prompts(vocab_size, batch, length, seed).tolist()
    return [row[:length - (i * (length // 2)) // max(batch - 1, 1)] for i, row in enumerate(rows)]


def served(model: TensorParallelLlama, prompts_ids: Sequence[Sequence[int]], steps: int) -> tuple[list[list[int]], list[list[float]]]:
    """Every prompt served together, greedy: each one's tokens and their margins over the runner-up."""
    ids = [model.submit(prompt, steps) for prompt in prompts_ids]
    tokens: dict[int, list[int]] = {i: [] for i in ids}
    margins: dict[int, list[float]] = {i: [] for i in ids}
    open_requests = set(ids)
    while open_requests:
        step = model.step()
        for request_id, token in step.tokens.items():
            tokens[request_id].append(token)
            margins[request_id].append(step.margins[request_id])
        open_requests -= set(step.ended)
    return [tokens[i] for i in ids], [margins[i] for i in ids]


def invariance_side(folder: Path, dtype: torch.dtype, batch: int, length: int, steps: int, seed: int, devices: int,
                    backend: str) -> dict:
    """Each request's greedy tokens served in the batch against the same request served alone.
    Where they differ, the first divergence is checked against the project's near-tie bound
    (lossless_checks.near_ties on the logits of that step, run as one prefill)."""
    from lossless_checks import LOGITS_TOLERANCE, near_ties
    from tensor_parallel_cluster import TensorParallelLlama

    scheduling = fitting_scheduling(folder, dtype, batch, length + steps + 2)
    with TensorParallelLlama.load(folder, devices=devices, dtype=dtype, log=lambda m: None, backend=backend,
                                  scheduling=scheduling) as model:
        asked = ragged_prompts(model.config.vocab_size, batch, length, seed)
        together, margins = served(model, asked, steps)
        divergences = []
        for prompt, batched, batched_margins in zip(asked, together, margins):
            (alone,), (alone_margins,) = served(model, [prompt], steps)
            at = next((i for i, (a, b) in enumerate(zip(alone, batched)) if a != b), None)
            if at is None:
                continue
            logits = model.prefill(prompt + alone[:at])
            bound = 2 * LOGITS_TOLERANCE[dtype] * logits.abs().max().item()
            divergences.append({"step": at, "alone_margin": alone_margins[at], "batch_margin": batched_margins[at],
                                "bound": bound, "near_tie": bool(near_ties([logits], LOGITS_TOLERANCE[dtype]))})
    return {"requests": batch, "tokens": sum(map(len, together)), "differing": len(divergences),
            "at_near_tie": sum(d["near_tie"] for d in divergences), "divergences": divergences}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("side", choices=["engine", "reference", "invariance"])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch", type=int, required=True)
    parser.add_argument("--prompt", type=int, required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--devices", type=int, default=4)
    parser.add_argument("--backend", default="threads")
    args = parser.parse_args(argv)
    dtype = torch_dtype(args.dtype)
    if args.side in ("engine", "invariance"):
        side = engine_side if args.side == "engine" else invariance_side
        result = side(args.folder, dtype, args.batch, args.prompt, args.steps, args.seed, args.devices, args.backend)
    else:
        result = reference_side(args.folder, dtype, args.batch, args.prompt, args.steps, args.seed)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
