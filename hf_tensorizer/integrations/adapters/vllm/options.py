"""``--model-loader-extra-config`` of ``--load-format hf_tensorizer``: the JSON object, checked once.

The keys are those of ``tensorizer_options`` everywhere else (:class:`~...options.TensorizerOptions`: engine
options such as ``num_readers``, ``chunk_bytes``, ``verify_hash``, ``distributed``, and transport options such as
``endpoint_url``, ``region_name``, ``token``, ``headers``), plus what JSON cannot hold as a Python object:
``key_file`` (a key file written by ``hf-tensorizer keygen``) and ``passphrase_env`` (the name of an environment
variable holding a passphrase). Without either, an encrypted artifact takes its key from ``HF_TENSORIZER_KEY``.
Two keys are this loader's own: ``adopt`` (default true; :mod:`.adopt`), whether vLLM's parameters may become the
streamed tensors instead of copies of them on CPU, and ``lease`` (default true), whether those left on a local
file's mapping after post-processing stay there under a read lease (:mod:`hf_tensorizer.engine.lease`) rather than
being copied out.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ....constants import KEY_ENV
from ....errors import UsageError
from ...options import TensorizerOptions, engine_keys, transport_keys

FLAG = "--model-loader-extra-config"
LOGGER = "vllm.hf_tensorizer"  # under vLLM's logger: its handler and format, once vLLM configured it
KEY_OPTIONS = ("key_file", "passphrase_env")  # the vLLM spellings of encryption=
LOADER_OPTIONS = ("adopt", "lease")  # this loader's own (LoaderOptions attributes), not tensorizer_options
# set by vLLM itself (the model's device and dtype) or meaningless for a load into vLLM's own parameters
_NOT_HERE = frozenset({"transform", "process_group", "lazy", "index", "staging_allocation"})


@dataclass(frozen=True)
class LoaderOptions:
    """The parsed extra config of one vLLM load.

    Attributes:
        options: engine and transport options (``encryption`` resolved from ``key_file`` / ``passphrase_env``).
        given: the JSON object as given (for messages and the front-end's resolution).
        adopt: on CPU with one rank, a whole parameter becomes the streamed tensor instead of a copy of it
            (:mod:`.adopt`); false copies every tensor, as vLLM's own loaders do.
        lease: adopted parameters of a local file that vLLM keeps after post-processing stay on the file's mapping
            under a read lease (moved into private memory if a process opens the file for writing); false, or no
            lease to be had: they are copied out of the mapping after post-processing.
    """

    options: TensorizerOptions = field(default_factory=TensorizerOptions)
    given: Mapping[str, Any] = field(default_factory=dict)
    adopt: bool = True
    lease: bool = True

    @property
    def engine(self) -> Mapping[str, Any]:
        return self.options.engine

    @property
    def transport(self) -> Mapping[str, Any]:
        return self.options.transport


@functools.cache
def _writer_only() -> frozenset[str]:
    """Transport options of the sinks alone (a load never writes)."""
    from ....sources.http import HTTPSource
    from ....sources.hub import HubSource
    from ....sources.s3 import S3Source

    readers = {p for cls in (HTTPSource, S3Source, HubSource) for p in inspect.signature(cls.__init__).parameters}
    return frozenset(transport_keys() - readers)


def valid_keys() -> list[str]:
    """Every key the extra config accepts."""
    return sorted((engine_keys() | transport_keys() | set(KEY_OPTIONS) | set(LOADER_OPTIONS)) - _NOT_HERE
                  - _writer_only() - {"client"})  # fmt: skip


def parse_extra_config(config: Mapping[str, Any] | str | None) -> LoaderOptions:
    """Check vLLM's ``model_loader_extra_config`` (a dict, or the JSON text of one) and split it.

    Args:
        config: what ``--model-loader-extra-config`` gave (vLLM hands the loader a dict).

    Returns:
        The options of the load.

    Raises:
        UsageError: not a JSON object, an unknown key (the message names every valid one), a value of the wrong
            kind, or ``encryption`` given as text (use ``key_file`` / ``passphrase_env``).
        MissingKeyError: ``key_file`` cannot be read.
    """
    if config is None or config == "":
        return LoaderOptions()
    if isinstance(config, str):
        try:
            config = json.loads(config)
        except json.JSONDecodeError as exc:
            raise UsageError(f"{FLAG} of hf_tensorizer is not valid JSON: {exc}") from None
    if not isinstance(config, Mapping):
        raise UsageError(f"{FLAG} of hf_tensorizer must be a JSON object, got {type(config).__name__}")
    given = dict(config)
    unknown = sorted(k for k in given if k not in valid_keys())
    if unknown:
        raise UsageError(f"unknown {FLAG} key(s) {unknown} for --load-format hf_tensorizer; valid keys: "
                         f"{', '.join(valid_keys())}")  # fmt: skip
    rest = {k: v for k, v in given.items() if k not in KEY_OPTIONS and k not in LOADER_OPTIONS}
    if isinstance(rest.get("encryption"), str):
        raise UsageError(f"{FLAG}: give the key as \"key_file\": PATH or \"passphrase_env\": VAR (or set "
                         f"{KEY_ENV}), not as text in \"encryption\"")  # fmt: skip
    if rest.get("encryption") not in (None, False):
        raise UsageError(f'{FLAG}: "encryption" may only be false (a plain artifact while {KEY_ENV} is set)')
    key = _key(given)
    if key is not None:
        if "encryption" in rest:
            raise UsageError(f"{FLAG}: give one of key_file, passphrase_env and encryption")
        rest["encryption"] = key
    for name in ("num_readers", "chunk_bytes", "staging_bytes"):
        value = rest.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
            raise UsageError(f"{FLAG}: {name} must be a positive integer, got {value!r}")
    for name in ("verify_hash", "distributed", "mmap", *LOADER_OPTIONS):
        if name in given and not isinstance(given[name], bool):
            raise UsageError(f"{FLAG}: {name} must be true or false, got {given[name]!r}")
    return LoaderOptions(
        TensorizerOptions.parse(rest), given, adopt=given.get("adopt", True), lease=given.get("lease", True)
    )


def _key(given: Mapping[str, Any]) -> Any:
    from ....crypto import EncryptionKey, Passphrase

    key_file, env = given.get("key_file"), given.get("passphrase_env")
    if key_file is not None and env is not None:
        raise UsageError(f"{FLAG}: give one of key_file and passphrase_env")
    if key_file is not None:
        if not isinstance(key_file, str):
            raise UsageError(f"{FLAG}: key_file must be a path, got {key_file!r}")
        return EncryptionKey.from_file(os.path.expanduser(key_file))
    if env is not None:
        text = os.environ.get(env, "") if isinstance(env, str) else ""
        if not text:
            raise UsageError(f"{FLAG}: passphrase_env names {env!r}, which is not set")
        return Passphrase(text)
    return None
