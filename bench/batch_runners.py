"""Throughput at a batch size, one side per process: the engine serving `batch` requests at once, or
transformers' `LlamaForCausalLM` on the same prompts as one batch (attention mask, KV cache), same
weights and dtype. bench_engine.py starts each side in a process of its own, the two alternating:
in one process the reference runs up to 1.8x slower beside a loaded engine, which would flatter the
engine. Each run prints one JSON line:

    python bench/batch_runners.py engine|reference FOLDER --batch 8 --prompt 128 --steps 8 ...
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Sequence

import torch


def prompts(vocab_size: int, batch: int, length: int, seed: int) -> torch.Tensor:
    """`batch` prompts of `length` random token ids: the same ones on both sides."""
    return torch.randint(0, vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


def engine_side(folder: Path, dtype: torch.dtype, batch: int, length: int, steps: int, seed: int, devices: int,
                backend: str) -> dict:
    """The engine: every prompt submitted at once, prefilled in one packed step, then `steps` decode
    steps of the whole batch, each timed; and one sequence as long as the batch's prompts together,
    prefilled alone (the packed prefill's yardstick)."""
    from request_scheduler import SchedulerConfig
    from tensor_parallel_cluster import TensorParallelLlama

    scheduling = SchedulerConfig(kv_cache_memory_bytes=2**31, max_num_seqs=batch,
                                 max_num_batched_tokens=batch * length)
    with TensorParallelLlama.load(folder, devices=devices, dtype=dtype, log=lambda m: None, backend=backend,
                                  scheduling=scheduling) as model:
        ids = prompts(model.config.vocab_size, batch, length, seed)
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
        model.prefill(ids.reshape(-1)[:model.config.max_position_embeddings].tolist())
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("side", choices=["engine", "reference"])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch", type=int, required=True)
    parser.add_argument("--prompt", type=int, required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--devices", type=int, default=4)
    parser.add_argument("--backend", default="threads")
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    if args.side == "engine":
        result = engine_side(args.folder, dtype, args.batch, args.prompt, args.steps, args.seed, args.devices,
                             args.backend)
    else:
        result = reference_side(args.folder, dtype, args.batch, args.prompt, args.steps, args.seed)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
