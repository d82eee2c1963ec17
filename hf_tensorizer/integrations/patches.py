"""One registry of the attributes hf_tensorizer replaces on transformers, diffusers and peft classes (and on the
few modules that bind a patched function by name, e.g. peft's ``load_peft_weights``).

``enable()`` records every replacement here and ``disable()`` undoes them all, in reverse order; patched code and
:class:`~hf_tensorizer.integrations.mixin.TensorizerMixin` call the stock implementation through :func:`stock`,
which is the attribute as it was before any patch.

Every replacement looks like the stock function from outside: :func:`replace` gives it the stock one's name, doc,
``__wrapped__`` and ``__signature__`` (``functools.update_wrapper``, on a private copy of the replacement's
function). Libraries inspect the signatures of each other's methods: diffusers passes ``variant=`` and
``safe_serialization=`` to a component's ``save_pretrained`` only when ``inspect.signature`` lists them.
"""

from __future__ import annotations

import functools
import inspect
import threading
import types
from types import ModuleType
from typing import Any

_lock = threading.RLock()
# (class or module, attribute, original value in its __dict__), in order
_saved: list[tuple[type | ModuleType, str, Any]] = []


def replace(owner: type | ModuleType, name: str, new: Any) -> None:
    """Set ``owner.name = new`` (``new`` as it should sit in the class ``__dict__``), remembering the original once.

    A function replacing a function (each possibly a ``classmethod`` / ``staticmethod``) takes the stock one's
    signature, name and docstring (see the module docstring); ``new`` itself is left untouched.
    """
    with _lock:
        if not is_patched(owner, name):
            _saved.append((owner, name, owner.__dict__[name]))
        setattr(owner, name, looking_like(new, stock(owner, name)))


def looking_like(new: Any, orig: Any) -> Any:
    """``new`` dressed as ``orig``: the stock function's name, docstring, ``__wrapped__`` and signature, on a copy of
    ``new``'s function (same descriptor kind as ``new``); ``new`` itself is left untouched.

    Args:
        new: the replacement, a function, ``classmethod`` or ``staticmethod``.
        orig: the stock attribute it stands for.

    Returns:
        The dressed copy, or ``new`` unchanged when either is not a plain Python function.
    """
    new_fn, orig_fn = _function_of(new), _function_of(orig)
    if not isinstance(new_fn, types.FunctionType) or not callable(orig_fn):
        return new
    try:
        signature = inspect.signature(orig_fn)
    except (TypeError, ValueError):  # a builtin without one: nothing to keep
        return new
    fn = types.FunctionType(new_fn.__code__, new_fn.__globals__, new_fn.__name__, new_fn.__defaults__,
                            new_fn.__closure__)  # fmt: skip
    fn.__kwdefaults__ = new_fn.__kwdefaults__
    fn.__dict__.update(new_fn.__dict__)
    functools.update_wrapper(fn, orig_fn)
    fn.__signature__ = signature  # type: ignore[attr-defined]
    if isinstance(new, classmethod):
        return classmethod(fn)
    if isinstance(new, staticmethod):
        return staticmethod(fn)
    return fn


def _function_of(value: Any) -> Any:
    return value.__func__ if isinstance(value, (classmethod, staticmethod)) else value


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
