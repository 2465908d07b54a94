"""A ragged batch on a paged KV cache gives, for every sequence in it, what Hugging Face's
`LlamaForCausalLM` gives on a padded batch of the same sequences (fp32, the tiny preset), over 1
and 3 devices: a packed prefill of prompts of different lengths (long enough together to take the
sequence-parallel path), decode steps of all of them at once, a newcomer's prefill in the same step
as the others' decode, and a prompt prefilled in two chunks. The greedy tokens that cross devices
are the whole row's argmax, with its margin over the runner-up."""
from __future__ import annotations

import threading

import pytest
import torch

from batched_forward import PagedKVCache, batched_forward
from device_threads import ThreadCollective
from head_assignment import even_assignment
from llama_model_loader import Checkpoint
from request_scheduler import BlockPool, ScheduledChunk
from tensor_parallel_model import load_device_state

FP32_RELATIVE = 1e-4
BLOCK_SIZE = 4


class PackedCluster:
    """The devices of one assignment, each with its state and paged cache, stepped together on threads."""

    def __init__(self, folder, devices: int, num_blocks: int = 64):
        checkpoint = Checkpoint(folder)
        config = checkpoint.config
        assignment = even_assignment(config, devices)
        self.states = [load_device_state(checkpoint, assignment, d, torch.float32) for d in assignment.devices]
        self.caches = [PagedKVCache(config.num_hidden_layers, s.shard.kv_heads, config.head_dim, torch.float32,
                                    num_blocks, BLOCK_SIZE) for s in self.states]
        self.collective = ThreadCollective(assignment.devices, epoch=0)
        self.pool = BlockPool(num_blocks, BLOCK_SIZE)

    def step(self, rows: dict[int, tuple[int, list[int]]], logits: bool = True):
        """rows: sequence -> (start, tokens); every chunk samples. The first device's answer."""
        chunks = []
        for sequence, (start, tokens) in rows.items():
            assert self.pool.grow(sequence, start + len(tokens))
            chunks.append(ScheduledChunk(sequence, start, tuple(tokens), tuple(self.pool.tables[sequence]), True))
        answers: dict[int, object] = {}

        def run(i: int) -> None:
            answers[i] = batched_forward(self.states[i], self.caches[i], chunks, self.collective, logits)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(self.states))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert len(answers) == len(self.states), "a device did not finish its step"
        return answers[0]


def prompts(lengths, seed: int = 3) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [[256] + torch.randint(0, 256, (n - 1,), generator=generator).tolist() for n in lengths]


def reference_rows(hf, sequences: list[list[int]]) -> list[torch.Tensor]:
    """The reference's logits of every position of each sequence, from one right-padded batch."""
    longest = max(map(len, sequences))
    ids = torch.tensor([s + [0] * (longest - len(s)) for s in sequences])
    mask = torch.tensor([[1] * len(s) + [0] * (longest - len(s)) for s in sequences])
    with torch.no_grad():
        logits = hf(input_ids=ids, attention_mask=mask).logits.float()
    return [logits[i, :len(s)] for i, s in enumerate(sequences)]


def assert_close(ours: torch.Tensor, reference: torch.Tensor) -> None:
    error = (ours - reference).abs().max().item()
    assert error <= FP32_RELATIVE * reference.abs().max().item(), f"max |ours - reference| = {error}"


@pytest.mark.parametrize("devices", [1, 3])
def test_every_sequence_of_a_ragged_batch_gets_the_reference_logits(tiny_checkpoint, hf_reference, devices):
    hf = hf_reference(tiny_checkpoint)
    cluster = PackedCluster(tiny_checkpoint, devices)
    first, second, third, late = prompts([5, 17, 24, 9])
    continuations = {0: [11, 12, 13], 1: [21, 22, 23], 2: [31, 32, 33]}
    sequences = [first + continuations[0], second + continuations[1], third + continuations[2], late + [41]]
    reference = reference_rows(hf, sequences)

    prefill = cluster.step({0: (0, first), 1: (0, second), 2: (0, third)})  # 46 rows: sequence parallel
    for i, prompt in enumerate((first, second, third)):
        assert_close(prefill[i], reference[i][len(prompt) - 1])
    for step in range(2):
        rows = {i: (len(p) + step, [continuations[i][step]]) for i, p in enumerate((first, second, third))}
        if step == 1:
            rows[3] = (0, late)  # a newcomer's prefill beside the others' decode
        out = cluster.step(rows)
        for row, (sequence, (start, tokens)) in enumerate(rows.items()):
            assert_close(out[row], reference[sequence][start + len(tokens) - 1])


def test_a_prompt_prefilled_in_two_chunks_equals_it_prefilled_at_once(tiny_checkpoint, hf_reference):
    hf = hf_reference(tiny_checkpoint)
    (prompt,) = prompts([19], seed=5)
    cluster = PackedCluster(tiny_checkpoint, 2)
    cluster.step({0: (0, prompt[:7])})
    assert_close(cluster.step({0: (7, prompt[7:])})[0], reference_rows(hf, [prompt])[0][-1])


def test_the_greedy_tokens_that_cross_devices_are_each_rows_argmax_with_its_margin_and_scale(tiny_checkpoint):
    sequences = prompts([6, 13, 3], seed=7)
    with_logits = PackedCluster(tiny_checkpoint, 3).step({i: (0, s) for i, s in enumerate(sequences)})
    greedy = PackedCluster(tiny_checkpoint, 3).step({i: (0, s) for i, s in enumerate(sequences)}, logits=False)
    top = with_logits.topk(2, dim=-1)
    assert list(greedy.token_ids) == with_logits.argmax(dim=-1).tolist()
    assert greedy.margins == pytest.approx((top.values[:, 0] - top.values[:, 1]).tolist(), abs=1e-6)
    assert greedy.scales == pytest.approx(with_logits.abs().amax(dim=-1).tolist(), abs=1e-6)
