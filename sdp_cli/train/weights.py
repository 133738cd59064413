"""Export the trainer's weights as a model directory the inference servers can load.

`run_dir/weights/v{N}/` has the same layout as the original model directory (safetensors,
config, generation config, tokenizer files), so it works both for vLLM's
`reload_weights(weights_path=DIR)` and for a fresh `--model DIR`. It is written atomically
(`common.atomic_dir`), so a reader never sees a half-written version.
"""

from __future__ import annotations

import hashlib
import re
import shutil
from pathlib import Path

from safetensors import SafetensorError
from torch import Tensor
from transformers import PreTrainedModel
from transformers.utils import logging as hf_logging

from sdp_cli.common.atomic import atomic_dir
from sdp_cli.errors import SdpError

# Files of the source model directory that the exported weights replace.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack")
_WEIGHT_INDEX_NAMES = {"model.safetensors.index.json", "pytorch_model.bin.index.json"}
_WRITTEN_BY_SAVE = {"config.json", "generation_config.json"}
# A complete version, or (group 2) the leftover of a writer killed half-way (common/atomic.py).
_VERSION_DIR = re.compile(r"^v(\d+)((?:\.tmp|\.old)-\d+)?$")


class WeightsExportError(SdpError):
    """The weights for the servers could not be written (directory not writable, disk full)."""


# The version the servers hold and the one being exported for them.
MIN_KEPT_VERSIONS = 2


# train.weights_dir: a memory-backed directory, deleted at the end of the run.
MEMORY_WEIGHTS = "memory"
MEMORY_ROOT = Path("/dev/shm")


def weights_dir_for(setting: str, run_dir: Path) -> Path:
    """The directory of the weight exports that train.weights_dir names for a run."""
    if not setting:
        return run_dir / "weights"
    if setting == MEMORY_WEIGHTS:
        # One per run directory, so two runs on a machine never share one.
        digest = hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:12]
        return MEMORY_ROOT / f"sdp-weights-{digest}"
    return Path(setting)


def version_dir(weights_dir: Path, version: int) -> Path:
    return weights_dir / f"v{version}"


def _is_weight_file(name: str) -> bool:
    return name.endswith(_WEIGHT_SUFFIXES) or name in _WEIGHT_INDEX_NAMES


def copy_tokenizer_files(source_dir: Path, target_dir: Path) -> None:
    """Copy everything but weights and configs (tokenizer, chat template, vocab files...)."""
    for item in sorted(source_dir.iterdir()):
        if item.is_file() and not _is_weight_file(item.name) and item.name not in _WRITTEN_BY_SAVE:
            shutil.copy2(item, target_dir / item.name)


def prune_versions(weights_dir: Path, keep: int, current: int) -> list[Path]:
    """Keep `current` and the newest versions before it, `keep` in all but never fewer than two;
    delete older versions, versions newer than `current`, and leftovers of writers killed
    half-way (of other versions). Returns what was deleted.

    Two at least, because the export of v+1 comes before the servers load it: until then v is
    what they hold and what a server restarted meanwhile (one that was killed) must load.
    Versions newer than `current` exist only after a resume: the killed run had exported them
    past its last checkpoint, and the resumed run will write its own. Counting them among the
    newest `keep` would delete the version just written."""
    kept: list[tuple[int, Path]] = []
    doomed: list[Path] = []
    for item in weights_dir.iterdir():
        match = _VERSION_DIR.match(item.name)
        if not match or not item.is_dir():
            continue
        version = int(match.group(1))
        if match.group(2):
            if version != current:
                doomed.append(item)
        elif version > current:
            doomed.append(item)
        else:
            kept.append((version, item))
    kept.sort()
    doomed += [path for _, path in kept[: max(len(kept) - max(keep, MIN_KEPT_VERSIONS), 0)]]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed


def export_weights(
    model: PreTrainedModel,
    source_dir: Path,
    weights_dir: Path,
    version: int,
    keep: int,
    state_dict: dict[str, Tensor] | None = None,
) -> Path:
    """Write `weights_dir/v{version}/` atomically, keep the newest `keep` versions, and return
    the new directory. `state_dict` (full tensors) replaces the model's own, for a model whose
    parameters are sharded across ranks."""
    # A "Writing model shards" bar per weight update would scribble over the dashboard.
    hf_logging.disable_progress_bar()
    final = version_dir(weights_dir, version)
    try:
        # An existing version (a re-export after resume) is replaced.
        with atomic_dir(final) as tmp:
            # Transformers 5 always writes safetensors; save_original_format keeps the
            # checkpoint's own tensor names, which is what vLLM's loader expects.
            model.save_pretrained(tmp, save_original_format=True, state_dict=state_dict)
            copy_tokenizer_files(source_dir, tmp)
        prune_versions(weights_dir, keep, version)
    except (OSError, SafetensorError) as exc:
        raise WeightsExportError(
            f"cannot export the weights for the servers to '{final}': {exc}\n"
            "  the checkpoints written before are intact: fix the directory and continue with "
            "resume=true"
        ) from exc
    return final
