"""Upstream tensorizer's ``torch_compat``: tensorizer as the tensor backend of ``torch.save`` / ``torch.load``.

Inside ``tensorizer_saving()``, ``torch.save(obj, "m.pt")`` pickles ``obj`` with every storage replaced by a
reference, and writes the storages' bytes to a sidecar file (``m.pt.tensors``) through our engine; inside
``tensorizer_loading()``, ``torch.load("m.pt")`` reads the sidecar once and puts the storages back. Storages shared
between tensors stay shared. The contexts are per thread and per task (context variables); ``torch.save`` /
``torch.load`` are swapped for wrappers while any context is open, and the wrappers behave exactly as stock where
none is open in the calling context.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import io
import logging
import os
import pickle
import threading
import types
from collections.abc import Callable, Iterable, Iterator
from contextvars import ContextVar
from typing import IO, Any

import torch

from .serialization import TensorDeserializer, TensorSerializer

__all__ = ("tensorizer_loading", "tensorizer_saving")

logger = logging.getLogger(__name__)

_FileLike = str | os.PathLike | IO[bytes]
_ORIG_TORCH_SAVE: Callable[..., Any] = torch.save
_ORIG_TORCH_LOAD: Callable[..., Any] = torch.load
_LOAD_WRAPPER_DEFAULT_MODULE: Any = None  # torch.load's default pickle_module since torch 1.13
_TAG = "TensorizerPickler"


class _Context:
    """One open ``tensorizer_saving`` / ``tensorizer_loading``: where the sidecar goes, and how to write/read it."""

    def __init__(self, file_obj: Any, func: Callable[..., Any] | None, kwargs: dict[str, Any],
                 suppress_weights_only: bool = False) -> None:  # fmt: skip
        self.file_obj, self.func, self.kwargs = file_obj, func, kwargs
        self.suppress_weights_only = suppress_weights_only

    def target(self, f: Any) -> Any:
        """The sidecar for the ``.pt`` file ``f``: the given one, a callback's answer, or ``f`` + ``.tensors``."""
        if self.file_obj is not None:
            return self.file_obj(f) if callable(self.file_obj) else self.file_obj
        if isinstance(f, io.BytesIO):
            logger.warning("cannot place a .tensors file next to an io.BytesIO: tensors stay in the pickle "
                           "(pass file_obj= to choose a location)")  # fmt: skip
            return None
        try:
            return os.fsdecode(f) + ".tensors"
        except TypeError:
            return os.fsdecode(f.name) + ".tensors"


_saving: ContextVar[_Context | None] = ContextVar("tensorizer_saving", default=None)
_loading: ContextVar[_Context | None] = ContextVar("tensorizer_loading", default=None)
_save_target: ContextVar[Any] = ContextVar("tensorizer_save_target", default=None)
_load_target: ContextVar[Any] = ContextVar("tensorizer_load_target", default=None)


def _own_storage(t: torch.Tensor) -> torch.Tensor:
    """``t`` with a storage of exactly its bytes (a view into a larger mapping is copied)."""
    if t.storage_offset() == 0 and t.untyped_storage().nbytes() == t.numel() * t.element_size():
        return t
    return t.clone()


class _Pickler(pickle.Pickler):
    """Pickles storages as references to the sidecar (``torch.save``'s own persistent ids come second)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._target = _save_target.get()
        self._tensors: list[torch.Tensor] = []
        self._ids: dict[tuple[Any, ...], int] = {}

    def _our_id(self, obj: Any) -> tuple[Any, ...] | None:
        if self._target is None or not torch.is_storage(obj):
            return None
        untyped = obj if isinstance(obj, torch.UntypedStorage) else obj._untyped_storage
        if untyped.device.type == "meta" or untyped.data_ptr() == 0:
            return None  # nothing to store: stock pickling keeps meta storages as they are
        key = (untyped.data_ptr(), untyped.device, untyped.nbytes())
        idx = self._ids.setdefault(key, len(self._tensors))
        if idx == len(self._tensors):
            self._tensors.append(torch.empty(0, dtype=torch.uint8, device=untyped.device).set_(untyped))
        dtype = None if isinstance(obj, torch.UntypedStorage) else obj.dtype
        return _TAG, 0, "storage", idx, dtype

    def persistent_id(self, obj: Any) -> Any:
        return self._our_id(obj)

    def __init_subclass__(cls, **kwargs: Any) -> None:  # torch.save subclasses us with its own persistent_id
        super().__init_subclass__(**kwargs)
        theirs = cls.__dict__.get("persistent_id")
        if theirs is not None:

            @functools.wraps(theirs)
            def persistent_id(self: _Pickler, obj: Any) -> Any:
                pid = _Pickler._our_id(self, obj)
                return pid if pid is not None else theirs(self, obj)

            cls.persistent_id = persistent_id  # type: ignore[method-assign]

    def dump(self, obj: Any) -> None:
        super().dump(obj)
        tensors, self._tensors, self._ids = self._tensors, [], {}
        if tensors and self._target is not None:
            ctx = _saving.get()
            kwargs = dict(ctx.kwargs) if ctx is not None else {}
            if ctx is not None and ctx.func is not None:
                ctx.func(self._target, tensors, kwargs)
                return
            serializer = TensorSerializer(self._target, **kwargs)
            serializer.write_state_dict(tensors)
            serializer.close()


class _Unpickler(pickle.Unpickler):
    """Resolves the sidecar references (read on the first one); other persistent ids go to ``torch.load``'s."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._target = _load_target.get()
        self._tensors: list[torch.Tensor] | None = None

    def _ours(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) >= 3 and pid[0] == _TAG) or self._target is None:
            raise pickle.UnpicklingError("unsupported persistent id encountered")
        if pid[1] != 0 or pid[2] != "storage":
            raise pickle.UnpicklingError(f"unsupported {_TAG} record {pid[1:3]!r}")
        idx, dtype = pid[3:5]
        if self._tensors is None:
            ctx = _loading.get()
            kwargs = dict(ctx.kwargs) if ctx is not None else {}
            if ctx is not None and ctx.func is not None:
                self._tensors = [_own_storage(t) for t in ctx.func(self._target, kwargs)]
            else:
                with TensorDeserializer(self._target, **kwargs) as d:
                    self._tensors = [_own_storage(t) for t in d.tree()]
        return torch.TypedStorage(wrap_storage=self._tensors[idx].untyped_storage(), dtype=dtype or torch.uint8,
                                  _internal=True)  # fmt: skip

    def persistent_load(self, pid: Any) -> Any:
        return self._ours(pid)

    def load(self) -> Any:
        try:
            return super().load()
        finally:
            self._tensors = None

    def __setattr__(self, key: str, value: Any) -> None:
        if key == "persistent_load":  # torch.load sets its own on the instance: ours is asked first
            theirs = value

            def persistent_load(pid: Any) -> Any:
                try:
                    return self._ours(pid)
                except pickle.UnpicklingError:
                    return theirs(pid)

            value = persistent_load
            if inspect.isgetsetdescriptor(pickle.Unpickler.__dict__.get("persistent_load")):
                pickle.Unpickler.persistent_load.__set__(self, value)  # the C unpickler caches it (< 3.13)
        super().__setattr__(key, value)


_pickle_module = types.ModuleType("tensorizer_pickle")
_pickle_module.__getattr__ = lambda name: getattr(pickle, name)  # type: ignore[method-assign]
_pickle_module.Pickler = _Pickler  # type: ignore[attr-defined]
_pickle_module.Unpickler = _Unpickler  # type: ignore[attr-defined]


def _refuse_other_pickle(pickle_module: Any) -> None:
    if pickle_module is not None and pickle_module is not pickle:
        raise ValueError("Tensorizer-based torch serialization is incompatible with a pickle_module other than pickle")


@functools.wraps(_ORIG_TORCH_SAVE)
def _save_wrapper(obj: object, f: _FileLike, pickle_module: Any = pickle, *args: Any, **kwargs: Any) -> Any:
    ctx = _saving.get()
    if ctx is None:
        return _ORIG_TORCH_SAVE(obj, f, pickle_module, *args, **kwargs)
    _refuse_other_pickle(pickle_module)
    token = _save_target.set(ctx.target(f))
    try:
        return _ORIG_TORCH_SAVE(obj, f, _pickle_module, *args, **kwargs)
    finally:
        _save_target.reset(token)


@functools.wraps(_ORIG_TORCH_LOAD)
def _load_wrapper(f: _FileLike, map_location: Any = None, pickle_module: Any = _LOAD_WRAPPER_DEFAULT_MODULE,
                  *args: Any, weights_only: bool | None = None, **kwargs: Any) -> Any:  # fmt: skip
    ctx = _loading.get()
    if ctx is None:
        return _ORIG_TORCH_LOAD(f, map_location, pickle_module, *args, weights_only=weights_only, **kwargs)
    _refuse_other_pickle(pickle_module)
    if ctx.suppress_weights_only:
        weights_only = False
    token = _load_target.set(ctx.target(f))
    try:
        return _ORIG_TORCH_LOAD(f, map_location, _pickle_module, *args, weights_only=weights_only, **kwargs)
    finally:
        _load_target.reset(token)


_lock = threading.Lock()
_open = {"save": 0, "load": 0}


@contextlib.contextmanager
def _installed(which: str, var: ContextVar[_Context | None], ctx: _Context) -> Iterator[None]:
    token = var.set(ctx)
    with _lock:
        _open[which] += 1
        if _open[which] == 1:
            setattr(torch, which, _save_wrapper if which == "save" else _load_wrapper)
    try:
        yield
    finally:
        with _lock:
            _open[which] -= 1
            if _open[which] == 0:
                setattr(torch, which, _ORIG_TORCH_SAVE if which == "save" else _ORIG_TORCH_LOAD)
        var.reset(token)


SaveFunc = Callable[[Any, Iterable[torch.Tensor], dict], Any]
LoadFunc = Callable[[Any, dict], Iterable[torch.Tensor]]


def tensorizer_saving(file_obj: Any = None, *, save_func: SaveFunc | None = None,
                      **kwargs: Any) -> contextlib.AbstractContextManager[None]:  # fmt: skip
    """``torch.save`` in this context writes tensor data to a sidecar ``.tensors`` file through our engine.

    Args:
        file_obj: the sidecar (anything ``TensorSerializer`` takes), or a callable ``f -> sidecar`` of the ``.pt``
            file; default: the ``.pt`` path + ``".tensors"``. A callable answering None keeps tensors in the pickle.
        save_func: ``save_func(file_obj, tensors, kwargs)`` writes the tensors instead of ``TensorSerializer``.
        **kwargs: ``TensorSerializer`` arguments (``encryption=``, ...).

    Returns:
        The context manager.
    """
    return _installed("save", _saving, _Context(file_obj, save_func, kwargs))


def tensorizer_loading(file_obj: Any = None, *, load_func: LoadFunc | None = None, suppress_weights_only: bool = False,
                       **kwargs: Any) -> contextlib.AbstractContextManager[None]:  # fmt: skip
    """``torch.load`` in this context reads tensor data from the sidecar written by :func:`tensorizer_saving`.

    Args:
        file_obj: the sidecar, or a callable ``f -> sidecar``; default: the ``.pt`` path + ``".tensors"``.
        load_func: ``load_func(file_obj, kwargs) -> tensors`` reads them instead of ``TensorDeserializer``.
        suppress_weights_only: turn ``weights_only=True`` into False (torch refuses it with a custom pickle module).
        **kwargs: ``TensorDeserializer`` arguments (``device=``, ``encryption=``, ...).

    Returns:
        The context manager.
    """
    return _installed("load", _loading, _Context(file_obj, load_func, kwargs, suppress_weights_only))
