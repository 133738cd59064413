"""Shared plumbing: the atomic directory writer and the asyncio loop on its own thread."""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
from pathlib import Path

import pytest

from sdp_cli.common.atomic import atomic_dir, is_leftover, write_text_atomically
from sdp_cli.common.loop_thread import LoopThread, LoopThreadError


def test_an_atomic_dir_appears_only_when_complete(tmp_path: Path) -> None:
    final = tmp_path / "out" / "v1"
    with atomic_dir(final) as tmp:
        (tmp / "a.txt").write_text("a")
        assert not final.exists()
        assert is_leftover(tmp)
    assert (final / "a.txt").read_text() == "a"
    assert sorted(p.name for p in final.parent.iterdir()) == ["v1"]


def test_a_failed_write_leaves_the_previous_directory_untouched(tmp_path: Path) -> None:
    final = tmp_path / "v1"
    with atomic_dir(final) as tmp:
        (tmp / "a.txt").write_text("old")
    with pytest.raises(RuntimeError), atomic_dir(final, fsync=True) as tmp:
        (tmp / "a.txt").write_text("half")
        raise RuntimeError("disk full")
    assert (final / "a.txt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["v1"]


def test_an_existing_directory_is_replaced_unless_it_should_be_kept(tmp_path: Path) -> None:
    final = tmp_path / "model"
    with atomic_dir(final) as tmp:
        (tmp / "f").write_text("first")
    with atomic_dir(final, fsync=True) as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "f").write_text("second")
    assert not (final / "f").exists() and (final / "sub" / "f").read_text() == "second"
    with atomic_dir(final, keep_existing=True) as tmp:
        (tmp / "f").write_text("third")
    assert (final / "sub" / "f").read_text() == "second"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_a_loop_thread_runs_coroutines_for_other_threads(caplog: pytest.LogCaptureFixture) -> None:
    runner = LoopThread("test-loop")
    seen: list[str] = []
    runner.start(lambda loop: seen.append(threading.current_thread().name))

    async def where() -> str:
        return threading.current_thread().name

    assert runner.call(where(), timeout=5) == "test-loop" == seen[0]
    runner.stop()
    assert not runner.running()


def test_stopping_a_loop_thread_cancels_pending_tasks_without_noise(
    caplog: pytest.LogCaptureFixture,
) -> None:
    started, cancelled = threading.Event(), threading.Event()

    async def forever() -> None:
        started.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    runner = LoopThread("test-loop")
    runner.start()
    # A task nobody awaits, as a gather's children are when the caller gave up waiting.
    runner.loop.call_soon_threadsafe(lambda: runner.loop.create_task(forever()))
    future = runner.submit(asyncio.sleep(3600))
    assert started.wait(5)
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        runner.stop()
        gc.collect()
    assert cancelled.is_set()
    assert future.cancelled()
    assert "Task was destroyed but it is pending" not in caplog.text


def test_a_loop_that_cannot_start_says_why() -> None:
    def broken(loop: asyncio.AbstractEventLoop) -> None:
        raise ValueError("no loop for you")

    with pytest.raises(LoopThreadError, match="no loop for you"):
        LoopThread("test-loop").start(broken)


def test_a_file_written_atomically_replaces_the_old_one_and_leaves_no_temporary(
    tmp_path: Path,
) -> None:
    target = tmp_path / "sub" / "servers.json"
    write_text_atomically(target, "old\n")
    write_text_atomically(target, "new\n")
    assert target.read_text() == "new\n"
    assert [p.name for p in target.parent.iterdir()] == ["servers.json"]
