"""`sdp train`: wire the run directory, servers, executor, trainer and dashboard together.

`train` is a list of named steps. Order matters for a clean stop: whatever was started is
registered on one ExitStack and stopped in reverse order, so Ctrl-C or SIGTERM anywhere (turned
into exceptions by `commands.signals`) leaves no server process and the last checkpoint intact.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

from rich.console import Console
from transformers import PreTrainedTokenizerBase

from sdp_cli.commands.dry_run import print_dry_run
from sdp_cli.commands.preflight import RUN_FILES, check_run_dir, holds_run, preflight
from sdp_cli.config import SdpConfig, config_to_yaml
from sdp_cli.config.run_plan import RunPlan, plan_run
from sdp_cli.config.server_settings import Device
from sdp_cli.config.train_settings import UpdateMode
from sdp_cli.episodes.messages import MessageFormat
from sdp_cli.episodes.multiturn import EpisodeLimits, MultiTurnWorkflow
from sdp_cli.errors import ConfigError
from sdp_cli.events.event_log import EventLog, EventSink
from sdp_cli.events.event_schema import RunFinishedEvent, ServerStateEvent
from sdp_cli.events.metrics import MetricsSink, open_writers
from sdp_cli.gateway.agent_workflow import AgentWorkflow
from sdp_cli.inference.client import InferenceClient
from sdp_cli.inference.pool import ServerPool, ServerState, ServerStatus
from sdp_cli.launcher.backends import make_fleet
from sdp_cli.launcher.command import server_device, servers_may_be_remote
from sdp_cli.launcher.devices import split_cpu_cores
from sdp_cli.launcher.process import free_port
from sdp_cli.launcher.registry_file import attach_servers
from sdp_cli.model import ensure_model_dir
from sdp_cli.orchestrator.evaluate import Evaluator
from sdp_cli.orchestrator.loop import LoopResult, TrainingLoop
from sdp_cli.orchestrator.run_started import run_started_event
from sdp_cli.orchestrator.run_state import TrainState, latest_checkpoint
from sdp_cli.orchestrator.sample_log import SAMPLES_FILE, SampleLog
from sdp_cli.rollout.executor import RolloutExecutor
from sdp_cli.rollout.positions import DataPositions, PositionState
from sdp_cli.rollout.rlvr import RLVRWorkflow
from sdp_cli.tasks import (
    CurriculumState,
    curriculum_of,
    decode_completion,
    get_task,
    load_tokenizer,
)
from sdp_cli.tasks.base import Task
from sdp_cli.tasks.chat import PromptFormat
from sdp_cli.tasks.environment import EnvTask
from sdp_cli.trainer.actor import Actor, torch_device
from sdp_cli.trainer.checkpoint import load_checkpoint
from sdp_cli.trainer.distributed import total_ranks
from sdp_cli.trainer.fsdp import serve_worker_node, trainer_actor
from sdp_cli.views.dashboard import Dashboard
from sdp_cli.weight_sync.disk import DiskTransport
from sdp_cli.weight_sync.export import export_dtype, reserve_export_files
from sdp_cli.weight_sync.versions import MEMORY_WEIGHTS, weights_dir_for


@dataclass
class TrainSummary:
    run_dir: Path
    result: LoopResult
    resumed_from: int
    # Seconds from run_started to the end: what the dashboard header calls "elapsed".
    elapsed_s: float


def prepare_run_dir(cfg: SdpConfig) -> Path:
    """Create run.dir; refuse to mix a new run into an old one unless asked to."""
    run_dir = Path(cfg.run.dir)
    check_run_dir(cfg)
    if holds_run(run_dir) and not cfg.resume:
        for name in RUN_FILES:
            target = run_dir / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(config_to_yaml(cfg))
    return run_dir


def restore_state(cfg: SdpConfig, run_dir: Path, actor: Actor) -> TrainState:
    if not cfg.resume:
        return TrainState(step=0, version=0, data_position=0)
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None:
        raise ConfigError(
            "resume", f"no checkpoint in '{run_dir}/checkpoints'", "run without resume=true"
        )
    return load_checkpoint(
        checkpoint, actor.model, actor.optimizer, read_tensors=actor.load_tensors
    )


def attached_pool(registry: Path, timeout_s: float) -> ServerPool:
    """Servers started elsewhere (`sdp launch-servers`), supervised by that process."""
    pool = ServerPool()
    for address in attach_servers(registry, timeout_s):
        pool.add(address, state=ServerState.ready)
    return pool


def report_server_states(pool: ServerPool, events: EventSink) -> None:
    """Attached servers have no fleet here to log them: log each one's state now and whenever
    it changes (version after an update, ...), so the dashboard shows them as it shows a fleet."""

    def emit(status: ServerStatus) -> None:
        events.emit(
            ServerStateEvent(
                server=status.index,
                address=status.address,
                state=status.state.value,
                version=status.version,
                restarts=status.restarts,
            )
        )

    pool.subscribe(emit)
    for status in pool.snapshot():
        emit(status)


@contextmanager
def server_pool(
    cfg: SdpConfig, model_dir: Path, run_dir: Path, events: EventSink
) -> Iterator[ServerPool]:
    if cfg.server.registry:
        pool = attached_pool(Path(cfg.server.registry), cfg.server.request_timeout_s)
        report_server_states(pool, events)
        yield pool
        return
    fleet = make_fleet(cfg, model_dir, run_dir, events=events)
    try:
        yield fleet.start()
    finally:
        fleet.stop()


def quiet_library_progress() -> None:
    """Transformers' per-save progress bars would interleave with the dashboard."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def with_cpu_placement(cfg: SdpConfig) -> SdpConfig:
    """`cfg` with the cores of the servers sdp launches and of the trainer filled in by
    run.split_cpus when both run on this machine's CPU at the same time (η ≥ 1; with η = 0 they
    take turns, and the servers do better on every core) and neither was given."""
    if (
        not cfg.run.split_cpus
        # Every trainer rank would inherit the one trainer core.
        or cfg.train.world_size > 1
        or cfg.rollout.max_staleness == 0
        or cfg.server.cpu_cores
        or cfg.train.cpu_cores
        or cfg.server.registry
        # This machine's cores mean nothing on the nodes of a joined Ray cluster.
        or servers_may_be_remote(cfg.server, cfg.ray)
        or server_device(cfg.server) != Device.cpu
        or torch_device(cfg.train.device).type != "cpu"
    ):
        return cfg
    split = split_cpu_cores(sorted(os.sched_getaffinity(0)))
    if split is None:
        return cfg
    servers, trainer = split
    return replace(
        cfg,
        server=replace(cfg.server, cpu_cores=servers),
        train=replace(cfg.train, cpu_cores=trainer),
    )


@contextmanager
def pinned_to(cores: list[int]) -> Iterator[None]:
    """Run this thread, and the threads it starts meanwhile (rollout executor, dashboard), on
    `cores`; the thread's own placement comes back afterwards."""
    if not cores:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cores)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def train_command(cfg: SdpConfig, *, dry_run: bool = False, console: Console | None = None) -> None:
    """`sdp train`: check everything that can be checked before a process starts; then with
    `dry_run` print the resolved config, what was checked and the capacity plan, otherwise run
    and print the closing summary."""
    console = console or Console()
    checked = preflight(cfg)
    if dry_run:
        print_dry_run(with_cpu_placement(cfg), console, checked)
        return
    summary = run_training(cfg, console)
    if summary is not None:
        print_summary(summary, console)


def run_training(cfg: SdpConfig, console: Console | None = None) -> TrainSummary | None:
    """The run on node 0; on another node (train.node_rank > 0) this node's trainer ranks,
    which train as node 0's rank 0 says and return None."""
    cfg = with_rendezvous(with_cpu_placement(cfg))
    if cfg.train.node_rank > 0:
        serve_worker_node(cfg, ensure_model_dir(cfg.model), Path(cfg.run.dir) / "logs")
        return None
    with pinned_to(cfg.train.cpu_cores):
        return train(cfg, console or Console())


def with_rendezvous(cfg: SdpConfig) -> SdpConfig:
    """A free port for the trainer ranks of a one-node run that left train.master_port at 0."""
    if total_ranks(cfg.train) == 1 or cfg.train.master_port:
        return cfg
    port = free_port(cfg.train.master_addr)
    return replace(cfg, train=replace(cfg.train, master_port=port))


@dataclass
class RunInputs:
    """What the steps after `prepare_inputs` share: nothing here runs or holds a process."""

    cfg: SdpConfig
    # What the config implies for the run, resolved once.
    plan: RunPlan
    run_dir: Path
    model_dir: Path
    tokenizer: PreTrainedTokenizerBase
    task: Task
    actor: Actor
    state: TrainState
    # Where the weight exports for the servers go (train.weights_dir).
    weights_dir: Path


def train(cfg: SdpConfig, console: Console) -> TrainSummary:
    quiet_library_progress()
    dashboard = Dashboard(console=console)
    with ExitStack() as stack:
        run = prepare_inputs(cfg, stack)
        if cfg.train.weights_dir == MEMORY_WEIGHTS:
            # Entered before the servers, so it goes after they stop.
            stack.callback(shutil.rmtree, run.weights_dir, ignore_errors=True)
        reserve_export_files(
            run.actor.model,
            run.model_dir,
            run.weights_dir,
            cfg.train.keep_weights,
            export_dtype(cfg.server.dtype),
        )
        events = open_event_log(stack, dashboard, run)
        events.emit(
            run_started_event(
                cfg, run.plan, resumed_from_step=run.state.step, version=run.state.version
            )
        )
        started = time.monotonic()
        console.print(f"run dir {run.run_dir}: starting servers...", highlight=False)
        pool = stack.enter_context(server_pool(cfg, run.model_dir, run.run_dir, events))
        client = inference_client(cfg, run.plan, pool, run.tokenizer)
        positions = restored_positions(run.state)
        workflow = rollout_workflow(run, client, positions)
        executor = start_executor(
            stack, cfg, workflow, client, events, run.state.version, positions
        )
        if isinstance(workflow, AgentWorkflow):
            # Before the executor stops: the gateway listens on the executor's loop.
            stack.callback(lambda: executor.run_sync(workflow.aclose(), timeout=10))
        dashboard.add_snapshot(executor.snapshot)
        give_servers_trainer_weights(cfg, run, executor, client)
        samples = open_sample_log(stack, run, executor)
        executor.resume()
        loop = TrainingLoop(
            cfg,
            run.actor,
            executor,
            DiskTransport(client, keep_requests=cfg.train.update_mode == UpdateMode.keep),
            events,
            data_positions=positions.state,
            start=run.state,
            plan=run.plan,
            evaluator=evaluator(
                run,
                client,
                workflow.stop_token_ids,
                workflow if isinstance(workflow, MultiTurnWorkflow | AgentWorkflow) else None,
            ),
            samples=samples,
            curriculum=curriculum_of(run.task),
        )
        stack.enter_context(dashboard)
        result = loop.run()
        elapsed_s = time.monotonic() - started
        finished = positions.state()
        events.emit(
            RunFinishedEvent(
                steps=result.steps,
                version=result.version,
                wall_s=result.wall_s,
                elapsed_s=elapsed_s,
                # With the trained positions in the log, these say that none was skipped.
                next_position=finished.next_position,
                untrained_positions=finished.untrained,
            )
        )
    return TrainSummary(
        run_dir=run.run_dir, result=result, resumed_from=run.state.step, elapsed_s=elapsed_s
    )


def prepare_inputs(cfg: SdpConfig, stack: ExitStack) -> RunInputs:
    """The run directory, model, tokenizer, task and trainer, restored from a checkpoint when
    resuming; everything that can fail before a server starts. The trainer's other ranks stop
    when `stack` closes, after everything entered later (a rank that died is named then)."""
    run_dir = prepare_run_dir(cfg)
    model_dir = ensure_model_dir(cfg.model)
    tokenizer = load_tokenizer(model_dir)
    task = get_task(cfg.task, tokenizer)
    actor = stack.enter_context(trainer_actor(cfg, model_dir, run_dir / "logs"))
    state = restore_state(cfg, run_dir, actor)
    restore_curriculum(task, state)
    weights_dir = weights_dir_for(cfg.train.weights_dir, run_dir)
    return RunInputs(
        cfg, plan_run(cfg), run_dir, model_dir, tokenizer, task, actor, state, weights_dir
    )


def open_event_log(stack: ExitStack, dashboard: Dashboard, run: RunInputs) -> EventSink:
    """The run log, also fed to the metric backends (log.backends) and the dashboard; closed
    last."""
    cfg = run.cfg
    sink: EventSink = EventLog(run.run_dir / "events.jsonl")
    writers = open_writers(
        cfg.log.backends,
        run.run_dir,
        project=cfg.log.wandb_project,
        mode=cfg.log.wandb_mode,
        name=cfg.run.name,
        config=_plain_config(cfg),
    )
    if writers:
        sink = MetricsSink(sink, writers)
    events = dashboard.wrap(sink)
    stack.callback(events.close)
    return events


def _plain_config(cfg: SdpConfig) -> dict[str, object]:
    import yaml

    return yaml.safe_load(config_to_yaml(cfg))


def open_sample_log(
    stack: ExitStack, run: RunInputs, executor: RolloutExecutor
) -> SampleLog | None:
    """samples.jsonl: a few trained completions per step, the dropped rollouts and the
    held-out evaluation completions."""
    log = run.cfg.log
    if log.samples_per_step == 0:
        return None
    stops = run.task.stop_token_ids
    samples = SampleLog(
        run.run_dir / SAMPLES_FILE,
        lambda ids: decode_completion(run.tokenizer, ids, stops),
        per_step=log.samples_per_step,
        with_dropped=log.dropped_samples,
        with_eval=log.eval_samples,
    )
    executor.watch_drops(samples.dropped)
    stack.callback(samples.close)
    return samples


def evaluator(
    run: RunInputs,
    client: InferenceClient,
    stop_token_ids: tuple[int, ...],
    episodes: MultiTurnWorkflow | None = None,
) -> Evaluator | None:
    """Held-out evaluation every eval.every steps; None when it is off."""
    cfg = run.cfg
    if cfg.eval.every == 0:
        return None
    stops = run.task.stop_token_ids
    return Evaluator(
        run.task,
        client,
        lambda ids: decode_completion(run.tokenizer, ids, stops),
        cfg.eval,
        cfg.rollout,
        stop_token_ids,
        seed=cfg.run.seed,
        episodes=episodes,
    )


def inference_client(
    cfg: SdpConfig, plan: RunPlan, pool: ServerPool, tokenizer: PreTrainedTokenizerBase
) -> InferenceClient:
    return InferenceClient(
        pool,
        cfg.server.request_timeout_s,
        update_timeout_s=cfg.train.update_timeout_s,
        max_model_len=cfg.server.max_model_len,
        eos_token_id=tokenizer.eos_token_id,
        score_continuations=plan.scores_continuations,
    )


def restore_curriculum(task: Task, state: TrainState) -> None:
    """task.curriculum's schedule as the checkpoint left it, before any prompt is sampled."""
    schedule = curriculum_of(task)
    if schedule is not None and state.curriculum is not None:
        schedule.restore(CurriculumState.from_json(state.curriculum))


def restored_positions(state: TrainState) -> DataPositions:
    """On resume, the positions the checkpoint had not trained come first, then new ones."""
    return DataPositions(PositionState(state.data_position, list(state.untrained_positions)))


def rollout_workflow(
    run: RunInputs, client: InferenceClient, positions: DataPositions
) -> RLVRWorkflow | MultiTurnWorkflow | AgentWorkflow:
    """Episodes for a task with an environment or an agent (task.agent, through the OpenAI
    gateway), one completion per sample otherwise."""
    cfg, tokenizer = run.cfg, run.tokenizer
    if cfg.task.agent:
        return AgentWorkflow.from_config(cfg, run.task, tokenizer, client, positions)
    stops = run.task.stop_token_ids
    if isinstance(run.task, EnvTask):
        return MultiTurnWorkflow(
            run.task,
            client,
            MessageFormat(PromptFormat.from_config(cfg.task, tokenizer)),
            lambda ids: decode_completion(tokenizer, ids, stops),
            cfg.rollout,
            EpisodeLimits.from_config(
                cfg.rollout, cfg.server.max_model_len, cfg.task.env_timeout_s
            ),
            eos_token_id=tokenizer.eos_token_id,
            run_seed=cfg.run.seed,
            positions=positions,
        )
    return RLVRWorkflow(
        run.task,
        client,
        lambda ids: decode_completion(tokenizer, ids, stops),
        cfg.rollout,
        eos_token_id=tokenizer.eos_token_id,
        run_seed=cfg.run.seed,
        positions=positions,
    )


def start_executor(
    stack: ExitStack,
    cfg: SdpConfig,
    workflow: RLVRWorkflow | MultiTurnWorkflow | AgentWorkflow,
    client: InferenceClient,
    events: EventSink,
    version: int,
    positions: DataPositions,
) -> RolloutExecutor:
    """The rollout executor at the restored version, started paused (nothing is submitted
    before the servers hold the trainer's weights); on the way out it closes the client on its
    own loop, then stops."""
    executor = RolloutExecutor(
        workflow,
        cfg.rollout,
        cfg.train.prox_mode,
        events=events,
        # Proximal logprobs of the same tempered distribution as the behaviour ones.
        scorer=partial(client.score_many, temperature=cfg.rollout.temperature),
        positions=positions,
    )
    executor.restore(version)
    executor.start(paused=True)
    stack.callback(executor.stop)
    stack.callback(lambda: executor.run_sync(client.aclose(), timeout=10))
    return executor


def give_servers_trainer_weights(
    cfg: SdpConfig, run: RunInputs, executor: RolloutExecutor, client: InferenceClient
) -> None:
    """Attached servers may hold any weights, and a resumed run's servers start from the base
    model: give every server the trainer's weights before the first rollout."""
    initial = run.actor.export_weights(
        run.weights_dir, run.state.version, export_dtype(cfg.server.dtype)
    )
    executor.run_sync(
        DiskTransport(client).load_weights(initial, run.state.version),
        timeout=cfg.train.update_timeout_s * 2,
    )


def print_summary(summary: TrainSummary, console: Console) -> None:
    rewards = summary.result.rewards
    head = rewards[:10]
    tail = rewards[-10:]
    first = sum(head) / len(head) if head else 0.0
    last = sum(tail) / len(tail) if tail else 0.0
    console.print(
        f"done: {summary.result.steps} steps, version {summary.result.version}; training loop "
        f"{summary.result.wall_s:.1f} s of {summary.elapsed_s:.1f} s elapsed (the rest: "
        f"starting servers and the first weight load); mean reward first {len(head)} steps "
        f"{first:.3f}, "
        f"last {len(tail)} steps {last:.3f}; run dir {summary.run_dir}",
        highlight=False,
        soft_wrap=True,
    )
