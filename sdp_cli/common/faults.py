"""Hold points: stop the process at a named moment so that a test can kill it exactly there.

With `SDP_HOLD_AT=POINT[:N]` and `SDP_HOLD_FILE=PATH` in the environment, the N-th time
(default the first) the process reaches POINT it writes its pid to PATH and sleeps until it is
killed. The crash tests and `scripts/chaos.py` use this to SIGKILL `sdp train` during
generation, during a weight update or in the middle of a checkpoint write, every time at the same
moment. Without the variables a hold point costs one dictionary lookup.

Points: `generation` (the trainer waits for the rollouts of its next step while the servers
generate), `weight_update` (the executor is paused and the new weights are exported, the servers
have not reloaded them), `checkpoint_write` (the checkpoint's model file is written, the rest is
not).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

HOLD_AT = "SDP_HOLD_AT"
HOLD_FILE = "SDP_HOLD_FILE"
POINTS = ("generation", "weight_update", "checkpoint_write")

_reached: dict[str, int] = {}


def hold_point(name: str) -> None:
    """Hold here for good if the environment asks for this point at this occurrence."""
    wanted = os.environ.get(HOLD_AT)
    if not wanted:
        return
    point, _, nth = wanted.partition(":")
    if point != name:
        return
    _reached[name] = _reached.get(name, 0) + 1
    if _reached[name] != int(nth or 1):
        return
    marker = Path(os.environ[HOLD_FILE])
    marker.write_text(f"{os.getpid()}\n")
    while True:
        time.sleep(3600)
