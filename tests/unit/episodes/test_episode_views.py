"""Episodes in what people read: the fold's episode tally (inspect-staleness, the dashboard),
TensorBoard/W&B scalars, samples.jsonl records and `sdp samples`' turn lines."""

from __future__ import annotations

from pathlib import Path

from sdp_cli.commands.samples import completion_cell
from sdp_cli.events.event_schema import RolloutFinishedEvent
from sdp_cli.events.metrics import episode_scalars
from sdp_cli.orchestrator.sample_log import SampleLog, read_samples
from sdp_cli.rollout.control import completion_timings, episode_figures
from sdp_cli.rollout.trajectory import RolloutGroup, Trajectory
from sdp_cli.views.staleness_analysis import summarize
from sdp_cli.views.staleness_report import episodes_line


def episode(turns: int, tool: bool, env_s: float, end: str) -> Trajectory:
    records = [{"role": "user", "text": "q", "n_tokens": 3, "trained": False}]
    ids: list[int] = []
    trained: list[bool] = []
    for turn in range(turns):
        records.append({"role": "assistant", "text": "a", "n_tokens": 2, "trained": True})
        ids += [5, 6]
        trained += [True, True]
        if turn < turns - 1:
            role = "tool" if tool else "user"
            records.append({"role": role, "text": "r", "n_tokens": 1, "trained": False})
            ids.append(7)
            trained.append(False)
    return Trajectory(
        prompt_ids=[1, 2, 3],
        output_ids=ids,
        behav_logprobs=[-0.5] * len(ids),
        versions=[0] * len(ids),
        trained=trained,
        turns=records,
        env_s=env_s,
        generate_s=1.0,
        end_reason=end,
    )


def test_finished_events_fold_into_turns_tool_calls_and_seconds() -> None:
    samples = [episode(3, True, 0.5, "done"), episode(1, True, 0.0, "context")]
    figures = episode_figures(samples)
    assert figures["episode_turns"] == [3, 1] and figures["episode_tool_calls"] == [2, 0]
    # An episode's seconds include its environment's: not a request latency to calibrate.
    assert completion_timings(samples) == {}
    event = RolloutFinishedEvent(rollout_id=0, version=0, accepted=True, **figures)
    episodes = summarize([event]).episodes
    assert episodes["episodes"] == 2 and episodes["turns_per_episode"] == 2.0
    assert episodes["tool_calls_per_episode"] == 1.0
    assert episodes["env_fraction"] == round(0.5 / 2.5, 4)
    assert episodes["ends"] == {"done": 1, "context": 1}
    assert "2.00 model turns and 1.00 tool results each" in episodes_line(episodes).plain
    scalars = episode_scalars(event)
    assert scalars["episodes/turns"] == 2.0 and scalars["episodes/context_end_fraction"] == 0.5


def test_a_single_turn_run_has_no_episode_figures() -> None:
    single = Trajectory([1], [5, 6], [-0.1, -0.2], [0, 0], generate_s=0.3)
    assert episode_figures([single]) == {}
    assert summarize([RolloutFinishedEvent(rollout_id=0, version=0, accepted=True)]).episodes == {}


def test_samples_records_and_show_the_turns(tmp_path: Path) -> None:
    log = SampleLog(tmp_path / "samples.jsonl", lambda ids: "".join(map(str, ids)), 2, True)
    sample = episode(2, False, 0.25, "max_turns")
    log.trained(1, 1, [RolloutGroup(0, [sample], meta={"prompt": "q"})])
    log.close()
    (record,) = read_samples(tmp_path / "samples.jsonl")
    assert [t["role"] for t in record["turns"]] == ["user", "assistant", "user", "assistant"]
    assert record["n_trained"] == 4 and record["end_reason"] == "max_turns"
    cell = completion_cell(record)
    assert "assistant* (2): a" in cell and "user (1): r" in cell
    assert "ended: max_turns" in cell
