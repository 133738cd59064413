"""The Ray actor that owns one vLLM server on its node.

It runs where the placement group put it: it picks a free port on its node's address, starts
`python -m vllm.entrypoints.openai.api_server` there (the same command line and process-group
handling as the process backend, built from this node's own interpreter and environment, so
Ray's CUDA_VISIBLE_DEVICES for the actor reaches vLLM), reports where it listens, and writes
directories it receives through Ray's object store (the model, each weights version) to its
node-local disk. `ray_fleet` wraps the class with `ray.remote`; it runs only inside Ray.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from dataclasses import replace
from pathlib import Path

from sdp_cli.common.atomic import atomic_dir
from sdp_cli.config.server_settings import ServerConfig
from sdp_cli.launcher.command import vllm_command, vllm_env
from sdp_cli.launcher.process import LaunchSpec, LocalProcessBackend, ServerProcess, free_port
from sdp_cli.launcher.server import log_size, log_tail

# A directory as it travels through the object store: relative path -> file contents.
DirFiles = dict[str, bytes]

# Staged weight versions each actor keeps on its node: the one being loaded and the one before,
# which a server may still be reading when the next arrives.
KEEP_STAGED = 2


def read_dir_files(path: Path) -> DirFiles:
    """Every file under `path`, keyed by its path relative to it."""
    return {
        str(file.relative_to(path)): file.read_bytes()
        for file in sorted(path.rglob("*"))
        if file.is_file()
    }


def write_dir_files(files: DirFiles, target: Path) -> Path:
    """Write `files` as directory `target`, which appears whole or not at all; an existing
    `target` (the same version staged before) is kept. Returns `target`."""
    with atomic_dir(target, keep_existing=True) as tmp:
        for relative, data in files.items():
            path = tmp / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
    return target


def staged_versions(root: Path) -> list[int]:
    return sorted(int(p.name[1:]) for p in root.glob("v*") if p.is_dir() and p.name[1:].isdigit())


def stage_version(root: Path, files: DirFiles, version: int) -> Path:
    """Write weights `version` under `root` as `v<version>/` and delete all but the newest
    KEEP_STAGED versions there."""
    target = write_dir_files(files, root / f"v{version}")
    for old in staged_versions(root)[:-KEEP_STAGED]:
        shutil.rmtree(root / f"v{old}", ignore_errors=True)
    return target


class ServerActor:
    """One vLLM server on the node this actor was placed on."""

    def __init__(self, index: int, staging_dir: str | None) -> None:
        import ray

        self.index = index
        # The address other nodes reach this one at: vLLM listens there.
        self.node_ip: str = ray.util.get_node_ip_address()
        self.node_id: str = ray.get_runtime_context().get_node_id()
        base = Path(staging_dir) if staging_dir else Path(tempfile.gettempdir()) / "sdp-ray"
        # Private to this actor: two servers on one node never share (or delete) a copy.
        self.root = base / f"server-{index}-{self.node_id[:12]}-{os.getpid()}"
        self.backend = LocalProcessBackend()
        self.proc: ServerProcess | None = None
        self.log_start = 0

    def where(self) -> dict[str, str]:
        return {"node_id": self.node_id, "node_ip": self.node_ip, "host": socket.gethostname()}

    def start(
        self,
        server: ServerConfig,
        model_dir: str,
        log_path: str,
        model_files: DirFiles | None = None,
        preferred_port: int = 0,
    ) -> dict[str, object]:
        """Start vLLM on this node (without waiting for it). `model_files`, when given, is the
        model directory shipped through the object store: it is written to this node first."""
        if model_files is not None:
            model_dir = str(write_dir_files(model_files, self.root / "model"))
        port = free_port(self.node_ip, preferred_port)
        here = replace(server, host=self.node_ip)
        spec = LaunchSpec(
            index=self.index,
            command=vllm_command(here, Path(model_dir), port),
            env=vllm_env(here),
            log_path=Path(log_path),
            port=port,
            cpu_cores=list(server.cpu_cores),
        )
        self.log_start = log_size(spec.log_path)
        self.proc = self.backend.start(spec)
        return {
            "pid": self.proc.pid,
            "pgid": self.proc.pgid,
            "host": self.node_ip,
            "port": port,
            "node_id": self.node_id,
            "model_dir": model_dir,
        }

    def remember_shared_memory(self) -> None:
        """Record the server's shared-memory segments while it runs, for its stop to unlink
        even after a crash."""
        if self.proc is not None:
            self.proc.remember_shared_memory()

    def poll(self) -> int | None:
        """The server's exit code, or None while it runs."""
        return self.proc.poll() if self.proc is not None else -1

    def log_tail(self) -> str:
        """The server log since this actor started it (the driver may not see this disk)."""
        if self.proc is None:
            return "(not started)"
        return log_tail(self.proc.spec.log_path, since=self.log_start)

    def stage_weights(self, files: DirFiles, version: int) -> str:
        """Write weights `version` to this node's disk and return the directory; older staged
        versions are deleted."""
        return str(stage_version(self.root, files, version))

    def stop(self, grace_s: float) -> None:
        if self.proc is not None:
            self.backend.stop(self.proc, grace_s)

    def shutdown(self, grace_s: float) -> None:
        """Stop the server and delete everything this actor wrote to its node."""
        self.stop(grace_s)
        shutil.rmtree(self.root, ignore_errors=True)
