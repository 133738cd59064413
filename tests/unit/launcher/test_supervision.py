"""The supervisor with fake server processes, for faults that are hard to cause in vLLM on
purpose: a hung server, one that cannot start again, a port taken before the server binds, a
failed weight reload. Real vLLM restarts are in tests/integration/test_launcher_vllm.py.

Run as a script, this file *is* the fake server: a small HTTP server that answers the endpoints
the launcher uses and records what it was asked in a state directory.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from sdp_cli.commands.signals import stop_on_signals
from sdp_cli.config import load_config
from sdp_cli.events.event_log import EventLog, read_events
from sdp_cli.events.event_schema import ServerStateEvent
from sdp_cli.inference import Completion, InferenceClient, SamplingParams, ServerPool, ServerState
from sdp_cli.inference.client_errors import NoServerAvailableError, PoisonRequestError
from sdp_cli.launcher import ServerFleet, ServerStartError, read_registry
from sdp_cli.launcher.process import LaunchSpec, LocalProcessBackend, ServerProcess, group_alive
from sdp_cli.weight_sync.disk import DiskTransport

# ---- the fake server (runs in its own process) -------------------------------------------


def serve_fake(port: int, index: int, state_dir: Path) -> None:
    pid = os.getpid()
    if (state_dir / f"fail-start-{index}").exists():
        print((state_dir / f"fail-start-{index}").read_text(), flush=True)
        sys.exit(1)
    # A server that takes a while to come up, as vLLM does (tens of seconds).
    slow_start = state_dir / "slow-start"
    if slow_start.exists():
        time.sleep(float(slow_start.read_text()))
    bind_fail = state_dir / f"bind-fail-once-{index}"
    if bind_fail.exists():
        bind_fail.unlink()
        print("OSError: [Errno 98] Address already in use", flush=True)
        sys.exit(1)
    calls = state_dir / f"calls-{index}.jsonl"
    version = {"name": "default"}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            return None

        def reply(self, payload: object, code: int = 200) -> None:
            data = json.dumps(payload).encode()
            self.send_response(code)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def record(self, body: object) -> None:
            with calls.open("a") as handle:
                handle.write(json.dumps({"pid": pid, "path": self.path, "body": body}) + "\n")

        def do_GET(self) -> None:
            if self.path == "/health":
                while (state_dir / f"hang-{pid}").exists():
                    time.sleep(0.1)
                self.reply({})
            elif self.path == "/weight_info":
                self.reply({"weight_version": version["name"]})
            else:
                self.reply({}, 404)

        def do_POST(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            body = json.loads(self.rfile.read(length)) if length else {}
            self.record(body)
            if (
                self.path.startswith("/collective_rpc")
                and (state_dir / f"fail-reload-{pid}").exists()
            ):
                self.reply({"error": "reload failed"}, 500)
            elif self.path.startswith("/update_weight_version"):
                version["name"] = body["new_version"]
                self.reply({"success": True})
            elif self.path.startswith("/inference/v1/generate"):
                die_if_poisoned(body["token_ids"], state_dir)
                n = body["sampling_params"]["max_tokens"]
                self.reply(
                    {
                        "choices": [
                            {
                                "finish_reason": "length",
                                "token_ids": [4] * n,
                                "logprobs": {"content": [{"logprob": -1.0}] * n},
                                "weight_versions": [
                                    {"version": version["name"], "start": 0, "end": n}
                                ],
                            }
                        ]
                    }
                )
            else:
                self.reply({"results": [None]})

    print(f"fake server {index} pid {pid} on port {port}", flush=True)
    ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()


def die_if_poisoned(token_ids: list[int], state_dir: Path) -> None:
    """Die as vLLM's engine does on a fatal error: an exception line in the log, then the
    process gone without an answer. `poison-token` names a token id that kills the server;
    `crash-on-generate` makes every generation request kill it."""
    poison = state_dir / "poison-token"
    poisoned = poison.exists() and int(poison.read_text()) in token_ids
    if poisoned or (state_dir / "crash-on-generate").exists():
        print("RuntimeError: CPU Generator does not use offset", flush=True)
        os._exit(1)


def run_fake_fleet(state_dir: Path, model_dir: Path, linger_s: float) -> None:
    """A program that uses the launcher as a command would: with the commands' signal handling,
    start a fleet, write the registry, then run for `linger_s` seconds (or until a signal)
    without stopping it explicitly (the fleet's atexit hook does)."""
    cfg = load_config(overrides=["server.count=2", "server.shutdown_grace_s=2"])
    fleet = ServerFleet(
        cfg.server, model_dir, state_dir / "run", backend=FakeServerBackend(state_dir)
    )
    with stop_on_signals():
        fleet.start()
        (state_dir / "started").touch()
        time.sleep(linger_s)


# ---- tests --------------------------------------------------------------------------------


class FakeServerBackend(LocalProcessBackend):
    """Spawns the fake server instead of vLLM, through the same process-group machinery."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir

    def start(self, spec: LaunchSpec) -> ServerProcess:
        command = [
            sys.executable,
            __file__,
            "--port",
            str(spec.port),
            "--index",
            str(spec.index),
            "--state-dir",
            str(self.state_dir),
        ]
        fake = LaunchSpec(spec.index, command, dict(os.environ), spec.log_path, spec.port)
        return super().start(fake)


def calls(state_dir: Path, index: int, pid: int) -> list[dict]:
    path = state_dir / f"calls-{index}.jsonl"
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines()]
    return [r for r in records if r["pid"] == pid]


def wait_for(condition: Callable[[], bool], timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.05)


FleetFactory = Callable[..., ServerFleet]


def server_states(log: Path) -> list[ServerStateEvent]:
    return [e for e in read_events(log) if isinstance(e, ServerStateEvent)]


@pytest.fixture
def fake_fleet(tmp_path: Path, tiny_model_dir: Path) -> Iterator[FleetFactory]:
    fleets: list[ServerFleet] = []
    logs: list[EventLog] = []

    def make(count: int = 2, max_restarts: int = 2) -> ServerFleet:
        cfg = load_config(
            overrides=[
                f"server.count={count}",
                f"server.max_restarts={max_restarts}",
                "server.health_interval_s=0.1",
                "server.ready_timeout_s=20",
                "server.shutdown_grace_s=2",
            ]
        )
        events = EventLog(tmp_path / "run" / "events.jsonl")
        fleet = ServerFleet(
            cfg.server,
            tiny_model_dir,
            tmp_path / "run",
            backend=FakeServerBackend(tmp_path),
            events=events,
            restart_backoff_s=0.05,
            hang_after_s=1.0,
        )
        fleets.append(fleet)
        logs.append(events)
        return fleet

    yield make
    for fleet in fleets:
        fleet.stop()
    for events in logs:
        events.close()


def test_an_exited_server_is_restarted_with_the_current_weights_and_version(
    fake_fleet: FleetFactory, tmp_path: Path
) -> None:
    fleet = fake_fleet()
    fleet.start()
    weights = tmp_path / "weights" / "v3"
    fleet.set_current_weights(weights, 3)
    old = fleet.process(0)
    os.kill(old.pid, signal.SIGKILL)

    wait_for(lambda: fleet.pool.status(0).restarts == 1 and fleet.pool.status(0).state == "ready")
    new = fleet.process(0)
    assert new.pid != old.pid
    asked = [(c["path"], c["body"]) for c in calls(tmp_path, 0, new.pid)]
    assert (
        "/collective_rpc",
        {"method": "reload_weights", "kwargs": {"weights_path": str(weights)}},
    ) in asked
    assert ("/update_weight_version", {"new_version": "3"}) in asked
    assert fleet.pool.status(0).version == 3
    # The other server was left alone.
    assert fleet.pool.status(1).restarts == 0 and fleet.process(1).pid != new.pid

    # The registry is rewritten by the pool's listener just after the pool changes.
    wait_for(lambda: read_registry(fleet.registry_path)[0].state == "ready")
    registry = read_registry(fleet.registry_path)
    assert registry[0].pid == new.pid and registry[0].restarts == 1
    log = tmp_path / "run" / "events.jsonl"
    restarting = [e for e in server_states(log) if e.state == "restarting"]
    assert restarting and "exited" in (restarting[0].reason or "")

    # What the dashboard's servers panel shows: server 0 back, ready, at v3, one restart. The
    # event, like the registry, is written by the pool's listener just after the pool changes.
    def last_of_server_0() -> tuple[str, int | None, int, str | None]:
        last = [e for e in server_states(log) if e.server == 0][-1]
        return (last.state, last.version, last.restarts, last.node)

    wait_for(lambda: last_of_server_0() == ("ready", 3, 1, None))


def test_a_hung_server_is_killed_and_restarted(fake_fleet: FleetFactory, tmp_path: Path) -> None:
    fleet = fake_fleet(count=1)
    fleet.start()
    old = fleet.process(0)
    (tmp_path / f"hang-{old.pid}").touch()

    wait_for(lambda: fleet.pool.status(0).restarts == 1 and fleet.pool.status(0).state == "ready")
    assert fleet.process(0).pid != old.pid
    assert not group_alive(old.pgid)
    reasons = [e.reason or "" for e in server_states(tmp_path / "run" / "events.jsonl")]
    assert any("no answer on /health" in r for r in reasons)


def test_a_server_that_cannot_come_back_is_dead_after_max_restarts(
    fake_fleet: FleetFactory, tmp_path: Path
) -> None:
    fleet = fake_fleet(count=2, max_restarts=2)
    fleet.start()
    (tmp_path / "fail-start-0").write_text("boom: cannot start")
    os.kill(fleet.process(0).pid, signal.SIGKILL)

    wait_for(lambda: fleet.pool.status(0).state == ServerState.dead)
    assert fleet.pool.status(0).restarts == 2
    assert fleet.pool.status(1).state == ServerState.ready
    assert not fleet.pool.all_dead()
    wait_for(lambda: read_registry(fleet.registry_path)[0].state == "dead")


def test_a_port_taken_before_the_server_binds_is_retried_on_another(
    fake_fleet: FleetFactory, tmp_path: Path
) -> None:
    (tmp_path / "bind-fail-once-0").touch()
    fleet = fake_fleet(count=1)
    fleet.start()
    assert fleet.pool.status(0).state == ServerState.ready
    assert "Address already in use" in (tmp_path / "run" / "logs" / "server-0.log").read_text()
    assert fleet.pool.status(0).restarts == 0


def test_a_server_failing_a_weight_update_is_restarted_and_synced(
    fake_fleet: FleetFactory, tmp_path: Path
) -> None:
    import asyncio

    fleet = fake_fleet(count=2)
    fleet.start()
    weights = tmp_path / "w5"
    weights.mkdir()
    (weights / "model.safetensors").write_bytes(b"")
    (weights / "config.json").write_text("{}")
    failing = fleet.process(0)
    (tmp_path / f"fail-reload-{failing.pid}").touch()

    async def update() -> dict[str, float]:
        async with InferenceClient(fleet.pool) as client:
            return await DiskTransport(client).load_weights(str(weights), 5)

    timings = asyncio.run(update())
    assert timings["failed"] == 1
    wait_for(lambda: fleet.pool.status(0).state == "ready" and fleet.pool.status(0).restarts == 1)
    synced = [(c["path"], c["body"]) for c in calls(tmp_path, 0, fleet.process(0).pid)]
    assert ("/update_weight_version", {"new_version": "5"}) in synced
    assert [s.version for s in fleet.pool.snapshot()] == [5, 5]


def test_a_server_failing_to_start_stops_the_fleet_and_explains_why(
    fake_fleet: FleetFactory, tmp_path: Path
) -> None:
    (tmp_path / "fail-start-1").write_text(
        "RuntimeError: Unsupported CPU attention configuration: head_dim=16 isa=2"
    )
    fleet = fake_fleet(count=2)
    with pytest.raises(ServerStartError) as info:
        fleet.start()
    message = str(info.value)
    assert "server 1" in message and "exited" in message
    assert "unsupported head size" in message
    assert "Unsupported CPU attention configuration" in message  # from the log's tail
    for index in (0, 1):
        assert not group_alive(fleet.process(index).pgid)


def test_a_missing_model_directory_is_refused_before_anything_starts(tmp_path: Path) -> None:
    cfg = load_config()
    fleet = ServerFleet(cfg.server, tmp_path / "no-model", tmp_path / "run")
    with pytest.raises(ServerStartError, match=r"no config\.json"):
        fleet.start()
    assert len(fleet.pool) == 0


def test_stop_leaves_no_process_and_marks_the_registry_dead(fake_fleet: FleetFactory) -> None:
    fleet = fake_fleet(count=2)
    pool: ServerPool = fleet.start()
    groups = [fleet.process(i).pgid for i in range(2)]
    assert all(group_alive(g) for g in groups)
    fleet.stop()
    assert not any(group_alive(g) for g in groups)
    assert [e.state for e in read_registry(fleet.registry_path)] == ["dead", "dead"]
    assert pool.all_dead()


def start_fake_fleet_program(
    state_dir: Path, model_dir: Path, linger_s: float
) -> subprocess.Popen[bytes]:
    """This file run as a program: `run_fake_fleet` (stderr piped)."""
    command = [sys.executable, __file__, "--state-dir", str(state_dir)]
    command += ["--fleet-of-model", str(model_dir), "--linger", str(linger_s)]
    return subprocess.Popen(command, stderr=subprocess.PIPE)


@pytest.mark.parametrize(
    ("how", "expected_code"),
    [("normal exit", 0), ("SIGTERM", 128 + signal.SIGTERM), ("SIGINT", -signal.SIGINT)],
)
def test_a_program_using_the_launcher_leaves_no_server_behind(
    tmp_path: Path, tiny_model_dir: Path, how: str, expected_code: int
) -> None:
    linger = 1.0 if how == "normal exit" else 60.0
    program = start_fake_fleet_program(tmp_path, tiny_model_dir, linger)
    try:
        wait_for(lambda: (tmp_path / "started").exists() or program.poll() is not None)
        groups = [e.pgid for e in read_registry(tmp_path / "run" / "servers.json")]
        assert len(groups) == 2 and all(group_alive(g) for g in groups)
        if how == "SIGTERM":
            program.send_signal(signal.SIGTERM)
        elif how == "SIGINT":
            program.send_signal(signal.SIGINT)
        _, stderr = program.communicate(timeout=30)
    finally:
        if program.poll() is None:
            program.kill()
    assert program.returncode == expected_code, stderr.decode()[-2000:]
    assert not any(group_alive(g) for g in groups)
    assert {e.state for e in read_registry(tmp_path / "run" / "servers.json")} == {"dead"}


def test_sigterm_during_start_up_exits_cleanly_without_asyncio_noise(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    (tmp_path / "slow-start").write_text("60")
    program = start_fake_fleet_program(tmp_path, tiny_model_dir, 60.0)
    registry = tmp_path / "run" / "servers.json"
    try:
        # Both spawned (an entry has pid 0 until its process exists).
        wait_for(lambda: registry.exists() and all(e.pid for e in read_registry(registry) or [0]))
        groups = [e.pgid for e in read_registry(registry)]
        assert {e.state for e in read_registry(registry)} == {"starting"}
        assert all(group_alive(g) for g in groups)
        program.send_signal(signal.SIGTERM)
        _, stderr = program.communicate(timeout=30)
    finally:
        if program.poll() is None:
            program.kill()
    assert program.returncode == 128 + signal.SIGTERM
    assert stderr.decode() == ""  # no "Task was destroyed but it is pending", no traceback
    assert not (tmp_path / "started").exists()
    assert not any(group_alive(g) for g in groups)
    assert {e.state for e in read_registry(registry)} == {"dead"}


# ---- crash loops and poison requests -------------------------------------------------------

POISON = 9


def generate_all(
    fleet: ServerFleet, prompts: list[list[int]], **client_args: Any
) -> list[Completion | BaseException]:
    async def go() -> list[Completion | BaseException]:
        async with InferenceClient(fleet.pool, backoff_s=0.05, **client_args) as client:
            return await asyncio.gather(
                *(client.generate(p, SamplingParams(seed=1), 4) for p in prompts),
                return_exceptions=True,
            )

    return asyncio.run(asyncio.wait_for(go(), timeout=120))


def test_a_request_that_kills_its_server_twice_is_refused_as_poison_and_the_rest_is_served(
    fake_fleet: FleetFactory, tmp_path: Path
) -> None:
    fleet = fake_fleet(count=1, max_restarts=5)
    fleet.start()
    (tmp_path / "poison-token").write_text(str(POISON))
    prompts = [[1, 4, 5], [1, POISON, 5], [1, 5, 6], [1, 6, 7]]

    answers = generate_all(fleet, prompts)

    assert isinstance(answers[1], PoisonRequestError), answers[1]
    assert "poison" in str(answers[1]) and "died 2 times" in str(answers[1])
    assert all(isinstance(answers[i], Completion) for i in (0, 2, 3)), answers
    # The refusal needs the second death counted, which comes before the restart it causes.
    wait_for(lambda: fleet.pool.status(0).restarts == 2)
    wait_for(lambda: fleet.pool.status(0).state == ServerState.ready)
    assert fleet.pool.status(0).crashes == 2
    restarting = [e for e in server_states(tmp_path / "run" / "events.jsonl") if e.reason]
    assert "CPU Generator does not use offset" in (restarting[0].reason or "")
    # Served after the poison request was refused: the run goes on.
    assert all(isinstance(a, Completion) for a in generate_all(fleet, [[1, 7, 8]]))


def test_a_server_that_dies_on_every_request_ends_with_its_last_error_not_a_bare_all_dead(
    fake_fleet: FleetFactory, tmp_path: Path
) -> None:
    fleet = fake_fleet(count=1, max_restarts=2)
    fleet.start()
    (tmp_path / "crash-on-generate").touch()

    answers = generate_all(fleet, [[1, 4 + i, 5] for i in range(6)])

    assert fleet.pool.status(0).state == ServerState.dead
    assert not any(isinstance(a, Completion) for a in answers)
    given_up = [a for a in answers if isinstance(a, NoServerAvailableError)]
    assert given_up, answers
    message = str(given_up[0])
    assert "given up after 2 restarts" in message
    assert "RuntimeError: CPU Generator does not use offset" in message
    assert str(tmp_path / "run" / "logs" / "server-0.log") in message


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int)
    parser.add_argument("--index", type=int)
    parser.add_argument("--state-dir", type=Path, required=True)
    parser.add_argument("--fleet-of-model", type=Path)
    parser.add_argument("--linger", type=float, default=0.0)
    args = parser.parse_args()
    if args.fleet_of_model:
        run_fake_fleet(args.state_dir, args.fleet_of_model, args.linger)
    else:
        serve_fake(args.port, args.index, args.state_dir)
