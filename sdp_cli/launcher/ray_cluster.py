"""Connecting to Ray for one run, and the placement group of its servers.

`ray.address=local` starts a private Ray instance (one or more logical nodes on this machine,
each with a custom resource `node<i>: 1`) that `close()` stops again; `auto` or `HOST:PORT`
joins an existing cluster, which `close()` only disconnects from.
"""

from __future__ import annotations

import contextlib
import math
import signal
import threading
from collections.abc import Iterator
from typing import Any

from sdp_cli.config.server_settings import Device, RayConfig, RayPlacement, ServerConfig
from sdp_cli.config.validate import RAY_INSTALL_HINT
from sdp_cli.errors import MissingDependencyError, SdpError
from sdp_cli.launcher.command import server_device

# Ray's strategy names for `ray.placement`.
_STRATEGIES = {
    RayPlacement.spread: "SPREAD",
    RayPlacement.pack: "PACK",
    RayPlacement.strict_spread: "STRICT_SPREAD",
    RayPlacement.strict_pack: "STRICT_PACK",
}
# Every object of the run lives in this namespace, so two runs on one cluster stay apart.
NAMESPACE = "sdp"


class PlacementError(SdpError):
    """The cluster cannot hold the servers' bundles."""


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise MissingDependencyError(f"ray is not installed.\n  fix: {RAY_INSTALL_HINT}") from None
    return ray


def server_resources(server: ServerConfig, ray_cfg: RayConfig) -> dict[str, float]:
    """What one server's bundle reserves. Ray refuses an empty bundle, so a server that asks
    for nothing still reserves a sliver of a CPU."""
    gpus = ray_cfg.gpus_per_server
    if gpus is None:
        gpus = server.tensor_parallel_size if server_device(server) == Device.cuda else 0
    bundle = {"CPU": float(ray_cfg.cpus_per_server), "GPU": float(gpus)}
    bundle = {name: amount for name, amount in bundle.items() if amount > 0}
    return bundle or {"CPU": 0.01}


@contextlib.contextmanager
def signal_handlers_kept() -> Iterator[None]:
    """Restore the SIGINT and SIGTERM handlers installed on entry (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            # None: installed outside Python, which cannot be put back.
            if handler is not None:
                signal.signal(signum, handler)


class RaySession:
    """Ray for the lifetime of one fleet: connect, place the servers, disconnect."""

    def __init__(self, ray_cfg: RayConfig, server: ServerConfig) -> None:
        self.cfg = ray_cfg
        self.server = server
        self.ray = import_ray()
        self._cluster: Any = None
        self.placement_group: Any = None

    @property
    def started_here(self) -> bool:
        """Whether this session started the Ray instance (and so stops it)."""
        return self._cluster is not None

    def connect(self) -> None:
        # Starting a local node and ray.init each install a SIGTERM handler that exits at
        # once (after draining the node for up to 30 s); keep the handlers sdp's command
        # installed, whose clean stop also stops the servers, the actors and Ray.
        with signal_handlers_kept():
            if self.cfg.address == "local":
                self._cluster = self._start_local_nodes()
                address = self._cluster.address
            else:
                address = self.cfg.address
            # log_to_driver off: the actors' output would interleave with the dashboard; each
            # server logs to its own file.
            self.ray.init(address=address, namespace=NAMESPACE, log_to_driver=False)

    def _start_local_nodes(self) -> Any:
        from ray.cluster_utils import Cluster

        nodes = self.cfg.local_nodes
        cpus = math.ceil(self.server.count * self.cfg.cpus_per_server / nodes)
        # A logical CPU count, not a limit: Ray only books bundles against it.
        per_node = {"num_cpus": max(1, cpus), "include_dashboard": False}
        cluster = Cluster(
            initialize_head=True, head_node_args={**per_node, "resources": {"node0": 1}}
        )
        try:
            for i in range(1, nodes):
                cluster.add_node(**per_node, resources={f"node{i}": 1})
        except BaseException:
            cluster.shutdown()
            raise
        return cluster

    def place_servers(self, timeout_s: float) -> Any:
        """A placement group with one bundle per server, ready to use."""
        from ray.util.placement_group import placement_group

        bundle = server_resources(self.server, self.cfg)
        group = placement_group(
            [dict(bundle) for _ in range(self.server.count)],
            strategy=_STRATEGIES[self.cfg.placement],
        )
        self.placement_group = group
        ready = group.ready()
        done, _ = self.ray.wait([ready], timeout=timeout_s)
        if not done:
            total = self.ray.cluster_resources()
            raise PlacementError(
                f"Ray could not place {self.server.count} server(s) of {bundle} each with "
                f"ray.placement={self.cfg.placement.value} within {timeout_s:.0f} s "
                f"(cluster resources: {total})\n"
                "  fix: lower server.count or ray.cpus_per_server / ray.gpus_per_server, add "
                "nodes, or choose ray.placement=spread / pack"
            )
        return group

    def close(self) -> None:
        """Remove the placement group, disconnect, and stop a Ray instance started here."""
        ray = self.ray
        if self.placement_group is not None and ray.is_initialized():
            from ray.util.placement_group import remove_placement_group

            with contextlib.suppress(Exception):
                remove_placement_group(self.placement_group)
            self.placement_group = None
        ray.shutdown()
        if self._cluster is not None:
            self._cluster.shutdown()
            self._cluster = None
