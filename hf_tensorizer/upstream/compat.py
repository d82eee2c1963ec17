"""Upstream ``tensorizer.TensorDeserializer`` keyword arguments, translated into ours (docs/compat.md).

Code migrating from CoreWeave's tensorizer keeps its keyword dict and wraps it once::

    open_upstream("model.tensors", **compat_kwargs(lazy_load=True, filter_func=f, verify_hash=True))

The translation lives here, not in ``TensorDeserializer``'s signature, so the engine keeps one spelling per
option; the engine only recognises upstream spellings to point here (see ``engine.reader``). Accepted aliases:

- ``filter_func`` -> ``filter`` and ``lazy_load`` -> ``lazy``: same meaning, only the name differs.
- ``plaid_mode``, ``plaid_mode_buffers``: dropped. tensorizer 2.x itself ignores them ("left for backwards
  compatibility; has no effect"), so dropping them is what upstream does.
- ``encryption=DecryptionParams``: becomes ``Passphrase(params.source)`` (``from_string``) or
  ``EncryptionKey(params.key)`` (``from_key``).
- ``verify_hash``: kept; it means upstream's per-tensor CRC32/SHA-256, which :func:`.loading.open_upstream`
  checks (pass the result there, not to ``TensorDeserializer``).

``device``, ``dtype``, ``num_readers`` and every other ``TensorDeserializer`` argument pass through unchanged.
Anything else raises :class:`~hf_tensorizer.errors.UsageError`: an unknown keyword keeps failing loudly.
"""

from __future__ import annotations

import inspect
from typing import Any

from ..crypto.keys import EncryptionKey, Passphrase
from ..engine import TensorDeserializer
from ..errors import UsageError

#: upstream spelling -> ours (None: accepted and dropped, upstream ignores it too)
ALIASES: dict[str, str | None] = {
    "filter_func": "filter",
    "lazy_load": "lazy",
    "plaid_mode": None,
    "plaid_mode_buffers": None,
}


def _our_keys() -> frozenset[str]:
    params = inspect.signature(TensorDeserializer.__init__).parameters
    return frozenset(n for n, p in params.items() if p.kind is p.KEYWORD_ONLY) | {"device"}


def _translate_key(value: Any) -> Any:
    """An upstream ``DecryptionParams`` as our key; anything else unchanged (ours are checked by the engine)."""
    cls = type(value)
    if not cls.__module__.startswith("tensorizer") or cls.__name__ != "DecryptionParams":
        if cls.__module__.startswith("tensorizer"):
            raise UsageError(
                f"encryption= takes tensorizer's DecryptionParams (or our EncryptionKey / Passphrase), not "
                f"{cls.__name__}: DecryptionParams.from_key(params.key) or EncryptionKey(params.key)"
            )
        return value
    if getattr(value, "source", None) is not None:
        return Passphrase(value.source)
    if getattr(value, "key", None) is not None:
        return EncryptionKey(value.key)
    raise UsageError("DecryptionParams holds neither a key nor a passphrase")


def compat_kwargs(**kwargs: Any) -> dict[str, Any]:
    """Upstream ``TensorDeserializer`` keyword arguments as arguments of :func:`~.loading.open_upstream`.

    Args:
        **kwargs: upstream spellings (``filter_func``, ``lazy_load``, ``plaid_mode``, ``plaid_mode_buffers``,
            ``verify_hash``, ``encryption=DecryptionParams``) and/or ours (``device``, ``dtype``, ``filter``, ...).

    Returns:
        The same options in our spelling (pass them to ``open_upstream``; without ``verify_hash`` also to
        ``TensorDeserializer``).

    Raises:
        UsageError: an unknown keyword, or one option given in both spellings.
    """
    ours = _our_keys()
    out: dict[str, Any] = {}
    for name, value in kwargs.items():
        target = ALIASES.get(name, name)
        if name in ALIASES and target is None:
            continue  # plaid_mode*: no effect upstream either
        if target not in ours:
            raise UsageError(
                f"unknown keyword {name!r}: upstream spellings accepted are {sorted(ALIASES)}; ours are {sorted(ours)}"
            )
        if target in out:
            raise UsageError(f"{target!r} given twice (as {target!r} and as upstream's {name!r})")
        out[target] = _translate_key(value) if target == "encryption" else value
    return out
