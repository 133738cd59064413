"""The `server.*`, `ray.*` and `weights.*` keys: the vLLM servers, where they run and how weights
reach them.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from sdp_cli.config.setting import setting


class Device(StrEnum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class ServerBackend(StrEnum):
    # Child processes of this machine.
    process = "process"
    # One Ray actor per server, placed on the nodes of a Ray cluster.
    ray = "ray"


class RayPlacement(StrEnum):
    """Placement-group strategy of the servers' bundles (Ray's names, lower case)."""

    spread = "spread"
    pack = "pack"
    strict_spread = "strict_spread"
    strict_pack = "strict_pack"


class WeightsTransport(StrEnum):
    # Servers read the exported directory itself: one machine or a shared filesystem.
    filesystem = "filesystem"
    # Through Ray's object store to each server's node-local disk.
    ray = "ray"


# vLLM's --dtype values.
SERVER_DTYPES = ("auto", "half", "float16", "bfloat16", "float", "float32")


@dataclass
class ServerConfig:
    count: int = setting(1, ge=1, help="vLLM servers to launch")
    registry: str | None = setting(
        None,
        help="attach to the servers this registry file lists (written by `sdp launch-servers`) "
        "instead of launching new ones",
    )
    host: str = setting("127.0.0.1", help="address the servers listen on")
    base_port: int = setting(0, ge=0, le=65535, help="first port to try; 0 picks free ports")
    device: Device = setting(Device.auto, help="where vLLM runs; auto: CUDA if torch sees one")
    dtype: str = setting(
        "float32",
        choices=SERVER_DTYPES,
        help="vLLM --dtype; the trainer exports its weights for the servers in it (auto: in "
        "the trainer's)",
    )
    max_model_len: int = setting(
        256, ge=8, help="vLLM --max-model-len: longest prompt + completion"
    )
    seed: int = setting(0, help="vLLM --seed")
    enforce_eager: bool = setting(True, help="vLLM --enforce-eager (no CUDA graphs)")
    tensor_parallel_size: int = setting(
        1, ge=1, help="CUDA devices per server (vLLM --tensor-parallel-size)"
    )
    gpu_memory_utilization: float = setting(
        0.85, gt=0, le=1, help="vLLM --gpu-memory-utilization (CUDA only)"
    )
    cpu_kvcache_space_gb: int = setting(1, ge=1, help="VLLM_CPU_KVCACHE_SPACE in GiB (CPU only)")
    ready_timeout_s: float = setting(300.0, gt=0, help="seconds a server may take to start")
    request_timeout_s: float = setting(
        120.0, gt=0, help="seconds one request may take before it is retried elsewhere"
    )
    health_interval_s: float = setting(
        2.0, gt=0, help="seconds between the supervisor's health checks"
    )
    max_restarts: int = setting(3, ge=0, help="restarts per server before it is marked dead")
    shutdown_grace_s: float = setting(
        10.0, ge=0, help="seconds between SIGTERM and SIGKILL when stopping a server"
    )
    cpu_cores: list[int] = setting(
        factory=list,
        help="CPU cores of the server processes (vLLM binds its threads to them); "
        "[] leaves placement to the OS",
    )
    gpu_ids: list[int] = setting(
        factory=list,
        help="CUDA devices (indices among the visible ones) of the servers launched here, "
        "server.count × server.tensor_parallel_size of them; [] takes the first visible ones",
    )
    extra_args: list[str] = setting(
        factory=list, help="more vLLM command-line arguments, appended as given"
    )
    backend: ServerBackend = setting(
        ServerBackend.process,
        help="process: child processes of this machine; ray: one Ray actor per server on a "
        "Ray cluster (see ray.*)",
    )


@dataclass
class RayConfig:
    address: str = setting(
        "local",
        help="local: a private Ray instance for the run, stopped with it; auto: the cluster "
        "`ray start` joined on this machine; HOST:PORT: that cluster's head",
    )
    local_nodes: int = setting(
        1,
        ge=1,
        help="logical nodes of a local instance, each with the custom resource node<i>: 1 "
        "(rehearses a multi-node placement on one machine)",
    )
    placement: RayPlacement = setting(
        RayPlacement.spread, help="placement-group strategy of the servers' bundles"
    )
    cpus_per_server: float = setting(1.0, ge=0, help="CPUs each server's bundle reserves")
    gpus_per_server: float | None = setting(
        None,
        ge=0,
        help="GPUs each server's bundle reserves; null: server.tensor_parallel_size on CUDA, "
        "0 on the CPU",
    )
    staging_dir: str | None = setting(
        None,
        help="node-local directory where each server's actor writes staged weights "
        "(weights.transport=ray); null: the node's temporary directory",
    )


@dataclass
class WeightsConfig:
    transport: WeightsTransport = setting(
        WeightsTransport.filesystem,
        help="filesystem: servers read run.dir/weights/v<N>; ray: through Ray's object store "
        "to each server's node-local disk (needs server.backend=ray)",
    )
