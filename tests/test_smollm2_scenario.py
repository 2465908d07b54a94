"""The whole scenario on a real trained model: SmolLM2-135M-Instruct (issue #5, part 4).

SmolLM2 is a Llama with 30 layers, 9 query heads and 3 KV heads, so four devices split it unevenly
(heads 3, 2, 2, 2) and two KV heads are held by two devices each. Its greedy text must equal
transformers' greedy text for the same token ids, and must not change when Device-1 crashes
mid-step and is recovered by any KV strategy after either reassignment. The checkpoint is
converted once and cached (conftest's `smollm2_dir`); each fp32 decode step takes a few
hundredths of a second, so the whole module runs in well under a minute once it is cached.
"""
from __future__ import annotations

import json

import pytest
import torch

import kv_cache_reused
from device_protocol import RecoveryPolicy
from execution_optimization_algorithm_demo import main as demo_main
from fault_injection import FailurePlan
from fault_tolerant_cluster import FaultTolerantLlama, generate_with_failures
from heartbeat_detection import HeartbeatConfig
from lossless_checks import LOGITS_TOLERANCE, near_ties as near_ties_of
from report_files import json_path
from tensor_parallel_cluster import TensorParallelLlama
from torch_threads import one_thread

PROMPT = "The capital of France is"
CHAT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
NEW_TOKENS = 16
DEVICES, FAILED, FAIL_AFTER = 4, 1, 5
HEARTBEAT = HeartbeatConfig(interval_s=0.05, timeout_s=0.5)  # short, with room for a loaded 2-core machine
EOS = 2  # <|im_end|>


@pytest.fixture(scope="module")
def hf_model(smollm2_dir, hf_reference):
    """transformers' LlamaForCausalLM on the converted folder, fp32 (shared with the checkpoint tests)."""
    return hf_reference(smollm2_dir, torch.float32)


@pytest.fixture(scope="module")
def engine(smollm2_dir):
    """The project's TensorParallelLlama on 4 devices, fp32, without failures."""
    with TensorParallelLlama.load(smollm2_dir, devices=DEVICES, dtype=torch.float32, log=lambda line: None) as model:
        yield model


def hf_input_ids(folder, prompt: str) -> list[int]:
    """What transformers feeds its model for `prompt`."""
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(folder)(prompt).input_ids


def hf_greedy(hf, ids: list[int], new_tokens: int) -> list[int]:
    """transformers' greedy continuation (it stops early only at <|im_end|>)."""
    prompt = torch.tensor([ids])
    with torch.no_grad(), one_thread():
        out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens, do_sample=False)
    return out[0, len(ids):].tolist()


def hf_greedy_check(hf, ids: list[int], tokens: list[int]) -> list[int]:
    """transformers' argmax after each prefix of `ids + tokens`, in one forward pass: equal to `tokens`
    exactly when `tokens` is transformers' greedy continuation (cheaper than generate)."""
    with torch.no_grad(), one_thread():
        logits = hf(torch.tensor([ids + tokens])).logits[0, len(ids) - 1:-1]
    return logits.argmax(-1).tolist()


@pytest.fixture(scope="module")
def plain(smollm2_dir, engine, hf_model) -> dict:
    """The plain prompt: its ids, the failure-free run's tokens and transformers' tokens."""
    ids = engine.tokenizer.encode(PROMPT)
    return {"ids": ids, "ours": engine.generate(ids, NEW_TOKENS), "hf": hf_greedy(hf_model, ids, NEW_TOKENS)}


# --- the uneven split and agreement with transformers -------------------------------------------


def test_four_devices_split_nine_heads_3_2_2_2_with_two_kv_heads_held_twice(engine):
    assignment = engine.assignment
    assert {d: len(h) for d, h in assignment.heads.items()} == {0: 3, 1: 2, 2: 2, 3: 2}
    assert assignment.heads == {0: (0, 1, 2), 1: (3, 4), 2: (5, 6), 3: (7, 8)}
    assert assignment.duplicated_kv_heads() == {1: (1, 2), 2: (2, 3)}  # heads 4-6 read KV 1, heads 7-9 KV 2
    assert {d: info.kv_heads for d, info in engine.describe().items()} == {0: (0,), 1: (1,), 2: (1, 2), 3: (2,)}


@pytest.mark.parametrize("prompt", [PROMPT, CHAT], ids=["plain", "chat"])
def test_engine_feeds_the_model_the_ids_transformers_feeds_it(smollm2_dir, engine, prompt):
    assert engine.tokenizer.encode(prompt) == hf_input_ids(smollm2_dir, prompt)  # no BOS: SmolLM2 adds none


def test_greedy_text_of_a_plain_prompt_equals_transformers_and_names_paris(engine, plain):
    assert len(plain["hf"]) == NEW_TOKENS
    assert plain["ours"] == plain["hf"]
    text = engine.tokenizer.decode(plain["ours"])
    assert "Paris" in text, text  # " Paris.\n\nThe answer is: 2018-01"


def test_greedy_chat_answer_equals_transformers_and_ends_the_turn(engine, hf_model):
    ids = engine.tokenizer.encode(CHAT)
    ours = engine.generate(ids, NEW_TOKENS, stop_at_eos=True)
    assert hf_greedy_check(hf_model, ids, ours) == ours
    assert ours[-1] == EOS and len(ours) < NEW_TOKENS
    assert "Paris" in engine.tokenizer.decode(ours), engine.tokenizer.decode(ours)


BATCH = [PROMPT, CHAT, "def fibonacci(n):", "Once upon a time, in a village by the sea,"]


def test_generate_batch_gives_every_prompt_transformers_greedy_tokens_but_at_a_counted_near_tie(engine, hf_model):
    """Four prompts of different lengths and outputs served together: each one's tokens are those
    transformers' argmax gives along them, except where the first difference is a near-tie of
    transformers' own logits (lossless_checks' rule): those are counted, and none is expected here."""
    prompts = [engine.tokenizer.encode(text) for text in BATCH]
    lengths = [NEW_TOKENS, 8, 12, NEW_TOKENS]
    outputs = engine.generate_batch(prompts, lengths)
    near_ties, defects = 0, []
    for index, (ids, ours, wanted) in enumerate(zip(prompts, outputs, lengths)):
        assert len(ours) == wanted
        with torch.no_grad(), one_thread():
            logits = hf_model(torch.tensor([ids + ours])).logits[0, len(ids) - 1:-1]
        first = next((i for i, (a, b) in enumerate(zip(logits.argmax(-1).tolist(), ours)) if a != b), None)
        if first is None:
            continue
        if near_ties_of([logits[first]], LOGITS_TOLERANCE[torch.float32]):
            near_ties += 1
        else:
            defects.append((index, first))
    assert defects == [] and near_ties == 0


# --- the failure scenario ------------------------------------------------------------------------


# Device-1 holds heads 4-5 (KV head 2), which Device-2 also holds. With seed 0 (and balanced) the lost
# heads go to Device-2, so no KV head has to be rebuilt; seed 5 sends them to Device-3, which must
# rebuild KV head 2 for them: the case in which the strategies really differ.
REASSIGNMENTS = {"random": ("random", 0, 2, ()), "balanced": ("balanced", 0, 2, ()),
                 "random-seed5": ("random", 5, 3, (1,))}


@pytest.mark.parametrize("reassign_case", REASSIGNMENTS)
@pytest.mark.parametrize("strategy", kv_cache_reused.STRATEGIES)
def test_crash_of_device_1_after_5_tokens_leaves_the_greedy_text_unchanged(smollm2_dir, plain, strategy,
                                                                           reassign_case):
    crash_device_1_and_check_the_text(smollm2_dir, plain, strategy, reassign_case, "threads")


@pytest.mark.parametrize("strategy", ["reuse-hidden", "replicate"])
def test_on_device_processes_a_sigkilled_device_1_leaves_the_greedy_text_unchanged(smollm2_dir, plain, strategy):
    """The uneven split (9 query heads, 3 KV heads over 4 processes) on torch.distributed: a real
    SIGKILL, the lost KV head rebuilt on Device-3 (seed 5), and still the text transformers writes."""
    crash_device_1_and_check_the_text(smollm2_dir, plain, strategy, "random-seed5", "processes")


def crash_device_1_and_check_the_text(smollm2_dir, plain, strategy: str, reassign_case: str, backend: str) -> None:
    reassign, seed, receiver, kv_to_rebuild = REASSIGNMENTS[reassign_case]
    heartbeat = HEARTBEAT if backend == "threads" else HeartbeatConfig(interval_s=0.05, timeout_s=1.0)
    with FaultTolerantLlama.load(smollm2_dir, devices=DEVICES, dtype=torch.float32, heartbeat=heartbeat,
                                 log=lambda line: None, policy=RecoveryPolicy(reassign, seed, strategy),
                                 backend=backend) as model:
        model.keep(True, True)
        tokens = generate_with_failures(model, plain["ids"], NEW_TOKENS, [FailurePlan(FAILED, FAIL_AFTER)])
        survivors = dict(model.assignment.heads)
        recoveries = model.recoveries

    assert tokens == plain["ours"] == plain["hf"]
    [recovery] = recoveries
    assert [e.device for e in recovery.events] == [FAILED]
    assert recovery.strategy == strategy and recovery.fallback_reason is None and recovery.attempts == 1
    [plan] = recovery.plans
    assert plan.strategy == reassign and plan.receivers == (receiver,)
    assert plan.kv_to_rebuild[receiver] == kv_to_rebuild
    assert FAILED not in survivors and sorted(h for hs in survivors.values() for h in hs) == list(range(9))


# --- the demo, end to end ------------------------------------------------------------------------


def test_demo_on_smollm2_reports_the_uneven_split_and_lossless_recoveries(smollm2_dir, plain, tmp_path, capsys):
    report_path = tmp_path / "r.txt"
    code = demo_main(["--model-dir", str(smollm2_dir), "--heartbeat-interval", "0.05", "--heartbeat-timeout", "0.25",
                      "--context-tokens", "0", "--prompt", PROMPT, "--new-tokens", "12", "--fail-after", "4",
                      "--repeats", "1", "--report", str(report_path)])
    printed = capsys.readouterr().out
    assert code == 0
    assert report_path.is_file() and "Paris" in printed
    report = json.loads(json_path(report_path).read_text())

    assert report["model"]["synthetic"] is False and report["model"]["path"] == str(smollm2_dir)
    assert [row["heads"] for row in report["system"]["assignment"]] == ["1-3", "4-5", "6-7", "8-9"]
    assert [row["kv_heads"] for row in report["system"]["assignment"]] == ["1", "2", "2, 3", "3"]
    assert [len(h) for h in report["failure"]["initial_assignment"].values()] == [3, 2, 2, 2]
    assert report["system"]["duplicated_kv"] == "KV head 2 on Device-1, Device-2; KV head 3 on Device-2, Device-3"
    assert report["failure"]["device"] == FAILED and "1" not in report["failure"]["assignment_after"]

    rows = {row["name"]: row for row in report["comparison"]}
    assert set(rows) == set(kv_cache_reused.STRATEGIES)
    for name, row in rows.items():
        assert row["error"] is None and row["lossless"] and row["tokens_identical"], (name, row)

    text = report["text"]
    assert text["prompt_ids"] == hf_input_ids(smollm2_dir, PROMPT)
    assert text["reference_ids"] == plain["hf"][:12]  # greedy: the first 12 of transformers' 16 tokens
    assert text["before_ids"] == text["reference_ids"][:4]
    assert "Paris" in text["before_text"] + text["reference_text"]
    assert text["after_ids"] == {name: text["reference_ids"][4:] for name in kv_cache_reused.STRATEGIES}
    assert text["after_texts"] == {name: text["reference_text"] for name in kv_cache_reused.STRATEGIES}
