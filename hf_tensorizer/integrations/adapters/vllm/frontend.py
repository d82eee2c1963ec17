"""``vllm serve ARTIFACT --load-format hf_tensorizer`` with ARTIFACT a URI or a bare Hub id: the small files first.

vLLM reads the model's config and tokenizer in its front-end process, before any loader runs, and only knows
local folders and Hub repositories (``s3://``, ``gs://`` and ``az://`` it hands to the Run:ai streamer's own
fetcher; ``http(s)://`` and ``hf://`` fail in transformers' config lookup). vLLM runs general plugins before it
parses its command line, so in that process the plugin resolves the artifact with the project's artifact cache
(:func:`~hf_tensorizer.integrations.resolve`: every file but the weights, at the versions the manifest pinned)
and puts the local folder in the command line's place of ARTIFACT, adding ``--served-model-name ARTIFACT`` when
none is given, so clients still name the model as given. vLLM's own processes get the folder in its config; the
folder's marker names the remote weights, which the workers stream from the source, never copied to disk.

Python callers of ``vllm.LLM`` have no command line to read: they use :func:`engine_args`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any

from ....sources.uri import looks_like_uri, redact
from .options import FLAG, LOGGER, parse_extra_config

LOAD_FORMAT = "hf_tensorizer"
_DONE_ENV = "HF_TENSORIZER_VLLM_RESOLVED"  # set for the processes vLLM starts: resolved once, in the front-end
_LORA_DONE_ENV = "HF_TENSORIZER_VLLM_LORAS"  # the same for --lora-modules


def _value(argv: Sequence[str], flag: str) -> tuple[int, str] | None:
    """(position, value) of ``flag VALUE`` or ``flag=VALUE`` in ``argv``."""
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            return i + 1, argv[i + 1]
        if arg.startswith(flag + "="):
            return i, arg[len(flag) + 1 :]
    return None


def _model(argv: Sequence[str]) -> tuple[int, str] | None:
    """(position, model) of ``--model M`` / ``--model=M``, or of ``vllm serve M``'s positional model."""
    found = _value(argv, "--model")
    if found is None and "serve" in argv:
        i = list(argv).index("serve") + 1
        if i < len(argv) and not argv[i].startswith("-"):
            found = i, argv[i]
    return found


def serve_arguments(argv: Sequence[str]) -> tuple[str, str | None] | None:
    """``(model, extra config JSON)`` of a ``vllm serve`` command line that loads with ``hf_tensorizer``, else
    None (another load format, or not a serve command)."""
    load_format = _value(argv, "--load-format")
    model = _model(argv)
    if load_format is None or load_format[1] != LOAD_FORMAT or model is None:
        return None
    extra = _value(argv, FLAG)
    return model[1], None if extra is None else extra[1]


def _hub_uri(model: str) -> str | None:
    """The ``hf://`` URI of ``model`` when it is a bare Hub id of a tensorized artifact."""
    from ...artifact.hub_ids import route_hub_id

    routed = route_hub_id(model, {})  # one HEAD of the manifest, or the local HF cache
    return routed if routed != model else None


def needs_resolution(model: str) -> bool:
    """Whether vLLM cannot read ``model``'s config itself: a URI, or a bare Hub id of a tensorized artifact (its
    small files then come from one pinned commit, the one the weights are read at)."""
    return looks_like_uri(model) or _hub_uri(model) is not None


def local_folder(model: str, extra_config: Any = None) -> str:
    """The local folder holding ``model``'s small files (``model`` itself when it is a local folder).

    Args:
        model: a local artifact folder, a URI, or a bare Hub id of a tensorized artifact.
        extra_config: the ``--model-loader-extra-config`` object or JSON (its transport options are used).

    Raises:
        UsageError: a bad extra config.
        SourceError / ObjectChangedError / FormatError: the artifact's files cannot be fetched.
    """
    from ...artifact.cache import resolve

    options = parse_extra_config(extra_config)
    uri = model if looks_like_uri(model) else _hub_uri(model) or model
    return resolve(uri, **options.transport)


def engine_args(artifact: str, extra_config: dict[str, Any] | None = None, **kwargs: Any) -> dict[str, Any]:
    """Keyword arguments for ``vllm.LLM`` / ``EngineArgs`` that serve ``artifact`` with ``hf_tensorizer``.

    Args:
        artifact: a local artifact folder, a URI, or a bare Hub id of a tensorized artifact.
        extra_config: the loader options (``--model-loader-extra-config``).
        **kwargs: further ``LLM`` arguments, passed through.

    Returns:
        ``{"model": local folder, "load_format": "hf_tensorizer", "model_loader_extra_config": ...,
        "served_model_name": artifact, **kwargs}``.

    Raises:
        UsageError / SourceError / FormatError: see :func:`local_folder`.
    """
    folder = local_folder(artifact, extra_config) if needs_resolution(artifact) else artifact
    return {"model": folder, "load_format": LOAD_FORMAT, "model_loader_extra_config": extra_config or {},
            "served_model_name": artifact, **kwargs}  # fmt: skip


def resolve_command_line(argv: list[str] | None = None) -> str | None:
    """In a ``vllm serve ... --load-format hf_tensorizer`` front-end: check the extra config, resolve a remote
    ARTIFACT and put its local folder in ``argv`` (``sys.argv`` by default, changed in place; see the module doc),
    then open every weight file's index (:func:`~.loader.preflight`). Returns the folder, or None when there was
    nothing to resolve.

    Raises:
        UsageError / SourceError / FormatError / MissingKeyError / DecryptionError: the load would fail; vLLM
            start-up stops with this error before its engine starts.
    """
    if os.environ.get(_DONE_ENV):  # a process vLLM started: its front-end did this already
        return None
    argv = sys.argv if argv is None else argv
    found = serve_arguments(argv)
    if found is None:
        return None
    model, extra = found
    from .loader import preflight

    options = parse_extra_config(extra)  # a bad extra config stops the front-end before anything is fetched
    os.environ[_DONE_ENV] = "1"
    if not needs_resolution(model):
        preflight(model, options)
        return None
    folder = local_folder(model, extra)
    position = _model(argv)
    assert position is not None
    i, _ = position
    argv[i] = f"--model={folder}" if argv[i].startswith("--model=") else folder
    if _value(argv, "--served-model-name") is None:
        argv += ["--served-model-name", model]
    _log_resolved(model, folder)
    preflight(folder, options)
    return folder


def resolve_loras(argv: list[str] | None = None) -> list[str]:
    """In a front-end: rewrite ``--lora-modules`` entries naming tensorized adapters to local folders vLLM reads
    (:func:`~.lora.resolve_lora_modules`; with the transport options of ``--model-loader-extra-config`` when the
    load format is ours), and register the LoRA resolver when ``HF_TENSORIZER_LORA_ROOT`` is set. Returns the
    names of the adapters rewritten.

    Raises:
        UsageError / SourceError / FormatError / MissingKeyError / DecryptionError: an adapter cannot be read.
    """
    from .lora import ROOT_ENV, register_resolver, resolve_lora_modules

    argv = sys.argv if argv is None else argv
    ours = serve_arguments(argv)
    extra = ours[1] if ours is not None else None
    resolver = register_resolver(extra)  # in every process: vLLM's API servers ask it
    if os.environ.get(_LORA_DONE_ENV):
        return []
    os.environ[_LORA_DONE_ENV] = "1"
    if resolver:
        _log(f"hf_tensorizer: LoRA adapters by name from {redact(os.environ[ROOT_ENV])}")
    names = resolve_lora_modules(argv, extra)
    for name in names:
        _log(f"hf_tensorizer: LoRA adapter {name} read into a local folder for vLLM's LoRA loader")
    return names


def _log_resolved(model: str, folder: str) -> None:
    _log(f"hf_tensorizer: {redact(model)} resolved to {folder} (configs and tokenizer; weights stream from the source)")


def _log(msg: str) -> None:
    import logging

    log = logging.getLogger(LOGGER)
    if log.hasHandlers() and log.isEnabledFor(logging.INFO):
        log.info(msg)
    else:  # the front-end configures vLLM's logging only after it parsed the command line, i.e. after this
        print(f"INFO {msg}", file=sys.stderr, flush=True)
