"""StalenessManager: the admission formula, the counters and exactly-once slot accounting."""

from __future__ import annotations

import threading

import pytest

from sdp_cli.rollout.staleness import LedgerError, StalenessManager, conservation_holds


def manager(eta: int = 1, batch: int = 2, concurrent: int = 100) -> StalenessManager:
    return StalenessManager(max_staleness=eta, batch_size=batch, max_concurrent=concurrent)


def admit(m: StalenessManager, n: int) -> list[int]:
    ids = [m.try_admit() for _ in range(n)]
    assert None not in ids
    return ids  # type: ignore[return-value]


def test_capacity_terms_follow_the_formula() -> None:
    m = manager(eta=2, batch=4, concurrent=10)
    ids = admit(m, 3)
    m.accept(ids[0])
    terms = m.terms()
    # (η + v + 1)·B = 12 at v = 0; 2 running, 1 accepted.
    assert terms.staleness_limit == 12
    assert terms.running == 2
    assert terms.accepted_live == 1
    assert terms.staleness_room == 12 - (1 + 2)
    assert terms.concurrency_room == 10 - 2
    assert m.capacity() == min(8, 9)


def test_admission_stops_at_the_staleness_limit_and_moves_by_b_per_version() -> None:
    m = manager(eta=1, batch=3)
    ids = admit(m, 6)  # (1 + 0 + 1)·3
    assert m.try_admit() is None
    for rollout_id in ids:
        m.accept(rollout_id)
    m.consume(ids[:3])
    # Consumed samples stay in accepted_live, so consuming alone frees nothing...
    assert m.capacity() == 0
    m.set_version(1)
    # ...and each version adds exactly B.
    assert m.capacity() == 3


def test_admission_stops_at_max_concurrent() -> None:
    m = manager(eta=10, batch=10, concurrent=2)
    admit(m, 2)
    assert m.try_admit() is None
    assert m.terms().concurrency_room == 0


def test_drop_at_finish_gives_back_exactly_one_slot() -> None:
    """The reference fork counted a pre-enqueue drop as rejected and also added it back through
    a capacity modifier, admitting one extra rollout per drop."""
    m = manager(eta=0, batch=2, concurrent=100)
    first, second = admit(m, 2)
    assert m.capacity() == 0
    m.drop_at_finish(first, "head_lag")
    assert m.capacity() == 1
    snap = m.snapshot()
    assert snap["rejected"] == 0
    assert snap["dropped"] == {"head_lag": 1}
    assert snap["accepted_live"] == 0
    assert conservation_holds(snap)
    # One slot back means exactly one more admission.
    assert m.try_admit() is not None
    assert m.try_admit() is None
    del second


def test_drop_from_the_buffer_gives_back_exactly_one_slot() -> None:
    m = manager(eta=0, batch=2)
    first, second = admit(m, 2)
    m.accept(first)
    m.accept(second)
    assert m.capacity() == 0
    m.drop_buffered([first], "head_lag")
    assert m.capacity() == 1
    assert m.snapshot()["accepted_live"] == 1
    assert conservation_holds(m.snapshot())


def test_a_rollout_cannot_be_dropped_or_consumed_twice() -> None:
    m = manager()
    (rollout_id,) = admit(m, 1)
    m.drop_at_finish(rollout_id, "head_lag")
    with pytest.raises(LedgerError):
        m.drop_at_finish(rollout_id, "head_lag")
    with pytest.raises(LedgerError):
        m.drop_buffered([rollout_id], "head_lag")
    (other,) = admit(m, 1)
    m.accept(other)
    m.consume([other])
    with pytest.raises(LedgerError):
        m.consume([other])
    with pytest.raises(LedgerError):
        m.drop_buffered([other], "head_lag")
    assert conservation_holds(m.snapshot())


def test_only_buffered_rollouts_leave_accepted_live() -> None:
    m = manager()
    (rollout_id,) = admit(m, 1)
    with pytest.raises(LedgerError):
        m.drop_buffered([rollout_id], "head_lag")
    assert m.snapshot()["accepted_live"] == 0


def test_rejected_rollouts_are_counted_by_reason() -> None:
    m = manager()
    a, b, c = admit(m, 3)
    m.reject(a, "no_group")
    m.reject(b, "error")
    m.reject(c, "error")
    snap = m.snapshot()
    assert snap["rejected"] == 3
    assert snap["rejected_by_reason"] == {"no_group": 1, "error": 2}
    assert snap["running"] == 0
    assert conservation_holds(snap)


def test_restore_sets_accepted_live_to_v_times_b() -> None:
    m = manager(eta=1, batch=4, concurrent=100)
    m.restore(5)
    snap = m.snapshot()
    assert snap["version"] == 5
    assert snap["accepted_live"] == 20
    assert conservation_holds(snap)
    # The same room as a run that reached version 5 by consuming exactly B per step.
    assert m.capacity() == (1 + 5 + 1) * 4 - 20
    # Ids continue after the restored ones.
    assert m.try_admit() == 20


def test_restore_refuses_while_rollouts_are_live() -> None:
    m = manager()
    admit(m, 1)
    with pytest.raises(LedgerError):
        m.restore(3)


def test_version_may_not_go_back() -> None:
    m = manager()
    m.set_version(2)
    with pytest.raises(ValueError):
        m.set_version(1)


def test_concurrent_admission_never_exceeds_capacity() -> None:
    m = manager(eta=3, batch=25, concurrent=1000)
    admitted: list[int] = []
    lock = threading.Lock()

    def worker() -> None:
        while (rollout_id := m.try_admit()) is not None:
            with lock:
                admitted.append(rollout_id)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(admitted) == (3 + 0 + 1) * 25
    assert len(set(admitted)) == len(admitted)
    assert conservation_holds(m.snapshot())
