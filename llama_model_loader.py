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
from pathlib import Path
from typing import Sequence

import torch
from safetensors import safe_open

# The config half lives in llama_config.py (torch-free); its names are this module's public API too.
from llama_config import (ENV_CACHE, ENV_CHECKPOINT, HF_REPOS, LLAMA3_BOS, CheckpointError, CheckpointLocation,  # noqa: F401
                          LlamaConfig, Range, cache_root, expected_tensors, find_hf_snapshot, hf_hub_dir,
                          resolve_checkpoint)


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
