"""Export the trainer's weights as a model directory the inference servers can load.

`run_dir/weights/v{N}/` has the same layout as the original model directory (safetensors,
config, generation config, tokenizer files), so it works both for vLLM's
`reload_weights(weights_path=DIR)` and for a fresh `--model DIR`. It is written atomically
(`common.atomic_dir`), so a reader never sees a half-written version.

The weights go out as exactly the tensors of the source checkpoint (the names vLLM loaded the
model from: a tied LM head is not written twice), in the servers' dtype, each written straight
from the parameter's memory into the file. Writing releases the GIL, so the executor's loop
keeps serving while the trainer exports; `save_pretrained` is the fallback for a model whose
parameter names differ from its checkpoint's.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import struct
import uuid
from collections.abc import Mapping
from functools import cache
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor
from transformers import PreTrainedModel
from transformers.utils import logging as hf_logging

from sdp_cli.common.atomic import atomic_dir
from sdp_cli.weight_sync.versions import (
    SPARE_DIR,
    VERSION_DIR,
    WEIGHTS_FILE,
    WeightsExportError,
    prune_versions,
    spare_files,
    spare_limit,
    version_dir,
)

# Files of the source model directory that the exported weights replace.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack")
_WEIGHT_INDEX_NAMES = {"model.safetensors.index.json", "pytorch_model.bin.index.json"}
_WRITTEN_BY_SAVE = {"config.json", "generation_config.json"}
# Buffers one writev call may take (Linux's IOV_MAX).
_IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024
_HEADER_ROOM = 1 << 20
# safetensors' names of the dtypes a server can hold.
_SAFETENSORS_DTYPES = {
    torch.float32: "F32",
    torch.bfloat16: "BF16",
    torch.float16: "F16",
}
# vLLM's --dtype → the dtype of the exported tensors; "auto" keeps the trainer's.
_SERVER_DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "half": torch.float16,
}


def _is_weight_file(name: str) -> bool:
    return name.endswith(_WEIGHT_SUFFIXES) or name in _WEIGHT_INDEX_NAMES


def copy_tokenizer_files(source_dir: Path, target_dir: Path) -> None:
    """Copy everything but weights and configs (tokenizer, chat template, vocab files...)."""
    for item in sorted(source_dir.iterdir()):
        if item.is_file() and not _is_weight_file(item.name) and item.name not in _WRITTEN_BY_SAVE:
            shutil.copy2(item, target_dir / item.name)


def export_size(model: PreTrainedModel, source_dir: Path, dtype: torch.dtype | None) -> int | None:
    """Bytes of the tensors an export writes (None where it falls back to save_pretrained)."""
    names = checkpoint_tensor_names(Path(source_dir))
    # In the trainer's dtype: only the sizes are needed, not a converted copy.
    tensors = tensors_for_servers(model.state_dict(), names, None)
    if tensors is None:
        return None
    return sum(t.numel() * (dtype or t.dtype).itemsize for t in tensors.values())


def reserve_export_files(
    model: PreTrainedModel,
    source_dir: Path,
    weights_dir: Path,
    keep: int,
    dtype: torch.dtype | None,
) -> int:
    """Allocate, before the run, the weight files its exports will write over (one per
    export until the first prune, less what is there already). Returns how many were made.

    Memory a process touches for the first time can cost several times a write to memory
    already in use (docs/benchmarks.md); exports that write over these files and pruned
    versions' files never pay it."""
    size = export_size(model, source_dir, dtype)
    if size is None:
        return 0
    weights_dir.mkdir(parents=True, exist_ok=True)
    present = sum(1 for item in weights_dir.iterdir() if VERSION_DIR.match(item.name))
    missing = spare_limit(keep) - present - len(spare_files(weights_dir))
    spares = weights_dir / SPARE_DIR
    spares.mkdir(exist_ok=True)
    for _ in range(max(missing, 0)):
        path = spares / f"{uuid.uuid4().hex}.safetensors"
        try:
            with path.open("wb") as handle:
                # The header (names, shapes, offsets) is some kilobytes; the write truncates.
                os.posix_fallocate(handle.fileno(), 0, size + _HEADER_ROOM)
        except OSError as exc:
            path.unlink(missing_ok=True)
            raise WeightsExportError(
                f"cannot reserve {spare_limit(keep)} weight files of {size / 2**20:.0f} MiB for "
                f"the servers in '{weights_dir}': {exc}\n  make room there, lower "
                "train.keep_weights, or set train.weights_dir to another directory"
            ) from exc
    return max(missing, 0)


def export_dtype(server_dtype: str) -> torch.dtype | None:
    """The dtype the servers hold (vLLM's --dtype), None for "auto" (the trainer's own)."""
    return _SERVER_DTYPES.get(server_dtype)


@cache
def checkpoint_tensor_names(source_dir: Path) -> frozenset[str]:
    """The tensor names of a model directory's safetensors files (read from their headers)."""
    names: set[str] = set()
    for path in sorted(source_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            names.update(handle.keys())
    return frozenset(names)


def tensors_for_servers(
    state: Mapping[str, Tensor], names: frozenset[str], dtype: torch.dtype | None
) -> dict[str, Tensor] | None:
    """The checkpoint's tensors from `state`, in `dtype`; None when `state` lacks one of them
    (parameter names that differ from the checkpoint's) or holds a dtype safetensors cannot
    name here."""
    if not names or not names <= state.keys():
        return None
    tensors = {name: state[name].detach() for name in sorted(names)}
    if dtype is not None:
        tensors = {name: tensor.to(dtype) for name, tensor in tensors.items()}
    if any(tensor.dtype not in _SAFETENSORS_DTYPES for tensor in tensors.values()):
        return None
    return tensors


def write_safetensors(
    path: Path, tensors: Mapping[str, Tensor], write_over: Path | None = None
) -> None:
    """One safetensors file: an 8-byte header length, the JSON header, then each tensor's bytes
    written from its own memory (no serialized copy of the whole model in between). With
    `write_over`, that file is moved to `path` and written over in place, keeping its pages."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, tensor in tensors.items():
        size = tensor.numel() * tensor.element_size()
        header[name] = {
            "dtype": _SAFETENSORS_DTYPES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    # The format pads the header with spaces so the data starts 8-byte aligned.
    encoded += b" " * (-len(encoded) % 8)
    contiguous = [tensor.detach().cpu().contiguous() for tensor in tensors.values()]
    buffers = [struct.pack("<Q", len(encoded)), encoded]
    buffers += [memoryview(t.reshape(-1).view(torch.uint8).numpy()) for t in contiguous]
    if write_over is None:
        with path.open("wb") as handle:
            write_all(handle.fileno(), buffers)
        return
    os.replace(write_over, path)
    with path.open("r+b") as handle:
        write_all(handle.fileno(), buffers)
        handle.truncate()


def write_all(fd: int, buffers: list[bytes | memoryview]) -> None:
    """Write `buffers` to `fd` in as few system calls as the kernel allows. One write per
    tensor hands the GIL back and forth some 200 times for a model, and when the executor's
    loop is busy each handover can wait out Python's 5 ms switch interval, which made in-run
    exports several times slower than the write itself (docs/benchmarks.md)."""
    views = [memoryview(buffer).cast("B") for buffer in buffers]
    while views:
        written = os.writev(fd, views[:_IOV_MAX])
        while views and written >= len(views[0]):
            written -= len(views[0])
            views.pop(0)
        if written:
            views[0] = views[0][written:]


def _write_model_dir(
    model: PreTrainedModel,
    source_dir: Path,
    target: Path,
    state_dict: dict[str, Tensor] | None,
    dtype: torch.dtype | None,
    spare: Path | None,
) -> None:
    state = state_dict if state_dict is not None else model.state_dict()
    tensors = tensors_for_servers(state, checkpoint_tensor_names(source_dir), dtype)
    if tensors is None:
        # Transformers 5 always writes safetensors; save_original_format keeps the
        # checkpoint's own tensor names, which is what vLLM's loader expects.
        model.save_pretrained(target, save_original_format=True, state_dict=state_dict)
        return
    write_safetensors(target / WEIGHTS_FILE, tensors, write_over=spare)
    # As save_pretrained does, the config names the dtype of the weights written ("auto"
    # servers load that one).
    config = copy.deepcopy(model.config)
    config.dtype = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
    config.save_pretrained(target)
    if model.can_generate():
        model.generation_config.save_pretrained(target)


def export_weights(
    model: PreTrainedModel,
    source_dir: Path,
    weights_dir: Path,
    version: int,
    keep: int,
    state_dict: dict[str, Tensor] | None = None,
    dtype: torch.dtype | str | None = None,
) -> Path:
    """Write `weights_dir/v{version}/` atomically, keep the newest `keep` versions, and return
    the new directory. `state_dict` (full tensors) replaces the model's own, for a model whose
    parameters are sharded across ranks; `dtype` is the servers' (a torch dtype or vLLM's --dtype
    name; None keeps the trainer's)."""
    if isinstance(dtype, str):
        dtype = export_dtype(dtype)
    # A "Writing model shards" bar per weight update would scribble over the dashboard.
    hf_logging.disable_progress_bar()
    final = version_dir(weights_dir, version)
    try:
        # An existing version (a re-export after resume) is replaced.
        with atomic_dir(final) as tmp:
            spare = next(iter(spare_files(weights_dir)), None)
            _write_model_dir(model, Path(source_dir), tmp, state_dict, dtype, spare)
            copy_tokenizer_files(source_dir, tmp)
        prune_versions(weights_dir, keep, version)
    except (OSError, SafetensorError) as exc:
        raise WeightsExportError(
            f"cannot export the weights for the servers to '{final}': {exc}\n"
            "  the checkpoints written before are intact: fix the directory and continue with "
            "resume=true"
        ) from exc
    return final
