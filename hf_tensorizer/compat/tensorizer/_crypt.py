"""Whether encryption works here (upstream's ``tensorizer._crypt.available``): our crypto needs PyNaCl."""

from __future__ import annotations

try:
    import nacl.bindings  # noqa: F401

    available = True
except ImportError:  # pragma: no cover - pynacl is a declared extra
    available = False
