"""published_or_free: what a builder sharing a cache finds at its target."""

from __future__ import annotations

from pathlib import Path

import pytest

from sdp_cli.common.atomic import published_or_free


def test_a_missing_or_empty_target_is_free(tmp_path: Path) -> None:
    assert published_or_free(tmp_path / "missing", "MARK") is False
    (tmp_path / "empty").mkdir()
    assert published_or_free(tmp_path / "empty", "MARK") is False


def test_a_target_with_the_marker_is_published(tmp_path: Path) -> None:
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "MARK").write_text("{}")
    assert published_or_free(tmp_path / "done", "MARK") is True


def test_a_target_of_other_content_is_refused(tmp_path: Path) -> None:
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        published_or_free(tmp_path / "other", "MARK")
