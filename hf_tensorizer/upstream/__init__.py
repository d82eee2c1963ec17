"""Everything about files written by CoreWeave's upstream ``tensorizer``, in one place.

- :mod:`.format` — the format facts: bytes -> validated index (pure; sans-I/O), and the per-tensor hashes;
- :mod:`.crypto` — key derivation (raw keys, Argon2id passphrases) and the decrypting transform;
- :mod:`.loading` — :func:`open_upstream` and :func:`verify_upstream` over the engine;
- :mod:`.compat` — :func:`compat_kwargs`: upstream ``TensorDeserializer`` keyword spellings translated into ours.

Upstream files are recognised by their first bytes wherever a file is read, so ``TensorDeserializer``,
``read_index`` and ``from_pretrained`` open them directly; the engine asks :mod:`.crypto` for the transform of an
encrypted one. ::

    TensorDeserializer("model.tensors")                                 # upstream, plain
    TensorDeserializer("model.tensors", encryption=EncryptionKey(raw))  # upstream, EncryptionParams.random()
    TensorDeserializer("model.tensors", encryption=Passphrase("pw"))    # upstream, EncryptionParams.from_string
    open_upstream("model.tensors", verify_hash=True)                    # + upstream's CRC32/SHA-256 checks

See docs/compat.md. This package's ``__init__`` imports nothing eagerly, so the format layer can use
:mod:`.format` without pulling in the engine.
"""

from __future__ import annotations

from typing import Any

__all__ = ["UpstreamIndex", "compat_kwargs", "is_upstream", "open_upstream", "upstream_transform", "verify_upstream"]

_WHERE = {
    "UpstreamIndex": "format",
    "compat_kwargs": "compat",
    "upstream_transform": "crypto",
    "is_upstream": "loading",
    "open_upstream": "loading",
    "verify_upstream": "loading",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
