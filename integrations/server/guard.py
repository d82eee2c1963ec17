"""ASGI middleware in front of KServe's routes: what the SDK does not bound.

For every request: a ``Content-Length`` over ``max_body_bytes`` is answered **413 before one byte of the body is
read** (a chunked body is read only up to the cap). For predict requests (V1 ``:predict``/``:explain``, V2
``/infer``):

* **admission**: at most ``max_queue`` requests are admitted at once (running, queued on the model thread, or
  held while the weights load); one more is answered **503** with ``Retry-After`` before its body is read, and
  readiness answers 503 while the queue is full (:meth:`TensorizedModel.healthy`), so a load balancer sends
  traffic elsewhere;
* **client gone**: once the body is read, the connection is watched; when the client disconnects, the request's
  cancel flag is set and the model thread drops its work at the next token (or never starts it);
* ``--ready-wait``: a request arriving during the load is held (no CPU spent) until the weights are in.

Not ready: readiness (``GET /v1/models/<name>``, ``GET /v2/models/<name>/ready``) and predicts that find the
weights not in (or the queue full) are answered **503** here, quietly: one log line when the state changes
(loading → ready → saturated → ready ...), where the SDK would log a ``ModelNotReady`` traceback for every probe
(a load balancer polling every 20 ms filled the log).

Also: a predict with another method than POST is a 405 (not KServe's 404 for a model named ``m:predict``), and
the V2 model-repository extension (``/v2/repository/...``: unload the model over HTTP) is switched off.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from .predictor import CURRENT, RequestState, TensorizedModel

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

log = logging.getLogger("integrations.server")

READY = re.compile(r"^/v1/models/([^/:]+)$|^/v2/models/([^/]+)(?:/versions/[^/]+)?/ready$")
PREDICT = re.compile(r"^/v1/models/[^/]+:(predict|explain)$|^/v2/models/[^/]+(/versions/[^/]+)?/infer$")


async def _answer(send: Send, status: int, message: str, headers: dict[str, str] | None = None) -> None:
    body = json.dumps({"error": message}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


class Guard:
    """Wraps KServe's FastAPI app (``app.add_middleware(Guard, model=...)``).

    Args:
        app: the inner ASGI app.
        model: the served model (its runner's config holds the limits).
    """

    def __init__(self, app: ASGIApp, model: TensorizedModel) -> None:
        self.app = app
        self.model = model
        self.config = model.runner.config
        self._loaded: asyncio.Event | None = None
        self._state = "starting"  # what the last readiness answer said: logged when it changes

    def _note(self, state: str) -> None:
        """Log the model's readiness state once per change (every probe would flood the log)."""
        if state == self._state:
            return
        self._state = state
        name = self.model.name
        if state == "ready":
            log.info("model %s ready: readiness answers 200", name)
        elif state == "loading":
            log.info(
                "model %s not ready: loading its weights (readiness and predicts answer 503%s)",
                name,
                f", predicts held up to {self.config.ready_wait_s:g} s" if self.config.ready_wait_s else "",
            )
        elif state == "saturated":
            log.warning("model %s not ready: %d requests admitted (--max-queue), readiness answers 503", name,
                        self.config.max_queue)  # fmt: skip
        else:
            log.warning("model %s not ready: its load failed (%s)", name, self.model.runner.error)

    def _not_ready_state(self) -> str | None:
        """``None`` when the model can take a request now, else why not."""
        runner = self.model.runner
        if not runner.ready.is_set():
            return "failed" if runner.finished.is_set() else "loading"
        if self.model.admitted >= self.config.max_queue and not (CURRENT.get() or _NO_SLOT).admitted:
            return "saturated"
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, method = scope["path"], scope["method"]
        if path.startswith("/v2/repository/"):
            return await _answer(send, 404, "the model repository extension is disabled: this server serves one "
                                 "model, loaded at start")  # fmt: skip
        ready = READY.match(path)
        if ready is not None and method == "GET" and (ready.group(1) or ready.group(2)) == self.model.name:
            why = self._not_ready_state()
            self._note(why or "ready")
            if why is not None:
                return await _answer(send, 503, f"model {self.model.name} is not ready: {why}")
            return await self.app(scope, receive, send)
        predict = PREDICT.match(path) is not None
        if path.endswith(":predict") and method != "POST":
            return await _answer(send, 405, "predict takes POST", {"allow": "POST"})
        cap = self.config.max_body_bytes
        length = _content_length(scope)
        if length == -1:
            return await _answer(send, 400, "invalid Content-Length header", {"connection": "close"})
        if length is not None and length > cap:  # refused unread: the server never holds the body
            return await _answer(send, 413, f"request body of {length:,} bytes is over the {cap:,}-byte limit "
                                 "(--max-body-bytes)", {"connection": "close"})  # fmt: skip
        if not predict:
            return await self.app(scope, receive, send)
        state = RequestState()
        if not self.model.try_admit(state):
            return await _answer(send, 503, f"server saturated: {self.config.max_queue} requests admitted "
                                 "(--max-queue); retry later", {"retry-after": "1"})  # fmt: skip
        token = CURRENT.set(state)
        try:
            if self.config.ready_wait_s > 0 and not self.model.runner.finished.is_set():
                await self._wait_loaded(self.config.ready_wait_s)
            if not self.model.runner.ready.is_set():  # still loading (or failed): a quiet 503, as readiness says
                why = self._not_ready_state() or "loading"
                self._note(why)
                return await _answer(send, 503, f"model {self.model.name} is not ready: {why}",
                                     {"retry-after": "1"})  # fmt: skip
            body = await _read_body(receive, cap)
            if body is None:  # the client left while sending
                state.cancel.set()
                return
            if isinstance(body, int):
                return await _answer(send, 413, f"request body is over the {cap:,}-byte limit (--max-body-bytes)",
                                     {"connection": "close"})  # fmt: skip
            await self._serve(scope, receive, send, state, body)
        finally:
            CURRENT.reset(token)
            self.model.release(state)

    async def _serve(self, scope: Scope, receive: Receive, send: Send, state: RequestState, body: bytes) -> None:
        """Run the inner app on the buffered body while a watcher waits for the client to disconnect."""
        gone = asyncio.Event()

        async def watch() -> None:
            # the body is consumed: the server's next message is the disconnect (or the end of the response)
            while (await receive())["type"] != "http.disconnect":
                pass
            state.cancel.set()
            gone.set()

        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        watcher = asyncio.ensure_future(watch())
        try:
            await self.app(scope, replay, send)
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher

    async def _wait_loaded(self, timeout: float) -> None:
        if self._loaded is None:
            loop, event = asyncio.get_running_loop(), asyncio.Event()
            self._loaded = event
            self.model.runner.add_done_callback(lambda: loop.call_soon_threadsafe(event.set))
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._loaded.wait(), timeout)


_NO_SLOT = RequestState()


def _content_length(scope: Scope) -> int | None:
    """The Content-Length header: None when absent, -1 when not a number."""
    for key, value in scope.get("headers", []):
        if key == b"content-length":
            try:
                n = int(value)
            except ValueError:
                return -1
            return n if n >= 0 else -1
    return None


async def _read_body(receive: Receive, cap: int) -> bytes | int | None:
    """The whole body if it fits ``cap``; the byte count read when it does not; None if the client left."""
    chunks: list[bytes] = []
    n = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        n += len(chunk)
        if n > cap:
            return n
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)
