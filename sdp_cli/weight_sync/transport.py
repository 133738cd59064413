"""The one interface a way of moving weights to the servers implements.

The update sequence (`sequence.WeightUpdate`) decides when: it pauses the executor, has the
trainer export, recomputes, aborts, reloads, sets the version and resumes. A transport decides
how the servers stop generating and take new weights: `disk.DiskTransport` has vLLM servers
read an exported directory (with Ray, the pool's stager copies it to each server's node first);
`sdp simulate` has simulated servers. Updates that keep requests running are a mode of both
(`keep_requests`, train.update_mode=keep). A LoRA adapter goes through the disk transport too
(it sees an adapter directory and loads it under the version's name); an NCCL broadcast would be
a further transport.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Protocol

# Write the weights of `version` where the servers can load them; returns their directory
# (None for a transport that needs none, such as simulated weights).
ExportWeights = Callable[[int], Awaitable[Path | None]]


class WeightTransport(Protocol):
    async def abort_generation(self) -> None:
        """Make every generation request in flight return now with its tokens so far, and
        leave the servers serving (scoring requests must not queue behind a pause)."""
        ...

    async def load_weights(self, weights: Path | None, version: int) -> dict[str, float]:
        """Load `weights` as `version` on every server; returns seconds per phase."""
        ...
