"""What the server was started with: :class:`ServerConfig` and the command line's value parsers.

Kept free of heavy imports (no torch, no kserve): ``python -m integrations.server`` parses its flags and starts
the weights snapshot (:mod:`integrations.server.snapshot`) before any of those load.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

PRECISION_NAMES = ("bfloat16", "float16", "float32")
LOADERS = ("hf_tensorizer", "hf")
DEFAULT_LOAD_TIMEOUT_S = 1800.0


@dataclass
class ServerConfig:
    """What ``python -m integrations.server`` was started with (see ``__main__.py`` for the flags)."""

    model_uri: str
    model_name: str = "model"
    precision: str = "float32"
    device: str = "cpu"
    loader: str = "hf_tensorizer"
    key_file: str | None = None
    tensorizer_options: dict[str, Any] = field(default_factory=dict)
    max_new_tokens_limit: int = 512
    max_steps_limit: int = 200
    max_instances: int = 64
    # prompt tokens accepted; 0: the model's maximum positions (a larger value is lowered to that too)
    max_input_tokens: int = 0
    # work one request may ask for: the sum of max_new_tokens (num_inference_steps) over its instances
    max_request_tokens: int = 4096
    max_request_steps: int = 400
    # a request still running after this long is stopped (504); 0: no limit
    request_timeout_s: float = 300.0
    # requests admitted at once (running + queued + held while loading); more are answered 503 before their
    # body is read, and readiness answers 503 while the queue is full
    max_queue: int = 32
    # request bodies over this many bytes are answered 413 without being read
    max_body_bytes: int = 8 << 20
    # >0: a predict request arriving while the weights load waits up to this long instead of getting 503
    # (what Knative's activator does for a service scaled from zero); 0: answer 503 at once (KServe's default)
    ready_wait_s: float = 0.0
    # a load still running after this long ends the process with status 1 (LoadTimeoutError); 0: no limit
    load_timeout_s: float = DEFAULT_LOAD_TIMEOUT_S
    # guard a local model.tensors against in-place rewrites (snapshot.py): False reads it with pread
    snapshot: bool = True
    # the guard: map the file under a read lease (moved to private memory only if a writer comes); False, or no
    # lease to be had: copy it into a sealed memfd while the imports run, then map that
    lease: bool = True


def parse_option(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` with a JSON value (``num_readers=8``, ``mmap=true``) or a plain string.

    Raises:
        ValueError: ``text`` has no ``=`` or no key.
    """
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ValueError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value
