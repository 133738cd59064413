"""The weight exports on disk: `weights_dir/v{N}/`, where train.weights_dir puts them, which
versions are kept, and the weight files of pruned versions kept for later exports to write over.
No torch here: the training loop and preflight need the layout, not the export."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import uuid
from pathlib import Path

from sdp_cli.errors import SdpError

# Weight files kept for exports to write over (weight_sync/export.py, reserve_export_files).
SPARE_DIR = ".spare"
# The single file the direct export writes (vLLM reads every *.safetensors in the directory).
WEIGHTS_FILE = "model.safetensors"
# A LoRA export (train.lora.rank > 0): the adapter alone, as peft's save_pretrained writes it.
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
# A complete version, or (group 2) the leftover of a writer killed half-way (common/atomic.py).
VERSION_DIR = re.compile(r"^v(\d+)((?:\.tmp|\.old)-\d+)?$")


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


def is_adapter_dir(path: str | Path) -> bool:
    """Whether a weights directory holds a LoRA adapter rather than a whole model."""
    return (Path(path) / ADAPTER_CONFIG).is_file()


def version_dir(weights_dir: Path, version: int) -> Path:
    return weights_dir / f"v{version}"


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
        match = VERSION_DIR.match(item.name)
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
        _keep_as_spare(path / WEIGHTS_FILE, weights_dir, spare_limit(keep))
        shutil.rmtree(path, ignore_errors=True)
    return doomed


def spare_limit(keep: int) -> int:
    """Weight files an export directory needs before the first prune: the kept versions and
    the one being written."""
    return max(keep, MIN_KEPT_VERSIONS) + 1


def spare_files(weights_dir: Path) -> list[Path]:
    """Weight files of pruned versions (or reserved), for later exports to write over."""
    return sorted((weights_dir / SPARE_DIR).glob("*.safetensors"))


def _keep_as_spare(weight_file: Path, weights_dir: Path, limit: int) -> None:
    if not weight_file.is_file() or len(spare_files(weights_dir)) >= limit:
        return
    spares = weights_dir / SPARE_DIR
    spares.mkdir(exist_ok=True)
    os.replace(weight_file, spares / f"{uuid.uuid4().hex}.safetensors")
