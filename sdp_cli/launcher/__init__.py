"""vLLM servers: command line, process groups, health, supervision, registry file.

Entry points for the trainer: `start_servers(cfg)` → a running, supervised `ServerFleet`
(`fleet.pool` for the InferenceClient, `fleet.set_current_weights(dir, version)`, `fleet.stop()`);
`attach_servers(registry_path)` → addresses of servers another `sdp launch-servers` runs.
"""

from sdp_cli.launcher.devices import DeviceAllocationError, split_devices, visible_cuda_devices
from sdp_cli.launcher.fleet import ServerFleet, start_servers
from sdp_cli.launcher.registry import (
    RegistryEntry,
    RegistryError,
    attach_servers,
    read_registry,
    write_registry,
)
from sdp_cli.launcher.server import PortTakenError, ServerStartError

__all__ = [
    "DeviceAllocationError",
    "PortTakenError",
    "RegistryEntry",
    "RegistryError",
    "ServerFleet",
    "ServerStartError",
    "attach_servers",
    "read_registry",
    "split_devices",
    "start_servers",
    "visible_cuda_devices",
    "write_registry",
]
