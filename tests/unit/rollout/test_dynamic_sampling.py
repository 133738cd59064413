"""Dynamic sampling (rollout.filter_groups=same_reward) against the ledger: a filtered group
leaves it as a drop at finish with reason `uninformative` (docs/design.md, Dynamic sampling).
The executor-core property machine runs again with a filter and a high share of uninformative
groups, so conservation, the η bound and "no slot given back twice" are checked with them."""

from __future__ import annotations

from hypothesis import strategies as st
from hypothesis.stateful import initialize, invariant, precondition, rule

from sdp_cli.config.rollout_settings import FilterGroups
from sdp_cli.config.train_settings import ProxMode
from sdp_cli.events.event_log import EventRecorder
from sdp_cli.rollout.control import StalenessControl
from sdp_cli.rollout.group_filter import GroupFilter, is_informative
from sdp_cli.rollout.positions import DataPositions
from sdp_cli.rollout.staleness import StalenessManager, conservation_holds
from sdp_cli.rollout.strategy import make_strategy
from sdp_cli.rollout.trajectory import RolloutGroup, Trajectory
from tests.unit.rollout.test_properties import ExecutorCoreMachine, _completion


def _group(rewards: list[float], version: int = 0) -> RolloutGroup:
    samples = [
        Trajectory(prompt_ids=[1], output_ids=[2], behav_logprobs=[-1.0], versions=[version])
        for _ in rewards
    ]
    for sample, reward in zip(samples, rewards, strict=True):
        sample.reward = reward
    return RolloutGroup(rollout_id=-1, samples=samples)


def test_a_group_is_informative_when_its_rewards_differ() -> None:
    assert is_informative(_group([0.0, 1.0, 0.0]))
    assert not is_informative(_group([1.0, 1.0, 1.0]))
    assert not is_informative(_group([0.5]))


def test_none_builds_no_filter() -> None:
    assert GroupFilter.of(FilterGroups.none, 0.9, 8) is None
    assert isinstance(GroupFilter.of(FilterGroups.same_reward, 0.9, 8), GroupFilter)


def test_the_filter_warns_first_and_stops_one_window_later() -> None:
    gf = GroupFilter(max_fraction=0.75, window=4)
    for _ in range(3):
        gf.observe(_group([0.0, 0.0]))
    assert gf.warning is None  # the window is not full yet
    gf.observe(_group([0.0, 0.0]))
    assert gf.warning is not None and gf.stop is None
    for _ in range(3):
        gf.observe(_group([0.0, 0.0]))
    assert gf.stop is None
    gf.observe(_group([0.0, 0.0]))
    assert gf.stop is not None
    for key in ("rollout.n_samples", "rollout.filter_groups=none", "easier task"):
        assert key in gf.stop


def test_a_share_above_the_limit_but_under_one_warns_and_never_stops() -> None:
    # One informative group in four: 75 % uninformative, at the limit, for 50 windows. The
    # batches come slowly but they come, so the run goes on.
    gf = GroupFilter(max_fraction=0.75, window=4)
    for index in range(200):
        gf.observe(_group([0.0, 1.0] if index % 4 == 0 else [1.0, 1.0]))
    assert gf.warning is not None and gf.stop is None
    # A whole window without an informative group then stops it.
    for _ in range(4):
        gf.observe(_group([1.0, 1.0]))
    assert gf.stop is not None and "no group left to train" in gf.stop


def test_the_stop_clock_restarts_when_the_share_falls_below_the_limit() -> None:
    gf = GroupFilter(max_fraction=0.75, window=4)
    for _ in range(4):
        gf.observe(_group([0.0, 0.0]))
    assert gf.warning is not None
    # Two informative groups bring the share to 50 %: the run recovered.
    gf.observe(_group([0.0, 1.0]))
    gf.observe(_group([0.0, 1.0]))
    for _ in range(3):
        gf.observe(_group([0.0, 0.0]))
    assert gf.stop is None


def _core(
    events: EventRecorder, group_filter: GroupFilter, positions: DataPositions | None = None
) -> StalenessControl:
    manager = StalenessManager(max_staleness=1, batch_size=2, max_concurrent=8)
    strategy = make_strategy("segment_wise", 1, ProxMode.segment)
    return StalenessControl(
        manager, strategy, events, positions=positions, group_filter=group_filter
    )


def test_a_filtered_group_is_a_drop_at_finish_with_its_own_reason() -> None:
    events = EventRecorder()
    positions = DataPositions()
    core = _core(events, GroupFilter(max_fraction=1.0, window=8), positions)
    manager = core.manager
    rid = core.admit()
    assert rid is not None
    capacity = manager.capacity()
    assert not core.finish(rid, _group([1.0, 1.0]))
    snap = core.snapshot()
    assert snap["dropped"] == {"uninformative": 1} and snap["running"] == 0
    assert snap["accepted_live"] == 0 and conservation_holds(snap)
    assert manager.capacity() == capacity + 1  # its slot came back, once
    # Its prompt counts as used: it is not replayed.
    assert positions.state().untrained == []
    dropped = [e for e in events.events if e.type == "sample_dropped"]
    assert [(e.reason, e.point) for e in dropped] == [("uninformative", "finish")]
    rid = core.admit()
    assert rid is not None and core.finish(rid, _group([0.0, 1.0]))


def test_the_warning_is_logged_once_as_an_event() -> None:
    events = EventRecorder()
    core = _core(events, GroupFilter(max_fraction=0.5, window=2))
    for _ in range(6):
        rid = core.admit()
        assert rid is not None
        core.finish(rid, _group([0.0, 0.0]))
    warnings = [e for e in events.events if e.type == "uninformative_warning"]
    assert len(warnings) == 1 and warnings[0].fraction == 1.0
    assert "rollout.filter_groups=none" in warnings[0].message


class FilteredCoreMachine(ExecutorCoreMachine):
    """The executor-core machine with dynamic sampling on; most groups are uninformative."""

    # Runs with the parent's setup, before any rule; the filter goes in at the first finish.
    @initialize(max_fraction=st.sampled_from([0.5, 0.9, 1.0]), window=st.integers(1, 8))
    def draw_filter(self, max_fraction: float, window: int) -> None:
        self.filter_args = (max_fraction, window)
        self.filtered: set[int] = set()

    @precondition(lambda self: bool(self.running))
    @rule(pick=st.integers(0, 1000), n_samples=st.integers(1, 3), informative=st.integers(0, 9))
    def finish(self, pick: int, n_samples: int, informative: int) -> None:  # type: ignore[override]
        if self.core.group_filter is None:
            self.core.group_filter = GroupFilter(*self.filter_args)
        rid = sorted(self.running)[pick % len(self.running)]
        submitted = self.running.pop(rid)
        samples = [_completion(self.rng, submitted, self.core.version) for _ in range(n_samples)]
        # One group in ten has rewards that differ; the rest are all 0.
        if informative == 0:
            for i, sample in enumerate(samples):
                sample.reward = float(i)
        group = RolloutGroup(rollout_id=-1, samples=samples)
        dropped_before = self.core.snapshot()["dropped"].get("uninformative", 0)
        if self.core.finish(rid, group):
            self.accepted_ids.add(rid)
            assert is_informative(group)
        elif self.core.snapshot()["dropped"].get("uninformative", 0) > dropped_before:
            assert not is_informative(group)
            self.filtered.add(rid)

    @invariant()
    def every_filtered_group_is_counted_once(self) -> None:
        if not hasattr(self, "filtered") or not hasattr(self, "core"):
            return
        snap = self.core.snapshot()
        assert snap["dropped"].get("uninformative", 0) == len(self.filtered)
        assert not self.filtered & self.accepted_ids
        assert not self.filtered & self.returned

    @invariant()
    def the_stop_comes_after_the_warning(self) -> None:
        gf = getattr(getattr(self, "core", None), "group_filter", None)
        if gf is not None and gf.stop is not None:
            assert gf.warning is not None


# As many examples and steps as the machine without a filter.
FilteredCoreMachine.TestCase.settings = ExecutorCoreMachine.TestCase.settings
TestFilteredExecutorCore = FilteredCoreMachine.TestCase
