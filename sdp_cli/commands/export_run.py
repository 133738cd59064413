"""`sdp export RUN_DIR [--step N] [--merge] --out DIR`: a run's trained weights as something a
server loads.

The weights after step N come from `checkpoints/step-N/` or, when no checkpoint of that step
is left, from the weight export `weights/v<N>/` (version N is the weights after N steps).
Without `--step`, the newest of either. With LoRA the result is the adapter (peft's
`save_pretrained` files, which vLLM's `--lora-modules`/`load_lora_adapter` and peft load on the
run's base model); with `--merge`, or for a run that trained every weight, a Hugging Face
model directory (weights, config, tokenizer) that vLLM and `sdp train model.path=DIR` load.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from sdp_cli.common.atomic import atomic_dir
from sdp_cli.config import SdpConfig, load_config
from sdp_cli.errors import ConfigError, SdpError
from sdp_cli.model import ensure_model_dir
from sdp_cli.orchestrator.run_state import list_checkpoints
from sdp_cli.trainer.adapter import CHECKPOINT_ADAPTER_DIR, merged_model, model_with_checkpoint
from sdp_cli.trainer.checkpoint import MODEL_FILE
from sdp_cli.weight_sync.adapter_export import ADAPTER_CONFIG, ADAPTER_WEIGHTS, is_adapter_dir
from sdp_cli.weight_sync.export import copy_tokenizer_files
from sdp_cli.weight_sync.versions import VERSION_DIR, weights_dir_for


@dataclass(frozen=True)
class ExportSource:
    """Where the weights after `step` steps are: an adapter directory, a whole model
    directory, or a one-process checkpoint's model file."""

    step: int
    path: Path
    kind: str  # "adapter", "model_dir" or "checkpoint"


def run_config(run_dir: Path) -> SdpConfig:
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise SdpError(f"'{run_dir}' is not a run directory: it has no config.yaml")
    return load_config(str(path))


def checkpoint_source(step: int, path: Path) -> ExportSource | None:
    if (path / CHECKPOINT_ADAPTER_DIR / ADAPTER_WEIGHTS).is_file():
        return ExportSource(step, path / CHECKPOINT_ADAPTER_DIR, "adapter")
    if (path / MODEL_FILE).is_file():
        return ExportSource(step, path / MODEL_FILE, "checkpoint")
    return None


def weights_sources(weights_dir: Path) -> dict[int, ExportSource]:
    """The complete weight exports kept in `weights_dir`, by version."""
    found: dict[int, ExportSource] = {}
    if not weights_dir.is_dir():
        return found
    for item in weights_dir.iterdir():
        match = VERSION_DIR.match(item.name)
        if not match or match.group(2) or not item.is_dir():
            continue
        kind = "adapter" if is_adapter_dir(item) else "model_dir"
        found[int(match.group(1))] = ExportSource(int(match.group(1)), item, kind)
    return found


def find_source(run_dir: Path, cfg: SdpConfig, step: int | None) -> ExportSource:
    """The weights after `step` steps (None: the most steps there are), a checkpoint first."""
    sources = weights_sources(weights_dir_for(cfg.train.weights_dir, run_dir))
    for number, path in list_checkpoints(run_dir):
        source = checkpoint_source(number, path)
        if source is not None:
            sources[number] = source
    if not sources:
        raise SdpError(
            f"'{run_dir}' holds no checkpoint a one-process trainer wrote and no weight export "
            "(a run with train.weights_dir=memory deletes its exports when it ends)"
        )
    wanted = max(sources) if step is None else step
    if wanted not in sources:
        raise ConfigError(
            "--step",
            f"no checkpoint or weight export of step {wanted} in '{run_dir}'",
            f"pick one of {sorted(sources)}",
        )
    return sources[wanted]


def export_run(
    run_dir: Path, out: Path, *, step: int | None = None, merge: bool = False
) -> tuple[ExportSource, str]:
    """Write the export into `out` (atomically; an existing non-empty `out` is refused).
    Returns where it came from and what was written ("adapter" or "model")."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError("--out", f"'{out}' exists and is not empty", "name a new directory")
    cfg = run_config(run_dir)
    source = find_source(run_dir, cfg, step)
    if source.kind == "adapter" and not merge:
        with atomic_dir(out) as tmp:
            for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
                shutil.copy2(source.path / name, tmp / name)
        return source, "adapter"
    if source.kind == "model_dir":
        with atomic_dir(out) as tmp:
            shutil.copytree(source.path, tmp, dirs_exist_ok=True)
        return source, "model"
    base_dir = ensure_model_dir(cfg.model)
    if source.kind == "adapter":
        model = merged_model(base_dir, source.path)
    else:
        model = model_with_checkpoint(base_dir, source.path)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        copy_tokenizer_files(base_dir, tmp)
    return source, "model"


def export_command(
    run_dir: Path, out: Path, step: int | None, merge: bool, console: Console | None = None
) -> None:
    console = console or Console()
    source, what = export_run(run_dir, out, step=step, merge=merge)
    described = (
        "the LoRA adapter (load it on the run's base model)"
        if what == "adapter"
        else "a Hugging Face model directory (vLLM --model DIR, sdp train model.path=DIR)"
    )
    console.print(
        f"exported step {source.step} from {source.path} to {out}: {described}", highlight=False
    )
