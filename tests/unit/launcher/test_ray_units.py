"""The Ray backend's pieces that need no Ray instance: config checks, the registry's node
fields, node-local staging of weights, bundle resources and the dashboard's node column."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from sdp_cli.cli import app
from sdp_cli.commands.train import with_cpu_placement
from sdp_cli.config import load_config
from sdp_cli.config.server_settings import Device, RayConfig, ServerConfig
from sdp_cli.events.event_schema import ServerStateEvent
from sdp_cli.launcher.backends import make_fleet
from sdp_cli.launcher.fleet import ServerFleet
from sdp_cli.launcher.ray_actor import (
    KEEP_STAGED,
    read_dir_files,
    stage_version,
    write_dir_files,
)
from sdp_cli.launcher.ray_cluster import server_resources
from sdp_cli.launcher.ray_fleet import RayServerFleet
from sdp_cli.launcher.registry_file import RegistryEntry, read_registry, write_registry
from sdp_cli.views.dashboard import Dashboard

runner = CliRunner()


def test_ray_backend_without_ray_installed_is_a_config_error_that_says_how_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("sdp_cli.config.validate.ray_installed", lambda: False)
    result = runner.invoke(app, ["config", "show", "server.backend=ray"])
    assert result.exit_code == 2
    assert "server.backend" in result.output
    assert "pip install 'sdp-cli[ray]'" in result.output
    assert "Traceback" not in result.output
    # The process backend does not care.
    assert runner.invoke(app, ["config", "show"]).exit_code == 0


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["weights.transport=ray"], "weights.transport"),
        (["server.backend=ray", "ray.address=somewhere"], "ray.address"),
        (["server.backend=ray", "ray.local_nodes=0"], "ray.local_nodes"),
        (["server.backend=ray", "ray.placement=anywhere"], "ray.placement"),
    ],
)
def test_bad_ray_settings_name_the_key(overrides: list[str], key: str) -> None:
    result = runner.invoke(app, ["config", "show", *overrides])
    assert result.exit_code == 2
    assert key in result.output


def test_ray_addresses_that_are_accepted() -> None:
    for address in ("local", "auto", "10.0.0.5:6379", "head.cluster:6379", "ray://head:10001"):
        cfg = load_config(overrides=["server.backend=ray", f"ray.address={address}"])
        assert cfg.ray.address == address


def test_make_fleet_picks_the_backend(tmp_path: Path) -> None:
    process = load_config(overrides=[])
    assert type(make_fleet(process, tmp_path, tmp_path)) is ServerFleet
    on_ray = load_config(overrides=["server.backend=ray", "weights.transport=ray"])
    fleet = make_fleet(on_ray, tmp_path, tmp_path)
    assert isinstance(fleet, RayServerFleet)
    assert fleet.transport == "ray" and fleet.ray_cfg.address == "local"


def test_cores_are_split_for_a_local_ray_instance_only() -> None:
    base = ["server.device=cpu", "train.device=cpu", "rollout.max_staleness=2"]
    joined = load_config(overrides=[*base, "server.backend=ray", "ray.address=auto"])
    assert with_cpu_placement(joined) is joined


def test_registry_lists_nodes_and_still_reads_files_without_them(tmp_path: Path) -> None:
    path = tmp_path / "servers.json"
    entry = RegistryEntry("http://10.0.0.5:8000", 7, 7, "m", 2, "ready", 0, 1.0, "abc", "/d/v2")
    write_registry(path, [entry])
    assert read_registry(path) == [entry]
    legacy = {k: v for k, v in json.loads(path.read_text())["servers"][0].items()}
    del legacy["node"], legacy["weights_dir"]
    path.write_text(json.dumps({"servers": [legacy]}))
    assert read_registry(path)[0].node is None


def test_staged_versions_are_written_whole_and_old_ones_deleted(tmp_path: Path) -> None:
    exported = tmp_path / "exported"
    (exported / "sub").mkdir(parents=True)
    (exported / "model.safetensors").write_bytes(b"\x00weights")
    (exported / "config.json").write_text("{}")
    (exported / "sub" / "extra.txt").write_text("x")
    files = read_dir_files(exported)
    assert set(files) == {"model.safetensors", "config.json", "sub/extra.txt"}

    root = tmp_path / "node-local"
    for version in range(1, 5):
        staged = stage_version(root, files, version)
        assert staged == root / f"v{version}"
        assert read_dir_files(staged) == files
    kept = sorted(p.name for p in root.iterdir())
    assert kept == [f"v{v}" for v in range(5 - KEEP_STAGED, 5)]
    # Writing a version that is already there keeps it as it is.
    assert write_dir_files({"other": b""}, root / "v4") == root / "v4"
    assert read_dir_files(root / "v4") == files


def test_bundle_resources_per_server() -> None:
    cpu = ServerConfig(device=Device.cpu)
    assert server_resources(cpu, RayConfig()) == {"CPU": 1.0}
    gpu = ServerConfig(device=Device.cuda, tensor_parallel_size=2)
    assert server_resources(gpu, RayConfig(cpus_per_server=2)) == {"CPU": 2.0, "GPU": 2.0}
    assert server_resources(gpu, RayConfig(gpus_per_server=1)) == {"CPU": 1.0, "GPU": 1.0}
    # Ray refuses empty bundles.
    assert server_resources(cpu, RayConfig(cpus_per_server=0)) == {"CPU": 0.01}


def test_dashboard_shows_the_node_of_each_server() -> None:
    console = Console(file=io.StringIO(), record=True, width=160, color_system=None)
    dashboard = Dashboard(console=console, live=False)
    node = "f" * 12 + "0" * 44
    dashboard.emit(
        ServerStateEvent(
            server=0,
            address="http://10.0.0.5:8000",
            state="ready",
            version=3,
            restarts=1,
            node=node,
        )
    )
    console.print(dashboard.render())
    text = console.export_text()
    assert "node" in text and "ffffffffffff" in text and node not in text
    assert "10.0.0.5:8000" in text


def test_dry_run_on_ray_starts_nothing_and_says_where_the_servers_go(tmp_path: Path) -> None:
    result = runner.invoke(
        app, ["train", "--dry-run", "server.backend=ray", "server.count=2", f"run.dir={tmp_path}"]
    )
    assert result.exit_code == 0, result.output
    assert "2 vLLM server(s) as Ray actors (ray.address=local)" in result.output
