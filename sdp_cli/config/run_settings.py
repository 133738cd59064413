"""The `run.*` keys: the run's name, directory, seed and CPU split."""

from __future__ import annotations

from dataclasses import dataclass

from sdp_cli.config.setting import setting


@dataclass
class RunConfig:
    name: str = setting("default", help="run name; names the run directory")
    dir: str = setting(
        # Interpolated so that `run.name=foo` moves the directory too.
        "runs/${run.name}",
        help="run directory: config.yaml, events.jsonl, servers.json, weights/, checkpoints/",
    )
    seed: int = setting(0, help="seed of the trainer")
    overwrite: bool = setting(
        False, help="start afresh in a run.dir that already holds a run (deletes its checkpoints)"
    )
    split_cpus: bool = setting(
        True,
        help="with launched CPU servers, a CPU trainer and η >= 1: the trainer gets the last "
        "core and the servers the others (unless server.cpu_cores / train.cpu_cores are set)",
    )
