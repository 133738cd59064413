"""The OpenAI-compatible HTTP gateway: one aiohttp server on 127.0.0.1, a base URL per episode.

    POST {base}/chat/completions     POST {base}/completions     GET {base}/models
    base = http://127.0.0.1:<port>/episodes/<episode id>/v1

The server runs on the event loop of whoever starts it: the rollout executor's, so the model
calls it makes go through the same inference client and pause gate as every other rollout, and
an agent's requests never wait on another thread. Nothing it does blocks the loop (rendering a
few messages is the only work done inline). Answers and errors have OpenAI's shapes
(`agent_episode.py`); an unknown or ended episode is a 404.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from aiohttp import web

from sdp_cli.gateway.agent_episode import AgentEpisode, GatewayError

log = logging.getLogger(__name__)

HOST = "127.0.0.1"


def _error(exc: GatewayError) -> web.Response:
    return web.json_response(exc.body(), status=exc.status)


class Gateway:
    def __init__(self, model_name: str, host: str = HOST, port: int = 0) -> None:
        self.model_name = model_name
        self.host = host
        self._port = port
        self._episodes: dict[str, AgentEpisode] = {}
        self._runner: web.AppRunner | None = None
        self.n_requests = 0

    # ---- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        """Listen (port 0: any free port). Call on the loop the model calls run on."""
        if self._runner is not None:
            return
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/episodes/{episode}/v1/chat/completions", self._chat)
        app.router.add_post("/episodes/{episode}/v1/completions", self._completion)
        app.router.add_get("/episodes/{episode}/v1/models", self._models)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self._port)
        await site.start()
        sockets = [s for s in (runner.addresses or [])]
        self._port = int(sockets[0][1]) if sockets else self._port
        self._runner = runner

    async def aclose(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    @property
    def started(self) -> bool:
        return self._runner is not None

    @property
    def port(self) -> int:
        return self._port

    # ---- episodes -----------------------------------------------------------------------

    def base_url(self, episode_id: str) -> str:
        return f"http://{self.host}:{self._port}/episodes/{episode_id}/v1"

    def open(self, episode: AgentEpisode) -> str:
        """Serve `episode` under its own base URL, which is returned."""
        if episode.episode_id in self._episodes:
            raise ValueError(f"episode {episode.episode_id} is open already")
        self._episodes[episode.episode_id] = episode
        return self.base_url(episode.episode_id)

    def close(self, episode_id: str) -> None:
        """Stop serving an episode: later calls to its URL get 404."""
        episode = self._episodes.pop(episode_id, None)
        if episode is not None:
            episode.closed = True

    @property
    def n_open(self) -> int:
        return len(self._episodes)

    # ---- handlers -----------------------------------------------------------------------

    def _episode(self, request: web.Request) -> AgentEpisode:
        episode_id = request.match_info["episode"]
        episode = self._episodes.get(episode_id)
        if episode is None:
            raise GatewayError(404, f"no open episode {episode_id}", "episode_not_found")
        return episode

    async def _body(self, request: web.Request) -> dict[str, Any]:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise GatewayError(400, f"the body is not JSON: {exc}", "invalid_json") from exc
        if not isinstance(body, dict):
            raise GatewayError(400, "the body must be a JSON object", "invalid_json")
        return body

    async def _chat(self, request: web.Request) -> web.Response:
        self.n_requests += 1
        try:
            episode = self._episode(request)
            return web.json_response(await episode.chat(await self._body(request)))
        except GatewayError as exc:
            return _error(exc)

    async def _completion(self, request: web.Request) -> web.Response:
        self.n_requests += 1
        try:
            episode = self._episode(request)
            return web.json_response(await episode.completion(await self._body(request)))
        except GatewayError as exc:
            return _error(exc)

    async def _models(self, request: web.Request) -> web.Response:
        try:
            self._episode(request)
        except GatewayError as exc:
            return _error(exc)
        model = {"id": self.model_name, "object": "model", "created": 0, "owned_by": "sdp"}
        return web.json_response({"object": "list", "data": [model]})
