"""vLLM servers: command line, process groups, health, supervision, registry file.

Entry points for the trainer: `ServerFleet(cfg.server, model_dir, run_dir).start()` → the pool of
a running, supervised fleet (for the InferenceClient; `fleet.set_current_weights(dir, version)`,
`fleet.stop()`);
`attach_servers(registry_path)` → addresses of servers another `sdp launch-servers` runs.
"""

from sdp_cli.launcher.devices import DeviceAllocationError, split_devices, visible_cuda_devices
from sdp_cli.launcher.fleet import ServerFleet
from sdp_cli.launcher.registry_file import (
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
    "visible_cuda_devices",
    "write_registry",
]
