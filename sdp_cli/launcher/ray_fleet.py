"""The supervised fleet with each vLLM server owned by a Ray actor (`server.backend=ray`).

Supervision is `ServerFleet`'s (health checks, restarts with backoff, the current weights and
version loaded before a server serves again); what changes is where a server runs. Each server
is an actor in its own bundle of one placement group; the actor starts vLLM on its node and
reports the node's address and port, which become the server's address in the pool and the
registry. An actor that dies, or whose node dies, reads as an exited process: the supervisor
stops what is left and starts a new actor in the same bundle, which Ray re-places on another
node when the old one is gone and resources allow.

With `weights.transport=ray` no path is shared with the servers: the model directory and each
exported weights version are put into Ray's object store once, and every server's actor writes
them to its node-local disk before vLLM loads them (docs/scale-out.md, "Several machines with Ray").
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from sdp_cli.config.server_settings import RayConfig, ServerConfig, WeightsTransport
from sdp_cli.events.event_log import EventSink
from sdp_cli.inference.pool import ServerState
from sdp_cli.launcher.fleet import PORT_ATTEMPTS, ServerFleet
from sdp_cli.launcher.process import LaunchSpec, ServerProcess
from sdp_cli.launcher.ray_actor import ServerActor, read_dir_files
from sdp_cli.launcher.ray_cluster import RaySession
from sdp_cli.launcher.registry_file import RegistryEntry
from sdp_cli.launcher.server import (
    PortTakenError,
    ServerStartError,
    explain_failure,
    server_address,
)

# How long one question to an actor may take before the supervisor treats it as busy.
ACTOR_CALL_S = 10.0
# Actor methods run on a few threads so a health poll never waits behind a weight transfer.
ACTOR_THREADS = 4
# Versions whose object-store copy the driver keeps referenced (a restart may need the last).
KEEP_REFS = 2


class WeightsStagingError(OSError):
    """Copying weights to a server's node failed; the client restarts that server."""


@dataclass
class RayServerProcess(ServerProcess):
    """A vLLM server as its actor reports it; `poll` asks the actor."""

    actor: Any = None
    node_id: str = ""
    address: str = ""

    def poll(self) -> int | None:
        import ray
        from ray.exceptions import GetTimeoutError, RayError

        try:
            return ray.get(self.actor.poll.remote(), timeout=ACTOR_CALL_S)
        except GetTimeoutError:
            return None
        except RayError:
            # The actor, or its whole node, is gone, and the server with it.
            return -1

    def remember_shared_memory(self) -> None:
        """The actor records it, on the server's node; its stop unlinks it."""
        import ray
        from ray.exceptions import RayError

        with contextlib.suppress(RayError):
            ray.get(self.actor.remember_shared_memory.remote(), timeout=ACTOR_CALL_S)


class RayProcessBackend:
    """`ProcessBackend` over Ray: `start` makes an actor in the server's bundle and has it
    start vLLM there; `stop` stops the server, deletes the actor's node-local files and kills
    the actor."""

    def __init__(
        self,
        session: RaySession,
        server: ServerConfig,
        model_dir: Path,
        model_ref: Any = None,
    ) -> None:
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self.session = session
        self.server = server
        self.model_dir = model_dir
        self.model_ref = model_ref
        self._strategy = PlacementGroupSchedulingStrategy
        self._actor_class = ray.remote(ServerActor)
        self._resources = {
            name: amount for name, amount in (session.placement_group.bundle_specs[0] or {}).items()
        }
        self.actors: set[Any] = set()

    def start(self, spec: LaunchSpec) -> RayServerProcess:
        import ray
        from ray.exceptions import RayError

        actor = self._actor_class.options(
            num_cpus=self._resources.get("CPU", 0),
            num_gpus=self._resources.get("GPU", 0),
            scheduling_strategy=self._strategy(
                placement_group=self.session.placement_group,
                placement_group_bundle_index=spec.index,
            ),
            max_concurrency=ACTOR_THREADS,
            max_restarts=0,
        ).remote(spec.index, self.session.cfg.staging_dir)
        self.actors.add(actor)
        try:
            # Waits for the bundle too: after a node died, until Ray has re-placed it.
            started = ray.get(
                actor.start.remote(
                    self.server, str(self.model_dir), str(spec.log_path), self.model_ref, spec.port
                ),
                timeout=self.server.ready_timeout_s,
            )
        except RayError as exc:
            self._kill(actor)
            raise ServerStartError(
                f"the Ray actor of server {spec.index} could not start it: {exc}".splitlines()[0]
            ) from None
        return RayServerProcess(
            spec=spec,
            pid=int(started["pid"]),
            pgid=int(started["pgid"]),
            actor=actor,
            node_id=str(started["node_id"]),
            address=server_address(str(started["host"]), int(started["port"])),
        )

    def stop(self, proc: ServerProcess, grace_s: float) -> None:
        assert isinstance(proc, RayServerProcess)
        import ray
        from ray.exceptions import RayError

        with contextlib.suppress(RayError):
            ray.get(proc.actor.shutdown.remote(grace_s), timeout=grace_s + ACTOR_CALL_S)
        self._kill(proc.actor)

    def kill_all(self) -> None:
        for actor in list(self.actors):
            self._kill(actor)

    def _kill(self, actor: Any) -> None:
        import ray

        with contextlib.suppress(Exception):
            ray.kill(actor, no_restart=True)
        self.actors.discard(actor)


class RayWeightsStager:
    """Puts each exported weights version into the object store once and has the server's
    actor write it to its node; the pool calls it before every weight load."""

    def __init__(self, fleet: RayServerFleet) -> None:
        self.fleet = fleet
        self._refs: dict[int, Any] = {}
        self._lock = threading.Lock()

    def _ref(self, weights_dir: str, version: int) -> Any:
        import ray

        with self._lock:
            if version not in self._refs:
                self._refs[version] = ray.put(read_dir_files(Path(weights_dir)))
                for old in sorted(self._refs)[:-KEEP_REFS]:
                    del self._refs[old]
            return self._refs[version]

    async def __call__(self, index: int, weights_dir: str, version: int) -> str:
        import ray
        from ray.exceptions import RayError

        proc = self.fleet.process(index)
        assert isinstance(proc, RayServerProcess)
        try:
            ref = await asyncio.to_thread(self._ref, weights_dir, version)
            path = await asyncio.to_thread(
                ray.get,
                proc.actor.stage_weights.remote(ref, version),
                timeout=self.fleet.server.request_timeout_s,
            )
        except RayError as exc:
            raise WeightsStagingError(
                f"staging weights v{version} on server {index}'s node failed: {exc}"
            ) from None
        self.fleet.loaded_from[index] = str(path)
        return str(path)


class RayServerFleet(ServerFleet):
    """`ServerFleet` whose servers are Ray actors placed by one placement group."""

    def __init__(
        self,
        server: ServerConfig,
        ray_cfg: RayConfig,
        model_dir: Path,
        run_dir: Path,
        *,
        transport: WeightsTransport = WeightsTransport.filesystem,
        registry_path: Path | None = None,
        events: EventSink | None = None,
        observe_servers: bool = False,
    ) -> None:
        super().__init__(
            server,
            model_dir,
            run_dir,
            registry_path=registry_path,
            events=events,
            observe_servers=observe_servers,
        )
        self.ray_cfg = ray_cfg
        self.transport = transport
        self.session: RaySession | None = None
        # The node-local directory each server last loaded weights from (transport=ray).
        self.loaded_from: dict[int, str] = {}

    def start(self) -> Any:
        try:
            self._connect()
        except BaseException:
            self._close_session()
            raise
        return super().start()

    def _connect(self) -> None:
        session = RaySession(self.ray_cfg, self.server)
        self.session = session
        session.connect()
        session.place_servers(self.server.ready_timeout_s)
        model_ref = None
        if self.transport == WeightsTransport.ray:
            import ray

            model_ref = ray.put(read_dir_files(self.model_dir))
            self.pool.set_weights_stager(RayWeightsStager(self))
        self.backend = RayProcessBackend(session, self.server, self.model_dir, model_ref)

    def stop(self) -> None:
        try:
            super().stop()
        finally:
            self._close_session()

    def _close_session(self) -> None:
        if self.session is not None:
            with contextlib.suppress(Exception):
                self._kill_leftovers()
            self.session.close()
            self.session = None

    def node_of(self, index: int) -> str | None:
        proc = self._procs.get(index)
        return proc.node_id if isinstance(proc, RayServerProcess) else None

    # ---- starting: the actor picks the port on its node ---------------------------------

    def _device_groups(self) -> list[list[str] | None]:
        # Ray gives each actor its GPUs (CUDA_VISIBLE_DEVICES); vLLM inherits them.
        return [None] * self.server.count

    async def _start_all(self) -> None:
        for index in range(self.server.count):
            # Unknown until the actor reports its node's address.
            self.pool.add(f"http://pending-server-{index}:0", state=ServerState.starting)
        await asyncio.gather(*(self._bring_up(i) for i in range(self.server.count)))

    async def _bring_up(self, index: int) -> None:
        for attempt in range(PORT_ATTEMPTS):
            current = self.pool.status(index).address.rsplit(":", 1)[1]
            proc, log_start = await asyncio.to_thread(self._spawn, index, int(current))
            assert isinstance(proc, RayServerProcess)
            self.pool.set_address(index, proc.address)
            try:
                await self._wait_until_serving(index, proc, log_start)
                await asyncio.to_thread(proc.remember_shared_memory)
                break
            except PortTakenError:
                await asyncio.to_thread(self.backend.stop, proc, 1.0)
                if attempt == PORT_ATTEMPTS - 1:
                    raise
        await self._load_current_weights(index)

    def _failure(
        self, index: int, proc: ServerProcess, log_start: int, what: str
    ) -> ServerStartError:
        if proc.spec.log_path.exists():
            return super()._failure(index, proc, log_start, what)
        # The log is on another machine: ask the actor for its tail.
        tail = "(the server's actor is gone)"
        if isinstance(proc, RayServerProcess):
            import ray

            with contextlib.suppress(Exception):
                tail = ray.get(proc.actor.log_tail.remote(), timeout=ACTOR_CALL_S)
        error = PortTakenError if "Address already in use" in tail else ServerStartError
        return error(
            f"vLLM server {index} at {self.pool.status(index).address} {what} "
            f"({explain_failure(tail)}).\n"
            f"--- end of {proc.spec.log_path} on node {self.node_of(index)} ---\n{tail}"
        )

    # ---- stopping -----------------------------------------------------------------------

    def _kill_leftovers(self) -> None:
        # Process groups live on the actors' nodes; killing the actors is what reaches them.
        if isinstance(self.backend, RayProcessBackend):
            self.backend.kill_all()

    # ---- registry -----------------------------------------------------------------------

    def registry_entries(self) -> list[RegistryEntry]:
        return [
            replace(entry, node=self.node_of(i), weights_dir=self.loaded_from.get(i))
            for i, entry in enumerate(super().registry_entries())
        ]
