"""Which CUDA devices each server gets (`server.count` servers × `tensor_parallel_size` devices,
taken in order from the visible devices), and how CPU servers and a CPU trainer share the cores.
"""

from __future__ import annotations

import os

from sdp_cli.errors import SdpError


class DeviceAllocationError(SdpError):
    """Not enough CUDA devices for the requested servers."""


def visible_cuda_devices() -> list[str]:
    """Device names a child may be given in CUDA_VISIBLE_DEVICES: the parent's own list when it
    has one (indices or GPU UUIDs), else 0..n-1 for the devices torch sees."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [name.strip() for name in listed.split(",") if name.strip()]
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except ImportError:
        return []


def split_devices(count: int, tensor_parallel_size: int, devices: list[str]) -> list[list[str]]:
    """Disjoint groups of `tensor_parallel_size` devices, one per server, in device order."""
    if count < 1 or tensor_parallel_size < 1:
        raise DeviceAllocationError(
            f"server.count ({count}) and server.tensor_parallel_size ({tensor_parallel_size}) "
            "must be at least 1"
        )
    needed = count * tensor_parallel_size
    if needed > len(devices):
        shown = ",".join(devices) if devices else "none"
        raise DeviceAllocationError(
            f"server.count={count} × server.tensor_parallel_size={tensor_parallel_size} needs "
            f"{needed} CUDA devices, but {len(devices)} are visible ({shown}).\n"
            "  fix: lower server.count or server.tensor_parallel_size, or set "
            "CUDA_VISIBLE_DEVICES to more devices"
        )
    return [
        devices[i * tensor_parallel_size : (i + 1) * tensor_parallel_size] for i in range(count)
    ]


def split_cpu_cores(cores: list[int]) -> tuple[list[int], list[int]] | None:
    """(server cores, trainer cores) for CPU servers and a CPU trainer that run at the same
    time on one machine: the trainer gets the last core, the servers the others, so neither
    preempts the other. None with fewer than 2 cores.

    At η ≥ 1 training overlaps generation, and disjoint cores keep them from preempting each
    other; at η = 0 the two take turns, so a split only idles cores and `sdp train` splits only
    when η ≥ 1 (scripts/bench_train.py --placements split,os; figures in docs/benchmarks.md)."""
    ordered = sorted(cores)
    if len(ordered) < 2:
        return None
    return ordered[:-1], ordered[-1:]
