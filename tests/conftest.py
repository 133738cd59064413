from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from sdp_cli.model import TinyModelSpec, init_tiny_model


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Keep the built-in model cache of the test session out of the user's home."""
    cache = tmp_path_factory.mktemp("sdp-cache")
    old = os.environ.get("SDP_CACHE_DIR")
    os.environ["SDP_CACHE_DIR"] = str(cache)
    yield cache
    if old is None:
        os.environ.pop("SDP_CACHE_DIR", None)
    else:
        os.environ["SDP_CACHE_DIR"] = old


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path, _ = init_tiny_model(TinyModelSpec(), tmp_path_factory.mktemp("models") / "tiny")
    return path
