"""``tensorizer_options``: what a ``from_pretrained`` call passes to the engine and to the transport, checked once.

Users give one dict; :meth:`TensorizerOptions.parse` splits it into :class:`~hf_tensorizer.TensorDeserializer`
arguments (``verify_hash``, ``num_readers``, ``encryption``, ...) and transport options (``endpoint_url``,
``token``, ``headers``, ...), and rejects unknown keys with the same :class:`~hf_tensorizer.errors.UsageError`
everywhere (local files, S3, HTTP, the Hub, the server). The parsed object is passed on as a parameter.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import UsageError

KWARG = "tensorizer_options"
# set by the caller of from_pretrained (device, dtype, which tensors), never through tensorizer_options
_RESERVED = frozenset({"self", "source", "device", "dtype", "filter", "lazy", "index", "source_options"})


@functools.cache
def engine_keys() -> frozenset[str]:
    """The ``TensorDeserializer`` arguments ``tensorizer_options`` may set."""
    from ..engine import TensorDeserializer

    return frozenset(inspect.signature(TensorDeserializer.__init__).parameters) - _RESERVED


@functools.cache
def transport_keys() -> frozenset[str]:
    """The options of every transport (HTTP, S3, the Hub; readers and writers)."""
    from ..sources.http import HTTPSource
    from ..sources.hub import HubSink, HubSource
    from ..sources.s3 import S3Source
    from ..sources.s3_sink import S3Sink

    keys: set[str] = set()
    for cls in (HTTPSource, S3Source, S3Sink, HubSource, HubSink):
        for p in inspect.signature(cls.__init__).parameters.values():
            if p.kind is p.KEYWORD_ONLY or p.kind is p.POSITIONAL_OR_KEYWORD:
                keys.add(p.name)
    return frozenset(keys - {"self", "uri", "name"})


@dataclass(frozen=True)
class TensorizerOptions:
    """The ``tensorizer_options`` of one load, split and validated.

    Attributes:
        engine: ``TensorDeserializer`` keyword arguments.
        transport: ``open_source`` keyword arguments.
    """

    engine: Mapping[str, Any] = field(default_factory=dict)
    transport: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, options: TensorizerOptions | Mapping[str, Any] | None) -> TensorizerOptions:
        """Split a user's ``tensorizer_options`` dict (an already parsed object passes through).

        Raises:
            UsageError: a key that is neither an engine nor a transport option, or a value that is not a dict.
        """
        if isinstance(options, TensorizerOptions):
            return options
        if options is None:
            return cls()
        if not isinstance(options, Mapping):
            raise UsageError(f"{KWARG} must be a dict, got {type(options).__name__}")
        engine = {k: v for k, v in options.items() if k in engine_keys()}
        transport = {k: v for k, v in options.items() if k in transport_keys()}
        unknown = sorted(set(options) - set(engine) - set(transport), key=str)
        if unknown:
            raise UsageError(
                f"{_did_you_mean(unknown)}: engine options are {sorted(engine_keys())}; "
                f"transport options are {sorted(transport_keys())}"
            )
        return cls(engine, transport)

    def as_dict(self) -> dict[str, Any]:
        """The options as one dict again (to hand to a call that takes ``tensorizer_options``)."""
        return {**self.transport, **self.engine}


def _did_you_mean(unknown: list[Any]) -> str:
    """The fix first: ``unknown tensorizer_options key 'num_reader': did you mean 'num_readers'?``."""
    from difflib import get_close_matches

    known = sorted(engine_keys() | transport_keys())
    parts = []
    for key in unknown:
        close = get_close_matches(str(key), known, n=1, cutoff=0.6)
        parts.append(f"{key!r}: did you mean {close[0]!r}?" if close else repr(key))
    return f"unknown {KWARG} key{'s' if len(unknown) > 1 else ''} " + ", ".join(parts)


def transport_only(options: TensorizerOptions | Mapping[str, Any] | None) -> dict[str, Any]:
    """The transport options of a save's ``tensorizer_options`` (writing takes no engine options).

    Raises:
        UsageError: unknown keys, or engine options (``TensorSerializer`` arguments are passed directly).
    """
    parsed = TensorizerOptions.parse(options)
    if parsed.engine:
        raise UsageError(
            f"{KWARG} of a save take transport options only, not {sorted(parsed.engine)}; pass TensorSerializer "
            "arguments (encryption=, digest=, ...) to the save itself"
        )
    return dict(parsed.transport)


def pop_options(kwargs: dict[str, Any]) -> TensorizerOptions:
    """Take ``tensorizer_options`` out of a ``from_pretrained`` call's ``kwargs``, or the options of the pipeline
    being loaded (see :func:`pipeline_options`), parsed."""
    given = kwargs.pop(KWARG, None)
    if given is not None:
        return TensorizerOptions.parse(given)
    return _PIPELINE.get() or TensorizerOptions()


# diffusers loads a pipeline's components with a fixed set of arguments, so no parameter can carry the options
# from the pipeline's from_pretrained to its components': this is the one side channel, and only for that hop.
_PIPELINE: contextvars.ContextVar[TensorizerOptions | None] = contextvars.ContextVar("hf_tensorizer_pipeline_options",
                                                                                     default=None)  # fmt: skip


@contextlib.contextmanager
def pipeline_options(options: TensorizerOptions) -> Iterator[None]:
    """Within the block, component loads without ``tensorizer_options`` of their own use ``options``."""
    token = _PIPELINE.set(options)
    try:
        yield
    finally:
        _PIPELINE.reset(token)
