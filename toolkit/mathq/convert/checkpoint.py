"""Find and open the safetensors shards of a Hugging Face checkpoint, or say what is wrong.

A checkpoint is either sharded with ``model.safetensors.index.json`` (whose weight map must
agree with the shards' headers) or one or more ``*.safetensors`` files. Pickle weights
(``pytorch_model.bin``, ``*.pt``) are never loaded: unpickling runs code from the file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from mathq.convert.hfconfig import read_checkpoint_json
from mathq.convert.safetensors_reader import TensorEntry, read_header
from mathq.errors import CheckpointError, InputFileError

INDEX_NAME = "model.safetensors.index.json"
PICKLE_PATTERNS = ("pytorch_model*.bin", "*.pt", "*.pth", "*.ckpt")
_SHARD_NAME = re.compile(r"-(\d+)-of-(\d+)\.safetensors$")
_REDOWNLOAD = "download the checkpoint again (`mathq download` resumes and checks hashes)"


@dataclass(frozen=True)
class Checkpoint:
    """The shards of a checkpoint and every tensor in them (validated headers)."""

    hf_dir: Path
    shards: tuple[Path, ...]
    tensors: dict[str, TensorEntry]

    @property
    def tensor_bytes(self) -> int:
        """Bytes of tensor data across all shards."""
        return sum(e.nbytes for e in self.tensors.values())


def find_shards(hf_dir: Path) -> tuple[Path, ...]:
    """The safetensors files of ``hf_dir``; refuses missing shards and pickle-only folders."""
    hf_dir = Path(hf_dir)
    if not hf_dir.is_dir():
        raise InputFileError(
            f"{hf_dir} is not a folder", "give a Hugging Face model folder or a recipe name"
        )
    index = hf_dir / INDEX_NAME
    if index.is_file():
        names = sorted(set(_weight_map(index).values()))
    else:
        names = sorted(p.name for p in hf_dir.glob("*.safetensors"))
        for name in names:
            if m := _SHARD_NAME.search(name):
                total = int(m.group(2))
                stem = name[: m.start()]
                names_expected = [
                    f"{stem}-{i:0{len(m.group(1))}d}-of-{m.group(2)}.safetensors"
                    for i in range(1, total + 1)
                ]
                names = sorted(set(names) | set(names_expected))
                break
    if not names:
        pickles = sorted({p.name for pat in PICKLE_PATTERNS for p in hf_dir.glob(pat)})
        if pickles:
            raise CheckpointError(
                f"{hf_dir} holds only pickle weights ({', '.join(pickles[:3])}); mathq reads "
                "safetensors only",
                "download the model's *.safetensors files instead; pickle files can run code "
                "when loaded",
            )
        raise CheckpointError(f"no *.safetensors weights in {hf_dir}", _REDOWNLOAD)
    for name in names:
        if not (hf_dir / name).is_file():
            raise CheckpointError(
                f"shard {name} is missing from {hf_dir} ({len(names)} shards expected)", _REDOWNLOAD
            )
    return tuple(hf_dir / n for n in names)


def _weight_map(index: Path) -> dict[str, str]:
    data = read_checkpoint_json(index, _REDOWNLOAD)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if (
        not isinstance(weight_map, dict)
        or not weight_map
        or not all(
            isinstance(v, str) and "/" not in v and v.endswith(".safetensors")
            for v in weight_map.values()
        )
    ):
        raise CheckpointError(f"{index}: no valid weight_map", _REDOWNLOAD)
    return weight_map


def open_checkpoint(hf_dir: Path) -> Checkpoint:
    """Validate every shard's header and the index; collect all tensors by name."""
    hf_dir = Path(hf_dir)
    shards = find_shards(hf_dir)
    tensors: dict[str, TensorEntry] = {}
    for shard in shards:
        entries, _, _ = read_header(shard)
        for name, entry in entries.items():
            if name in tensors:
                raise CheckpointError(
                    f"tensor {name} is in both {tensors[name].path.name} and {shard.name}",
                    _REDOWNLOAD,
                )
            tensors[name] = entry
    index = hf_dir / INDEX_NAME
    if index.is_file():
        weight_map = _weight_map(index)
        for name, shard_name in weight_map.items():
            if name not in tensors:
                raise CheckpointError(
                    f"tensor {name} is listed in {INDEX_NAME} but missing from {shard_name}",
                    _REDOWNLOAD,
                )
            if tensors[name].path.name != shard_name:
                raise CheckpointError(
                    f"tensor {name} is in {tensors[name].path.name}, "
                    f"{INDEX_NAME} says {shard_name}",
                    _REDOWNLOAD,
                )
        extra = sorted(set(tensors) - set(weight_map))
        if extra:
            raise CheckpointError(
                f"tensor {extra[0]} is in {tensors[extra[0]].path.name} but not in {INDEX_NAME}",
                _REDOWNLOAD,
            )
    return Checkpoint(hf_dir, shards, tensors)
