"""One registry of the attributes hf_tensorizer replaces on transformers, diffusers and peft classes (and on the
few modules that bind a patched function by name, e.g. peft's ``load_peft_weights``).

``enable()`` records every replacement here and ``disable()`` undoes them all, in reverse order; patched code and
:class:`~hf_tensorizer.integrations.mixin.TensorizerMixin` call the stock implementation through :func:`stock`,
which is the attribute as it was before any patch.
"""

from __future__ import annotations

import threading
from types import ModuleType
from typing import Any

_lock = threading.RLock()
# (class or module, attribute, original value in its __dict__), in order
_saved: list[tuple[type | ModuleType, str, Any]] = []


def replace(owner: type | ModuleType, name: str, new: Any) -> None:
    """Set ``owner.name = new`` (``new`` as it should sit in the class ``__dict__``), remembering the original once."""
    with _lock:
        if not is_patched(owner, name):
            _saved.append((owner, name, owner.__dict__[name]))
        setattr(owner, name, new)


def is_patched(owner: type | ModuleType, name: str) -> bool:
    """Whether ``owner.name`` is currently replaced."""
    return any(o is owner and n == name for o, n, _ in _saved)


def stock(owner: type | ModuleType, name: str) -> Any:
    """``owner.__dict__[name]`` as it was before any patch (a ``classmethod``/``staticmethod`` object stays one)."""
    with _lock:
        for o, n, orig in _saved:
            if o is owner and n == name:
                return orig
        return owner.__dict__[name]


def patched_classes() -> set[type | ModuleType]:
    """The classes with at least one replaced attribute."""
    return {o for o, _, _ in _saved}


def restore(module_prefix: str = "") -> None:
    """Put back every original (of classes whose module starts with ``module_prefix``), newest first."""
    with _lock:
        keep = []
        for owner, name, orig in reversed(_saved):
            if _module_of(owner).startswith(module_prefix):
                setattr(owner, name, orig)
            else:
                keep.append((owner, name, orig))
        _saved[:] = reversed(keep)


def _module_of(owner: type | ModuleType) -> str:
    return owner.__name__ if isinstance(owner, ModuleType) else owner.__module__
