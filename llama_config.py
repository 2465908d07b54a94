"""The torch-free half of a Llama checkpoint: its config.json and where the checkpoint is.

Kept apart from the tensors (llama_model_loader.py) so that the command lines can find the
checkpoint and check its config, and answer a mistake, before paying for importing torch.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

ENV_CHECKPOINT = "LLAMA_CHECKPOINT"
ENV_CACHE = "KV_REUSE_CACHE"
HF_REPOS = ("models--meta-llama--Llama-3.2-1B", "models--meta-llama--Llama-3.2-1B-Instruct")
LLAMA3_BOS = 128000

Range = tuple[int, int]
SILU_NAMES = ("silu", "swish")  # what Hugging Face calls SiLU (x * sigmoid(x)) in `hidden_act`


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
    hidden_act: str = "silu"  # the MLP's activation: the engine computes SiLU only
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
                hidden_act=str(raw.get("hidden_act", "silu")),
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
        if self.hidden_act not in SILU_NAMES:
            raise CheckpointError(f"{source}: hidden_act {self.hidden_act!r} is not supported (the MLP computes "
                                  f"SiLU: {' or '.join(SILU_NAMES)})")
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


def checkpoint_name(folder: Path) -> str:
    """The model's name as its folder gives it: the repository of a Hugging Face cache snapshot
    ('meta-llama/Llama-3.2-1B'), else the folder's own name."""
    repo = folder.parent.parent.name if folder.parent.name == "snapshots" else ""
    return repo[len("models--"):].replace("--", "/") if repo.startswith("models--") else folder.name
