"""Which server deaths a request was present at, to tell a poison request from bad luck.

A request that a server was serving when it died may have killed it, or may have been in
flight beside the one that did. The client therefore sends a request that was present at a
death (a suspect) only while no other suspect is in flight: a suspect present at a second death
was then alone among suspects, and is rejected as poison instead of killing servers forever.
Requests that were merely in flight beside it become suspects with one death, and get their
own turn alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sdp_cli.inference.pool import ServerPool, ServerStatus

# Server deaths a request may be present at before it is rejected as poison.
POISON_DEATHS = 2


@dataclass
class DeathWitness:
    """The attempts of one request that reached a server: (server index, the server's crash
    count when the attempt was sent). Several attempts sent to one server before its supervisor
    counted its death are one death."""

    reached: set[tuple[int, int]] = field(default_factory=set)

    def note_reached(self, server: ServerStatus) -> None:
        self.reached.add((server.index, server.crashes))

    def deaths(self, pool: ServerPool) -> int:
        crashes = {status.index: status.crashes for status in pool.snapshot()}
        return sum(1 for index, sent_at in self.reached if crashes[index] > sent_at)
