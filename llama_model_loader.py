"""Find, check and read a Llama checkpoint (config.json + safetensors), slice by slice.

A device reads only the rows and columns it owns, so that after a failure a survivor can load
the slices it inherits without touching the rest. Every tensor name, shape and dtype is checked
against the config before any compute, and every problem is one line naming the file.
"""
from __future__ import annotations

import copy
import json
import mmap
import os
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from safetensors import safe_open

ENV_CHECKPOINT = "LLAMA_CHECKPOINT"
ENV_CACHE = "KV_REUSE_CACHE"
HF_REPOS = ("models--meta-llama--Llama-3.2-1B", "models--meta-llama--Llama-3.2-1B-Instruct")
LLAMA3_BOS = 128000

Range = tuple[int, int]


class CheckpointError(Exception):
    """A problem with the user's checkpoint; the message is one line a person can act on."""


def cache_root() -> Path:
    """Where the project keeps what it writes once and reuses (synthetic and converted checkpoints)."""
    if os.environ.get(ENV_CACHE):
        return Path(os.environ[ENV_CACHE])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "kv-reuse-tp"


# --------------------------------------------------------------------------------------------
# Config


@dataclass(frozen=True)
class LlamaConfig:
    """The fields of a Llama-family config.json that the engine uses (names as in the file)."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    rope_scaling: Mapping[str, Any] | None = None
    tie_word_embeddings: bool = True
    attention_bias: bool = False
    mlp_bias: bool = False
    torch_dtype: str = "bfloat16"
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    model_type: str = "llama"
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def group_size(self) -> int:
        """Query heads per KV head (GQA)."""
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        eos = self.eos_token_id
        return () if eos is None else tuple(eos) if isinstance(eos, list) else (eos,)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], source: str = "config") -> "LlamaConfig":
        """Read an HF config dict (rope in `rope_scaling`/`rope_theta` or `rope_parameters`)."""
        if raw.get("model_type") not in ("llama", None) or not _is_llama_architecture(raw):
            raise CheckpointError(f"{source}: not a Llama-family model (model_type={raw.get('model_type')!r}, "
                                  f"architectures={raw.get('architectures')})")
        try:
            hidden, heads = int(raw["hidden_size"]), int(raw["num_attention_heads"])
            rope_theta, rope_scaling = _rope_fields(raw)
            config = cls(
                hidden_size=hidden,
                intermediate_size=int(raw["intermediate_size"]),
                num_hidden_layers=int(raw["num_hidden_layers"]),
                num_attention_heads=heads,
                num_key_value_heads=int(raw.get("num_key_value_heads", heads)),
                head_dim=int(raw.get("head_dim") or (hidden // heads if heads > 0 else 0)),
                vocab_size=int(raw["vocab_size"]),
                rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
                rope_theta=rope_theta,
                max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
                rope_scaling=rope_scaling,
                tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
                attention_bias=bool(raw.get("attention_bias", False)),
                mlp_bias=bool(raw.get("mlp_bias", False)),
                torch_dtype=str(raw.get("torch_dtype") or raw.get("dtype") or "bfloat16"),
                bos_token_id=raw.get("bos_token_id"),
                eos_token_id=raw.get("eos_token_id"),
                model_type=str(raw.get("model_type") or "llama"),
                extra={k: v for k, v in raw.items() if k not in _KNOWN_FIELDS},
            )
        except KeyError as missing:
            raise CheckpointError(f"{source}: missing field {missing}") from None
        except (TypeError, ValueError) as bad:
            raise CheckpointError(f"{source}: a field has the wrong type ({bad})") from None
        config.validate(source)
        return config

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "LlamaConfig":
        path = Path(path)
        try:
            raw = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise CheckpointError(f"{path.parent}: no config.json") from None
        except OSError as bad:
            raise CheckpointError(f"{path}: cannot be read ({bad.strerror or bad})") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as bad:
            raise CheckpointError(f"{path}: not valid JSON ({bad})") from None
        if not isinstance(raw, dict):
            raise CheckpointError(f"{path}: not a JSON object")
        return cls.from_dict(raw, source=str(path))

    def validate(self, source: str = "config") -> None:
        """Refuse what the engine cannot run, with the reason."""
        positive = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings")
        for name in positive:
            if getattr(self, name) <= 0:
                raise CheckpointError(f"{source}: {name} must be positive, got {getattr(self, name)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise CheckpointError(f"{source}: {self.num_attention_heads} query heads are not divisible by "
                                  f"{self.num_key_value_heads} KV heads")
        if self.head_dim % 2:
            raise CheckpointError(f"{source}: head_dim must be even for RoPE, got {self.head_dim}")
        if self.attention_bias or self.mlp_bias:
            raise CheckpointError(f"{source}: attention or MLP biases are not supported")
        if not self.rms_norm_eps > 0 or not self.rope_theta > 0:
            raise CheckpointError(f"{source}: rms_norm_eps and rope_theta must be positive")
        rope_type = (self.rope_scaling or {}).get("rope_type", "default")
        if rope_type not in ("default", "llama3"):
            raise CheckpointError(f"{source}: rope_type {rope_type!r} is not supported (default or llama3)")

    def to_dict(self) -> dict[str, Any]:
        """The config.json this config was read from (HF field names)."""
        raw = {k: v for k, v in asdict(self).items() if k != "extra"}
        raw["rope_scaling"] = dict(self.rope_scaling) if self.rope_scaling else None
        return {"architectures": ["LlamaForCausalLM"], **dict(self.extra), **raw}


_KNOWN_FIELDS = set(LlamaConfig.__dataclass_fields__) | {"rope_parameters", "dtype"}


def _is_llama_architecture(raw: Mapping[str, Any]) -> bool:
    architectures = raw.get("architectures") or ["LlamaForCausalLM"]
    return raw.get("model_type") == "llama" or any("Llama" in a for a in architectures)


def _rope_fields(raw: Mapping[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """rope_theta and the scaling dict, from old-style fields or newer `rope_parameters`."""
    params = raw.get("rope_parameters") or {}
    if not isinstance(params, dict) or not isinstance(raw.get("rope_scaling") or {}, dict):
        raise TypeError("rope_scaling and rope_parameters must be objects")
    scaling = raw.get("rope_scaling") or {k: v for k, v in params.items() if k != "rope_theta"} or None
    if scaling and scaling.get("rope_type", scaling.get("type")) in (None, "default"):
        scaling = None
    elif scaling and "rope_type" not in scaling:
        scaling = {**scaling, "rope_type": scaling["type"]}
    theta = float(raw.get("rope_theta") or params.get("rope_theta") or 10000.0)
    return theta, scaling


# --------------------------------------------------------------------------------------------
# Finding the checkpoint


@dataclass(frozen=True)
class CheckpointLocation:
    """Where the weights come from, and why that place was chosen."""

    path: Path | None  # None: use the synthetic fallback
    source: str        # "argument", "environment", "huggingface-cache", "synthetic"
    reason: str

    @property
    def is_synthetic(self) -> bool:
        return self.source == "synthetic"


def resolve_checkpoint(model_dir: str | os.PathLike | None = None,
                       environ: Mapping[str, str] = os.environ) -> CheckpointLocation:
    """An explicit path, else $LLAMA_CHECKPOINT, else the HF cache, else the synthetic fallback."""
    if model_dir is not None:
        return CheckpointLocation(_existing_dir(Path(model_dir), "--model-dir"), "argument",
                                  "given with --model-dir")
    if environ.get(ENV_CHECKPOINT):
        return CheckpointLocation(_existing_dir(Path(environ[ENV_CHECKPOINT]), f"${ENV_CHECKPOINT}"),
                                  "environment", f"given by ${ENV_CHECKPOINT}")
    snapshot = find_hf_snapshot(environ)
    if snapshot is not None:
        return CheckpointLocation(snapshot, "huggingface-cache", "found in the Hugging Face cache")
    return CheckpointLocation(None, "synthetic",
                              f"no real Llama-3.2-1B found (no --model-dir, no ${ENV_CHECKPOINT}, nothing in "
                              f"{hf_hub_dir(environ)}): using a synthetic checkpoint with the same shapes")


def _existing_dir(path: Path, given_by: str) -> Path:
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such model folder ({given_by})")
    return path


def hf_hub_dir(environ: Mapping[str, str] = os.environ) -> Path:
    if environ.get("HF_HUB_CACHE"):
        return Path(environ["HF_HUB_CACHE"])
    home = environ.get("HF_HOME") or Path(environ.get("HOME", str(Path.home()))) / ".cache" / "huggingface"
    return Path(home) / "hub"


def find_hf_snapshot(environ: Mapping[str, str] = os.environ) -> Path | None:
    """The newest complete Llama-3.2-1B (or -Instruct) snapshot in the Hugging Face cache layout."""
    snapshots = [s for repo in HF_REPOS for s in (hf_hub_dir(environ) / repo / "snapshots").glob("*")
                 if (s / "config.json").is_file() and _has_weights(s)]
    return max(snapshots, key=lambda s: s.stat().st_mtime) if snapshots else None


def _has_weights(folder: Path) -> bool:
    return (folder / "model.safetensors").is_file() or (folder / "model.safetensors.index.json").is_file()


# --------------------------------------------------------------------------------------------
# Reading tensors


def expected_tensors(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor name the checkpoint must hold, with its shape (146 for Llama-3.2-1B)."""
    h, hd, inter = config.hidden_size, config.head_dim, config.intermediate_size
    q, kv = config.num_attention_heads * hd, config.num_key_value_heads * hd
    shapes = {"model.embed_tokens.weight": (config.vocab_size, h), "model.norm.weight": (h,)}
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (q, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, q),
            p + "mlp.gate_proj.weight": (inter, h),
            p + "mlp.up_proj.weight": (inter, h),
            p + "mlp.down_proj.weight": (h, inter),
        }
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, h)
    return shapes


FLOAT_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


class Checkpoint:
    """A checked checkpoint folder: every expected tensor present, with the right shape and dtype.

    The header is read (and checked) by safetensors; reads then copy each slice straight from
    a memory map of the file, chunk by chunk, into the result in the compute dtype: no temporary
    tensor, and each chunk is unmapped after use, so loading never holds the model twice.
    """

    CHUNK_BYTES = 64 << 20

    def __init__(self, folder: str | os.PathLike, config: LlamaConfig | None = None):
        self.folder = Path(folder)
        self.device = torch.device("cpu")  # where reads put their results (see `onto`)
        if not self.folder.is_dir():
            raise CheckpointError(f"{self.folder}: no such model folder")
        self.config = config or LlamaConfig.from_json(self.folder / "config.json")
        self.files = self._tensor_files()
        self.shapes: dict[str, tuple[int, ...]] = {}
        self._offsets: dict[str, int] = {}
        self.dtypes: dict[str, str] = {}
        for file, names in self._names_by_file().items():
            self._read_header(file, names)
        self._check_against_config()

    def onto(self, device: torch.device) -> "Checkpoint":
        """The same checkpoint, read onto `device` (an accelerator): each slice goes from the file's
        memory map straight into memory there, chunk by chunk, never whole through this host."""
        placed = copy.copy(self)
        placed.device = torch.device(device)
        return placed

    @property
    def tensor_count(self) -> int:
        return len(self.shapes)

    @property
    def total_bytes(self) -> int:
        return sum(_numel(s) * FLOAT_DTYPES[self.dtypes[n]].itemsize for n, s in self.shapes.items())

    @property
    def stored_dtype(self) -> str:
        return ", ".join(sorted(set(self.dtypes.values())))

    @property
    def embedding_dtype(self) -> torch.dtype:
        """The dtype of the largest tensor (the embedding): what inheriting slices mostly reads."""
        return FLOAT_DTYPES[self.dtypes["model.embed_tokens.weight"]]

    def _tensor_files(self) -> dict[str, Path]:
        """Tensor name -> file, from the shard index or from the single model.safetensors."""
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as bad:
                raise CheckpointError(f"{index}: not a valid shard index ({bad})") from None
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise CheckpointError(f"{index}: weight_map must map tensor names to shard file names")
            files = {name: self.folder / shard for name, shard in weight_map.items()}
            for shard in sorted(set(files.values())):
                if not shard.is_file():
                    raise CheckpointError(f"{index}: names shard {shard.name}, which is missing")
            return files
        single = self.folder / "model.safetensors"
        if not single.is_file():
            raise CheckpointError(f"{self.folder}: no model.safetensors or model.safetensors.index.json")
        return {"*": single}

    def _names_by_file(self) -> dict[Path, list[str] | None]:
        if "*" in self.files:
            return {self.files.pop("*"): None}
        by_file: dict[Path, list[str] | None] = {}
        for name, file in self.files.items():
            by_file.setdefault(file, []).append(name)  # type: ignore[union-attr]
        return by_file

    def _read_header(self, file: Path, names: list[str] | None) -> None:
        with _open_safetensors(file) as handle:
            for name in handle.keys():
                if names is not None and name not in names:
                    continue
                piece = handle.get_slice(name)
                self.shapes[name] = tuple(piece.get_shape())
                self.dtypes[name] = piece.get_dtype()
                self.files[name] = file
            if names is not None:
                missing = sorted(set(names) - set(handle.keys()))
                if missing:
                    raise CheckpointError(f"{file}: the index lists {missing[0]}, which the file does not hold")

    def _check_against_config(self) -> None:
        for name, shape in expected_tensors(self.config).items():
            if name not in self.shapes:
                raise CheckpointError(f"{self.folder}: tensor {name} is missing")
            where = self.files[name].name
            if self.shapes[name] != shape:
                raise CheckpointError(f"{where}: tensor {name} has shape {list(self.shapes[name])}, "
                                      f"the config needs {list(shape)}")
            if self.dtypes[name] not in FLOAT_DTYPES:
                raise CheckpointError(f"{where}: tensor {name} has dtype {self.dtypes[name]}, "
                                      f"expected a float type (BF16, F16, F32)")

    def read(self, name: str, dtype: torch.dtype, rows: Sequence[Range] | None = None,
             cols: Sequence[Range] | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor, or only the given row ranges / column ranges of it, converted to `dtype`.

        Ranges are concatenated in order (an empty list selects nothing). Values are copied
        straight from the memory-mapped file into `out` (allocated if not given), chunk by chunk:
        no temporary tensor is made, so loading allocates nothing but the result, and the file's
        pages are unmapped after each chunk.
        """
        shape = self.shapes[name]
        rows = [(0, shape[0])] if rows is None else rows
        height = sum(b - a for a, b in rows)
        width = sum(b - a for a, b in cols) if cols is not None else _numel(shape[1:])
        if out is None:
            out = torch.empty((height, width) if len(shape) > 1 else (height,), dtype=dtype, device=self.device)
        at = 0
        for start, stop in rows:
            self._read_rows_into(name, start, stop, cols, out[at:at + stop - start])
            at += stop - start
        return out

    def _read_rows_into(self, name: str, start: int, stop: int, cols: Sequence[Range] | None,
                        out: torch.Tensor) -> None:
        shape, stored = self.shapes[name], FLOAT_DTYPES[self.dtypes[name]]
        row_numel = _numel(shape[1:])
        step = max(1, self.CHUNK_BYTES // max(row_numel * stored.itemsize, 1))
        with open(self.files[name], "rb") as f:
            for chunk_start in range(start, stop, step):
                chunk_stop = min(stop, chunk_start + step)
                begin = self._data_offset(name) + chunk_start * row_numel * stored.itemsize
                aligned = begin - begin % mmap.ALLOCATIONGRANULARITY
                length = begin - aligned + (chunk_stop - chunk_start) * row_numel * stored.itemsize
                with mmap.mmap(f.fileno(), length, offset=aligned, access=mmap.ACCESS_READ) as mapped:
                    with warnings.catch_warnings():  # read-only buffer: the view is only read from
                        warnings.simplefilter("ignore", UserWarning)
                        view = torch.frombuffer(mapped, dtype=stored, offset=begin - aligned,
                                                count=(chunk_stop - chunk_start) * row_numel)
                    view = view.view(chunk_stop - chunk_start, *shape[1:])
                    target = out[chunk_start - start:chunk_stop - start]
                    if cols is None:
                        target.copy_(view)
                    else:
                        at = 0
                        for a, b in cols:
                            target[:, at:at + b - a].copy_(view[:, a:b])
                            at += b - a
                    del view, target  # no view may outlive the mapping

    def _data_offset(self, name: str) -> int:
        """Byte offset of the tensor's data in its file (from the safetensors header)."""
        if name not in self._offsets:
            with open(self.files[name], "rb") as f:
                size = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(size))
            for key, entry in header.items():
                if key != "__metadata__":
                    self._offsets[key] = 8 + size + entry["data_offsets"][0]
        return self._offsets[name]


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _open_safetensors(file: Path):
    try:
        return safe_open(str(file), framework="pt")
    except FileNotFoundError:
        raise CheckpointError(f"{file}: file is missing") from None
    except Exception as bad:  # safetensors raises its own error type for every kind of damage
        reason = str(bad).splitlines()[0] if str(bad) else type(bad).__name__
        raise CheckpointError(f"{file}: not a readable safetensors file ({reason})") from None


# --------------------------------------------------------------------------------------------
# Tokenizer


class ByteTokenizer:
    """For checkpoints without tokenizer.json (the tiny preset): token ids 0-255 are UTF-8 bytes."""

    def __init__(self, bos_token_id: int | None):
        self.bos_token_id = bos_token_id

    def encode(self, text: str) -> list[int]:
        return ([self.bos_token_id] if self.bos_token_id is not None else []) + list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class JsonTokenizer:
    """A `tokenizer.json` through the `tokenizers` library; BOS is added here, not by the file."""

    def __init__(self, path: Path, bos_token_id: int | None):
        from tokenizers import Tokenizer
        try:
            self.tokenizer = Tokenizer.from_file(str(path))
        except Exception as bad:  # the tokenizers library raises a bare Exception for a damaged file
            raise CheckpointError(f"{path}: not a readable tokenizer ({str(bad).splitlines()[0][:120]})") from None
        self.bos_token_id = bos_token_id
        self.path = path

    def encode(self, text: str) -> list[int]:
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        return ([self.bos_token_id] if self.bos_token_id is not None else []) + ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)


Tokenizer = ByteTokenizer | JsonTokenizer


def load_tokenizer(folder: Path, config: LlamaConfig) -> Tokenizer:
    """The checkpoint's tokenizer.json if present, else bytes (only for vocabularies >= 256).

    BOS is prepended unless the folder's tokenizer_config.json says `add_bos_token: false`
    (SmolLM2 does; Llama 3 does add it, and its tokenizer.json does not do it by itself).
    """
    path = Path(folder) / "tokenizer.json"
    if path.is_file():
        return JsonTokenizer(path, config.bos_token_id if _adds_bos(Path(folder)) else None)
    if config.vocab_size < 256:
        raise CheckpointError(f"{folder}: no tokenizer.json and the vocabulary is too small for bytes")
    return ByteTokenizer(config.bos_token_id)


def _adds_bos(folder: Path) -> bool:
    try:
        return bool(json.loads((folder / "tokenizer_config.json").read_text()).get("add_bos_token", True))
    except (OSError, json.JSONDecodeError, AttributeError):
        return True
