"""The serving benchmark's workloads: ShareGPT read one conversation at a time up to where the
shipped file is cut, filtered as vLLM filters it, sampled with a seed, through the chat template
when the checkpoint has one; and random prompts of seeded lengths.

Byte tokenizers make every length countable by hand: a prompt of n ASCII characters is n tokens.
"""
from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

import serving_dataset  # noqa: E402
from llama_model_loader import ByteTokenizer  # noqa: E402
from provenance import strict_json  # noqa: E402
from serving_dataset import (ArrayRead, ChatTemplate, load_chat_template, prompt_ids, read_json_array,  # noqa: E402
                             sample_random, sample_sharegpt, sharegpt_path)

BYTES = ByteTokenizer(bos_token_id=None)
SMOLLM2_TEMPLATE = (  # the template in SmolLM2-135M-Instruct's GGUF, as the conversion writes it
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SMOLLM2_HI = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
              "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def conversation(*turns: str) -> dict:
    return {"id": "x", "conversations": [{"from": f"turn{i}", "value": v} for i, v in enumerate(turns)]}


def write_json(path: Path, value) -> Path:
    path.write_text(json.dumps(value, indent=2))
    return path


@pytest.fixture(scope="module")
def sharegpt_file() -> Path:
    try:
        return sharegpt_path()
    except FileNotFoundError as missing:
        pytest.skip(f"{missing} (pip install -r requirements-test.txt)")


# Reading up to the cut


def test_the_shipped_sharegpt_file_is_cut_and_holds_17671_whole_conversations(sharegpt_file):
    read = ArrayRead()
    assert sum(1 for _ in read_json_array(sharegpt_file, read)) == 17671
    assert read.items == 17671 and not read.complete


@pytest.mark.parametrize("chunk_chars", [3, 1 << 20])
def test_an_array_is_read_item_by_item_across_buffer_ends_and_stops_at_the_cut(tmp_path, monkeypatch, chunk_chars):
    monkeypatch.setattr(serving_dataset, "CHUNK_CHARS", chunk_chars)
    items = [{"a": [1, 2]}, "two", 12345, None, {"b": {"c": None}}]
    whole = write_json(tmp_path / "whole.json", items)
    text = whole.read_text()
    cut = tmp_path / "cut.json"
    cut.write_text(text[:text.rindex('"c"')])
    read_whole, read_cut = ArrayRead(), ArrayRead()
    assert list(read_json_array(whole, read_whole)) == items and read_whole.complete
    assert list(read_json_array(cut, read_cut)) == items[:4] and not read_cut.complete


# vLLM's filter and the caps


def test_only_conversations_passing_vllms_length_filter_are_sampled(tmp_path):
    file = write_json(tmp_path / "slice.json", [
        conversation("one turn only"),
        conversation("abc", "a reply long enough"),       # prompt of 3 tokens: under 4
        conversation("a good prompt", "abc"),             # reply of 3 tokens
        conversation("p" * 1025, "a reply"),              # prompt over 1024
        conversation("p" * 1000, "r" * 1049),             # 2049 together: over 2048
        conversation("valid", "also"),                    # 5 and 4: kept
        conversation("p" * 1024, "r" * 1024, "more"),     # 1024 and 2048 in all: kept, third turn unused
    ])
    workload = sample_sharegpt(BYTES, 2, path=file)
    assert sorted((r.prompt_len, r.output_len) for r in workload.requests) == [(5, 4), (1024, 1024)]
    assert workload.source["conversations_read"] == 7 and workload.source["two_turn_conversations"] == 6
    with pytest.raises(ValueError, match="only 2 of 6 conversations pass"):
        sample_sharegpt(BYTES, 3, path=file)


def test_a_conversation_over_a_cap_is_dropped_not_shortened(tmp_path):
    file = write_json(tmp_path / "caps.json", [conversation("p" * 10, "r" * 10), conversation("p" * 20, "r" * 30),
                                               conversation("p" * 30, "r" * 20)])
    workload = sample_sharegpt(BYTES, 1, path=file, max_input_len=25, max_output_len=25)
    assert [(r.prompt_len, r.output_len) for r in workload.requests] == [(10, 10)]


def test_a_slice_of_sharegpt_keeps_only_valid_items(sharegpt_file, tmp_path):
    file = write_json(tmp_path / "slice.json", list(itertools.islice(read_json_array(sharegpt_file), 60)))
    valid = None
    for n in range(1, 61):
        try:
            workload = sample_sharegpt(BYTES, n, path=file)
        except ValueError:
            break
        valid = workload
    assert valid is not None and 0 < len(valid.requests) < 60  # some dropped, some kept
    for r in valid.requests:
        assert 4 <= r.prompt_len <= 1024 and r.output_len >= 4 and r.prompt_len + r.output_len <= 2048


def test_sampling_is_seeded(tmp_path):
    file = write_json(tmp_path / "ten.json", [conversation(f"prompt {i}", f"reply {i}") for i in range(10)])
    def lens(seed):
        return [r.prompt_ids for r in sample_sharegpt(BYTES, 5, seed=seed, path=file).requests]
    assert lens(0) == lens(0) and lens(0) != lens(1)


# The chat template


def test_the_chat_template_is_read_from_chat_template_jinja_or_tokenizer_config(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "chat_template.jinja").write_text(SMOLLM2_TEMPLATE)
    write_json(tmp_path / "a" / "tokenizer_config.json", {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"})
    (tmp_path / "b").mkdir()
    write_json(tmp_path / "b" / "tokenizer_config.json",
               {"chat_template": "{{ bos_token }}{{ messages[0]['content'] }}", "bos_token": {"content": "<s>"}})
    (tmp_path / "none").mkdir()
    assert load_chat_template(tmp_path / "a") == ChatTemplate(SMOLLM2_TEMPLATE, "<|im_start|>", "<|im_end|>")
    assert load_chat_template(tmp_path / "b").render("Hi") == "<s>Hi"
    assert load_chat_template(tmp_path / "none") is None


def test_prompts_go_through_the_chat_template_and_the_workload_says_so(tmp_path):
    template = ChatTemplate(SMOLLM2_TEMPLATE)
    assert prompt_ids(BYTES, "Hi", template) == list(SMOLLM2_HI.encode())
    file = write_json(tmp_path / "one.json", [conversation("Hi you", "Hello there")])
    assert sample_sharegpt(BYTES, 1, path=file, chat_template=template).chat_template is True
    assert sample_sharegpt(BYTES, 1, path=file).chat_template is False


class SpecialBytes(ByteTokenizer):
    """Bytes, but the text "<s>" is the BOS id, as a real tokenizer matches its special tokens."""

    def encode(self, text: str) -> list[int]:
        head, rest = ([self.bos_token_id], text[3:]) if text.startswith("<s>") else ([], text)
        return [self.bos_token_id, *head, *rest.encode()]


def test_a_template_that_writes_the_bos_gets_no_second_one_from_the_tokenizer():
    template = ChatTemplate("{{ bos_token }}{{ messages[0]['content'] }}", bos_token="<s>")
    assert prompt_ids(SpecialBytes(bos_token_id=1), "Hi", template) == [1, *b"Hi"]


def test_the_converted_smollm2_has_its_chat_template(smollm2_dir):
    assert load_chat_template(smollm2_dir).source == SMOLLM2_TEMPLATE


# Random


def test_random_prompts_have_the_asked_lengths_and_ids_from_the_vocabulary():
    workload = sample_random(vocab_size=50, num_prompts=20, input_len=16, output_len=8)
    assert [(r.prompt_len, r.output_len) for r in workload.requests] == [(16, 8)] * 20
    assert all(0 <= i < 50 for r in workload.requests for i in r.prompt_ids)
    assert workload.chat_template is False
    assert json.loads(strict_json(workload.as_json()))["input_lens"] == [16] * 20


def test_random_lengths_are_drawn_within_vllms_range_ratio_bounds():
    workload = sample_random(vocab_size=50, num_prompts=400, input_len=10, output_len=3, range_ratio=0.5)
    input_lens = {r.prompt_len for r in workload.requests}
    output_lens = {r.output_len for r in workload.requests}
    assert input_lens == set(range(5, 16))  # [floor(10 * 0.5), ceil(10 * 1.5)]
    assert output_lens == set(range(1, 6))  # floor(1.5) = 1, ceil(4.5) = 5


def test_random_prompts_are_seeded():
    def ids(seed):
        return [r.prompt_ids for r in sample_random(1000, 5, 8, 4, 0.5, seed).requests]
    assert ids(7) == ids(7) and ids(7) != ids(8)


def test_a_range_ratio_outside_0_to_1_is_refused():
    with pytest.raises(ValueError, match="must be in"):
        sample_random(50, 1, 8, 8, range_ratio=1.0)
