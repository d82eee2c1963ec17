"""The KServe predictor: a ``kserve.Model`` around :class:`~integrations.server.model.ModelRunner`.

KServe's SDK owns the protocol (V1 ``:predict``, V2 ``/infer``, health, model metadata, Prometheus histograms of
pre/predict/post latency); this class turns a decoded request into validated instances, queues them on the
runner with the request's cancel flag and deadline (set by :mod:`integrations.server.guard`) and shapes the
answer for the protocol that asked.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from prometheus_client import Counter, Gauge

from ._sdk import InferOutput, InferRequest, InferResponse, InvalidInput, kserve
from .model import Cancelled, DeadlineExceeded, ModelRunner
from .validation import BadRequest, v2_to_v1

log = logging.getLogger("integrations.server")

QUEUE = Gauge("hf_tensorizer_requests_admitted", "predict requests admitted (running, queued or held)", ["model_name"])
SHED = Counter("hf_tensorizer_requests_shed_total", "predict requests refused with 503: queue full", ["model_name"])
CANCELLED = Counter("hf_tensorizer_requests_cancelled_total", "requests stopped: client disconnected", ["model_name"])
TIMED_OUT = Counter("hf_tensorizer_requests_timed_out_total", "requests stopped by --request-timeout", ["model_name"])
LOAD_SECONDS = Gauge("hf_tensorizer_load_seconds", "time the weights took to load (imports included)", ["model_name"])


@dataclass
class RequestState:
    """Per-request state shared by the guard middleware and :meth:`TensorizedModel.predict`."""

    cancel: threading.Event = field(default_factory=threading.Event)  # set when the client disconnects
    admitted: bool = False  # holds one of the model's queue slots


CURRENT: contextvars.ContextVar[RequestState | None] = contextvars.ContextVar("hf_tensorizer_request", default=None)


class RequestTimeout(Exception):
    """A request stopped by ``--request-timeout`` (answered 504)."""


class ClientGone(Exception):
    """A request whose client disconnected (answered 499, which nobody reads)."""


class TensorizedModel(kserve.Model):
    """One model served by KServe's ``ModelServer``; weights loaded by :meth:`load` (run on a thread).

    Args:
        runner: the model runner (not loaded yet).
    """

    def __init__(self, runner: ModelRunner) -> None:
        super().__init__(runner.config.model_name)
        self.runner = runner
        self.admitted = 0
        self._labels = {"model_name": self.name}

    # ---- lifecycle ----------------------------------------------------------------------------------------

    def load(self) -> bool:
        """Load the weights (blocking); ``ready`` flips when they are in. Re-raises the load's typed error."""
        if self.runner.finished.is_set():  # the SDK calls load() on a model it finds unready: never load twice
            return self.ready
        started = time.perf_counter()
        self.runner.load()
        LOAD_SECONDS.labels(**self._labels).set(time.perf_counter() - started)
        self.ready = True
        return True

    async def healthy(self) -> bool:
        """Readiness: the weights are in and the queue has room (a request holding a slot counts as ready)."""
        state = CURRENT.get()
        # the runner's flag, not self.ready: requests held by --ready-wait resume from inside runner.load()
        holds_slot = state is not None and state.admitted
        return self.runner.ready.is_set() and (self.admitted < self.runner.config.max_queue or holds_slot)

    def stop(self) -> None:
        """Called by the SDK when the server stops: unready, queued work dropped."""
        self.ready = False
        self.runner.shutdown()

    # ---- admission (called by the guard on the event loop) ------------------------------------------------

    def try_admit(self, state: RequestState) -> bool:
        """Take a queue slot for ``state``; False (and counted as shed) when all are taken."""
        if self.admitted >= self.runner.config.max_queue:
            SHED.labels(**self._labels).inc()
            return False
        self.admitted += 1
        state.admitted = True
        QUEUE.labels(**self._labels).set(self.admitted)
        return True

    def release(self, state: RequestState) -> None:
        """Give back ``state``'s queue slot (if it holds one)."""
        if state.admitted:
            state.admitted = False
            self.admitted -= 1
            QUEUE.labels(**self._labels).set(self.admitted)

    # ---- metadata (V2 /v2/models/<name>) ------------------------------------------------------------------

    def get_input_types(self) -> list[dict[str, Any]]:
        names = ["prompt"] + (["negative_prompt"] if self.runner.task == "text-to-image" else [])
        return [{"name": n, "datatype": "BYTES", "shape": [-1]} for n in names]

    def get_output_types(self) -> list[dict[str, Any]]:
        if self.runner.task == "text-to-image":
            return [{"name": "image_b64", "datatype": "BYTES", "shape": [-1]}]
        return [{"name": "text", "datatype": "BYTES", "shape": [-1]},
                {"name": "output_ids", "datatype": "INT64", "shape": [-1, -1]},
                {"name": "prompt_tokens", "datatype": "INT64", "shape": [-1]}]  # fmt: skip

    # ---- inference ----------------------------------------------------------------------------------------

    async def predict(
        self, payload: dict[str, Any] | InferRequest, headers: dict[str, str] | None = None
    ) -> dict[str, Any] | InferResponse:
        """Run one request: V1 ``{"instances": ...}`` → ``{"predictions": [...]}``, V2 → an ``InferResponse``.

        Raises:
            InvalidInput: a malformed request (400).
            RequestTimeout: the work ran past ``--request-timeout`` (504).
            ClientGone: the client disconnected; the work was stopped.
        """
        v2 = isinstance(payload, InferRequest)
        try:
            body = v2_to_v1(_v2_inputs(payload), _v2_params(payload.parameters)) if v2 else _json(payload)
            instances = self.runner.parse(body)
        except BadRequest as exc:
            raise InvalidInput(str(exc)) from None
        state = CURRENT.get() or RequestState()
        timeout = self.runner.config.request_timeout_s
        deadline = time.monotonic() + timeout if timeout > 0 else None
        try:
            predictions = await asyncio.wrap_future(self.runner.submit(instances, state.cancel, deadline))
        except BadRequest as exc:  # a check that needs the tokenizer (prompt length in tokens)
            raise InvalidInput(str(exc)) from None
        except Cancelled:
            CANCELLED.labels(**self._labels).inc()
            raise ClientGone(f"request to {self.name} stopped: the client disconnected") from None
        except DeadlineExceeded:
            TIMED_OUT.labels(**self._labels).inc()
            raise RequestTimeout(f"request stopped after {timeout:g} s (--request-timeout)") from None
        if not v2:
            return {"predictions": predictions}
        return self._v2_response(payload, predictions)

    def _v2_response(self, request: InferRequest, predictions: list[dict[str, Any]]) -> InferResponse:
        n = len(predictions)
        if self.runner.task == "text-to-image":
            outputs = [_bytes_output("image_b64", [p["image_b64"] for p in predictions])]
        else:
            width = max(len(p["output_ids"]) for p in predictions)
            ids = np.full((n, width), -1, dtype=np.int64)  # ragged rows padded with -1
            for i, p in enumerate(predictions):
                ids[i, : len(p["output_ids"])] = p["output_ids"]
            outputs = [
                _bytes_output("text", [p["text"] for p in predictions]),
                InferOutput("output_ids", list(ids.shape), "INT64", ids.ravel().tolist()),
                InferOutput("prompt_tokens", [n], "INT64", [p["prompt_tokens"] for p in predictions]),
            ]
        return InferResponse(response_id=request.id or "", model_name=self.name, infer_outputs=outputs)


def _json(payload: Any) -> Any:
    """The SDK hands over the raw bytes of a V1 body sent without a JSON content type (``curl -d``): parse it."""
    if not isinstance(payload, (bytes, bytearray, str)):
        return payload
    try:
        return json.loads(payload)
    except (ValueError, RecursionError) as exc:  # json's decoder recurses per nesting level
        raise BadRequest(f"body is not valid JSON: {str(exc)[:200] or 'nested too deep'}") from None


def _bytes_output(name: str, values: list[str]) -> InferOutput:
    return InferOutput(name, [len(values)], "BYTES", values)


def _v2_inputs(request: InferRequest) -> list[tuple[str, str, list[Any]]]:
    out = []
    for inp in request.inputs:
        data = inp.data if isinstance(inp.data, list) else list(np.asarray(inp.as_numpy()).ravel())
        out.append((inp.name, inp.datatype, _flatten(data)))
    return out


def _flatten(data: list[Any]) -> list[Any]:
    flat: list[Any] = []
    for v in data:
        flat.extend(_flatten(v) if isinstance(v, list) else [v])
    return flat


def _v2_params(parameters: Any) -> dict[str, Any]:
    """Request parameters as plain values (REST gives a dict; a gRPC-shaped one wraps values)."""
    if not parameters:
        return {}
    out = {}
    for k, v in dict(parameters).items():
        out[k] = v if isinstance(v, (str, int, float, bool, list, dict)) or v is None else _param_value(v)
    return out


def _param_value(v: Any) -> Any:
    kind = v.WhichOneof("parameter_choice")  # an InferParameter protobuf
    return getattr(v, kind) if kind else None
