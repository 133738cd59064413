"""Property tests: random interleavings of submit / finish / version change / take / pause /
resume against the executor's synchronous core (manager + strategy + buffer)."""

from __future__ import annotations

import random

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from sdp_cli.config.train_settings import ProxMode
from sdp_cli.rollout.control import StalenessControl
from sdp_cli.rollout.recompute import write_proximal
from sdp_cli.rollout.staleness import StalenessManager, conservation_holds
from sdp_cli.rollout.strategy import make_strategy
from sdp_cli.rollout.trajectory import NOT_RECOMPUTED, RolloutGroup, Trajectory


def _completion(rng: random.Random, first: int, last: int) -> Trajectory:
    """Tokens from versions the servers served while the rollout ran, oldest first."""
    versions = sorted(rng.randint(first, last) for _ in range(rng.randint(0, 5)))
    return Trajectory(
        prompt_ids=[1],
        output_ids=[2] * len(versions),
        behav_logprobs=[-1.0] * len(versions),
        versions=versions,
    )


class ExecutorCoreMachine(RuleBasedStateMachine):
    @initialize(
        eta=st.integers(0, 3),
        batch=st.integers(1, 4),
        concurrent=st.integers(1, 8),
        strategy=st.sampled_from(["standard", "segment_wise"]),
        prox_mode=st.sampled_from(list(ProxMode)),
        seed=st.integers(0, 2**16),
    )
    def setup(
        self,
        eta: int,
        batch: int,
        concurrent: int,
        strategy: str,
        prox_mode: ProxMode,
        seed: int,
    ) -> None:
        self.eta, self.batch, self.strategy_name = eta, batch, strategy
        self.prox_mode = prox_mode
        manager = StalenessManager(max_staleness=eta, batch_size=batch, max_concurrent=concurrent)
        self.core = StalenessControl(manager, make_strategy(strategy, eta, prox_mode))
        self.rng = random.Random(seed)
        self.running: dict[int, int] = {}  # rollout id → version at submission
        self.paused = False
        self.trained_version: int | None = None  # set between take and weight update
        self.returned: set[int] = set()
        self.accepted_ids: set[int] = set()
        self.left_buffer: set[int] = set()  # consumed or dropped from the buffer

    # ---- the executor's side ----------------------------------------------------------------

    @precondition(lambda self: not self.paused)
    @rule()
    def submit(self) -> None:
        capacity = self.core.manager.capacity()
        rid = self.core.admit()
        assert (rid is not None) == (capacity > 0)
        if rid is not None:
            self.running[rid] = self.core.version

    @precondition(lambda self: bool(self.running))
    @rule(pick=st.integers(0, 1000), n_samples=st.integers(0, 3))
    def finish(self, pick: int, n_samples: int) -> None:
        rid = sorted(self.running)[pick % len(self.running)]
        submitted = self.running.pop(rid)
        if n_samples == 0:
            accepted = self.core.finish(rid, None)
            assert not accepted
            return
        samples = [_completion(self.rng, submitted, self.core.version) for _ in range(n_samples)]
        if self.core.finish(rid, RolloutGroup(rollout_id=-1, samples=samples)):
            self.accepted_ids.add(rid)

    @rule()
    def pause(self) -> None:
        self.paused = True

    @rule()
    def resume(self) -> None:
        self.paused = False

    # ---- the trainer's side -----------------------------------------------------------------

    @precondition(lambda self: self.trained_version is None)
    @rule()
    def take(self) -> None:
        before = {item.rollout_id for item in self.core.buffered()}
        batch = self.core.take(self.batch)
        after = {item.rollout_id for item in self.core.buffered()}
        self.left_buffer |= before - after
        if batch is None:
            return
        version = self.core.version
        for group in batch:
            assert group.rollout_id not in self.returned, "a sample was returned twice"
            self.returned.add(group.rollout_id)
            self._check_trainable(group, version)
        self.trained_version = version

    @precondition(lambda self: self.trained_version is not None)
    @rule(recompute=st.booleans())
    def update_weights(self, recompute: bool) -> None:
        version = self.core.version
        if recompute:
            items = self.core.buffered()
            for item in items:
                for sample in item.group.samples:
                    positions = [i for i, v in enumerate(sample.versions) if v == version - 1]
                    if positions:
                        write_proximal(sample, positions, [-0.5] * len(sample.versions), version)
            self.core.refresh_recompute_versions(items)
        before = {item.rollout_id for item in self.core.buffered()}
        self.core.set_version(version + 1)
        after = {item.rollout_id for item in self.core.buffered()}
        self.left_buffer |= before - after
        self.trained_version = None

    def _check_trainable(self, group: RolloutGroup, version: int) -> None:
        versions = [v for sample in group.samples for v in sample.versions]
        if self.eta == 0:
            # Synchronous PPO under either strategy.
            assert all(v == version for v in versions), (versions, version)
        if self.strategy_name == "segment_wise":
            assert all(version - v <= self.eta for v in versions), (versions, version, self.eta)
            if self.prox_mode == ProxMode.segment and versions:
                assert group.recompute_version != NOT_RECOMPUTED or version - max(versions) <= 1

    # ---- invariants -------------------------------------------------------------------------

    @invariant()
    def counts_are_conserved(self) -> None:
        snap = self.core.snapshot()
        assert conservation_holds(snap), snap
        assert snap["running"] == len(self.running)

    @invariant()
    def nothing_accepted_is_lost(self) -> None:
        buffered = {item.rollout_id for item in self.core.buffered()}
        assert self.accepted_ids == buffered | self.left_buffer
        assert not buffered & self.left_buffer
        snap = self.core.snapshot()
        # Consumed samples stay in accepted_live; only drops from the buffer leave it.
        assert snap["accepted_live"] == len(buffered) + snap["consumed"]

    @invariant()
    def a_waiting_trainer_with_nothing_in_flight_can_always_admit(self) -> None:
        if self.trained_version is not None or self.running:
            return
        version = self.core.version
        valid = [
            item
            for item in self.core.buffered()
            if self.core.strategy.drop_reason(item, version) is None
        ]
        if len(valid) < self.batch:
            assert self.core.manager.capacity() > 0, self.core.snapshot()

    def teardown(self) -> None:
        if not hasattr(self, "core"):
            return
        buffered = {item.rollout_id for item in self.core.buffered()}
        drained = self.core.drain()
        assert {group.rollout_id for group in drained} == buffered
        assert not buffered & self.returned
        assert conservation_holds(self.core.snapshot())


ExecutorCoreMachine.TestCase.settings = settings(
    max_examples=60,
    stateful_step_count=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestExecutorCore = ExecutorCoreMachine.TestCase
