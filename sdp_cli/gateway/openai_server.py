"""The OpenAI-compatible HTTP gateway: one aiohttp server on 127.0.0.1, a base URL per episode.

    POST {base}/chat/completions     POST {base}/completions     GET {base}/models
    base = http://127.0.0.1:<port>/episodes/<episode id>/v1

The server runs on the event loop of whoever starts it: the rollout executor's, so the model
calls it makes go through the same inference client and pause gate as every other rollout, and
an agent's requests never wait on another thread. Nothing it does blocks the loop (rendering a
few messages is the only work done inline). Answers and errors have OpenAI's shapes
(`agent_episode.py`); an unknown or ended episode is a 404. `stream: true` is answered as
server-sent events once the turn is generated: the whole turn in one delta.
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


def stream_chunks(answer: dict[str, Any], chat: bool, usage: bool) -> list[dict[str, Any]]:
    """A whole answer as OpenAI stream chunks: the turn is generated before the first chunk
    (a model turn is one request through the segment-wise client), then sent as one delta,
    the finish reason, and the usage when `stream_options.include_usage` asks for it."""
    choice = answer["choices"][0]
    head = {key: answer[key] for key in ("id", "created", "model")}
    if chat:
        head["object"] = "chat.completion.chunk"
        message = choice["message"]
        delta: dict[str, Any] = {"role": "assistant", "content": message.get("content")}
        if message.get("tool_calls"):
            delta["tool_calls"] = [
                {"index": i, **call} for i, call in enumerate(message["tool_calls"])
            ]
        first = {"index": 0, "delta": delta, "finish_reason": None, "logprobs": None}
        last = {"index": 0, "delta": {}, "finish_reason": choice["finish_reason"]}
    else:
        head["object"] = "text_completion"
        first = {"index": 0, "text": choice["text"], "finish_reason": None, "logprobs": None}
        last = {"index": 0, "text": "", "finish_reason": choice["finish_reason"]}
    chunks = [{**head, "choices": [first]}, {**head, "choices": [last]}]
    if usage:
        chunks.append({**head, "choices": [], "usage": answer["usage"]})
    return chunks


async def _stream(request: web.Request, chunks: list[dict[str, Any]]) -> web.StreamResponse:
    """Server-sent events, as OpenAI streams: `data: {json}` per chunk, then `data: [DONE]`."""
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    await response.prepare(request)
    for chunk in chunks:
        await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


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
        """Stop serving an episode: later calls to its URL get 404, calls in flight are
        cancelled."""
        episode = self._episodes.pop(episode_id, None)
        if episode is not None:
            episode.close()

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

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._answer(request, chat=True)

    async def _completion(self, request: web.Request) -> web.StreamResponse:
        return await self._answer(request, chat=False)

    async def _answer(self, request: web.Request, chat: bool) -> web.StreamResponse:
        self.n_requests += 1
        try:
            episode = self._episode(request)
            body = await self._body(request)
            answer = await (episode.chat(body) if chat else episode.completion(body))
        except GatewayError as exc:
            return _error(exc)
        if not body.get("stream"):
            return web.json_response(answer)
        options = body.get("stream_options") or {}
        usage = bool(options.get("include_usage")) if isinstance(options, dict) else False
        return await _stream(request, stream_chunks(answer, chat, usage))

    async def _models(self, request: web.Request) -> web.Response:
        try:
            self._episode(request)
        except GatewayError as exc:
            return _error(exc)
        model = {"id": self.model_name, "object": "model", "created": 0, "owned_by": "sdp"}
        return web.json_response({"object": "list", "data": [model]})
