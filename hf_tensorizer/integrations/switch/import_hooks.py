"""Run a callback right after a module is first imported.

:func:`hf_tensorizer.enable` patches classes of libraries a program may never import (diffusers, transformers'
processor families). Importing them up front would cost every program their import time (0.3 s for diffusers,
1.5 s for the processors); patching only what is already imported would leave a class imported *after*
``enable()`` unpatched. So ``enable()`` patches what is loaded now and registers a callback that patches the
rest when its module is imported.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import logging
import sys
import threading
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

log = logging.getLogger(__name__)


class _Finder(importlib.abc.MetaPathFinder):
    """A meta path finder that finds nothing itself: for a watched name it asks the other finders and wraps
    the spec's loader so the callback runs once the module has executed."""

    def __init__(self) -> None:
        self.callbacks: dict[str, Callable[[], None]] = {}
        self.lock = threading.Lock()

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        with self.lock:
            callback = self.callbacks.get(fullname)
        if callback is None:
            return None
        spec = None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        spec.loader = _Loader(spec.loader, fullname, callback)
        return spec


class _Loader(importlib.abc.Loader):
    """Delegates to the real loader, then runs the callback (a failing callback is logged, not raised: the
    user's import must not break because a hook could not be installed)."""

    def __init__(self, loader: Any, name: str, callback: Callable[[], None]) -> None:
        self.loader, self.name, self.callback = loader, name, callback

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.loader.create_module(spec)  # type: ignore[no-any-return]

    def exec_module(self, module: ModuleType) -> None:
        self.loader.exec_module(module)
        _forget(self.name)  # done once: the finder leaves sys.meta_path when nothing is left to watch
        try:
            self.callback()
        except Exception:
            log.warning("hf_tensorizer could not patch %s after it was imported", self.name, exc_info=True)

    def __getattr__(self, name: str) -> Any:  # get_source, is_package, get_resource_reader, ...
        return getattr(self.loader, name)


_finder = _Finder()


def after_import(names: Sequence[str], callback: Callable[[], None]) -> None:
    """Run ``callback`` right after any module of ``names`` that is not imported yet gets imported.

    Modules already in ``sys.modules`` are skipped: the caller handles those now.
    """
    with _finder.lock:
        for name in names:
            if name not in sys.modules:
                _finder.callbacks[name] = callback
        if _finder.callbacks and _finder not in sys.meta_path:
            sys.meta_path.insert(0, _finder)


def _forget(name: str) -> None:
    with _finder.lock:
        _finder.callbacks.pop(name, None)
        if not _finder.callbacks and _finder in sys.meta_path:
            sys.meta_path.remove(_finder)


def cancel() -> None:
    """Forget every pending callback and leave ``sys.meta_path`` as it was."""
    with _finder.lock:
        _finder.callbacks.clear()
        if _finder in sys.meta_path:
            sys.meta_path.remove(_finder)
