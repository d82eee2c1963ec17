"""Progress users can see: a load or a save that runs past ``DELAY`` seconds shows a tqdm bar (bytes, GB/s).

Shown only where someone watches: stderr is a terminal, or the code runs in a Jupyter kernel.
``HF_HUB_DISABLE_PROGRESS_BARS=1`` and huggingface_hub's ``disable_progress_bars()`` turn it off, like the Hub's own
bars; ``HF_TENSORIZER_PROGRESS=1`` shows it anywhere (logs included), ``=0`` never. Nothing is drawn for the first
``DELAY`` seconds, so the many short loads of a test suite or of a small model print nothing.

Bytes done come from where the bytes go: for a remote source a counter on its reads (:func:`counted`), for a local
file the process's read counter (``rchar`` in ``/proc/self/io``: ``pread``, ``O_DIRECT`` and the page-cache
read-through's ``sendfile`` all count). Page faults on an already cached mapping count nowhere, so a warm mapped
load is not tracked at all (``TensorDeserializer._load_mmap`` tracks only a cold read-through or a digest check):
it creates no bar and starts no drawing thread.

One daemon thread draws every bar of the process, waking ``REFRESH`` times a second only while a load or save runs.
"""

from __future__ import annotations

import _thread
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any, TypeVar

from ..constants import PROGRESS_ENV
from ..sources.base import Source

T = TypeVar("T")

#: seconds a load or save runs before its bar appears
DELAY = 2.0
#: seconds between two redraws
REFRESH = 0.25


def enabled() -> bool:
    """Whether a bar may be shown now (see the module docstring for the rules)."""
    value = os.environ.get(PROGRESS_ENV, "").strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    if os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS", "").strip().upper() in ("1", "ON", "YES", "TRUE"):
        return False  # read here too: huggingface_hub reads it once, at its import
    try:
        from huggingface_hub.utils import are_progress_bars_disabled
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        pass
    else:
        if are_progress_bars_disabled():  # HF_HUB_DISABLE_PROGRESS_BARS or disable_progress_bars()
            return False
    return _in_notebook() or _is_tty(sys.stderr)


def _is_tty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # None, or a closed stream
        return False


def _in_notebook() -> bool:
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None and hasattr(ipython, "get_ipython") else None
    return shell is not None and hasattr(shell, "kernel")  # a Jupyter kernel, not the terminal IPython


class Progress:
    """One load's or save's bar, drawn by the shared thread once it has run ``DELAY`` seconds.

    Args:
        desc: the bar's label (``"loading"``, ``"serializing"``).
        total: bytes the whole operation moves.
        done: bytes done so far, polled by the drawing thread; without it, :meth:`update` adds them up.
        show: ``True`` shows the bar (after ``DELAY``) whatever :func:`enabled` says, ``False`` never; ``None``
            asks :func:`enabled` when the delay is over.
    """

    def __init__(self, desc: str, total: int, done: Callable[[], int] | None = None, show: bool | None = None) -> None:
        self.desc, self.total, self.show = desc, total, show
        self._done = done
        self._n = 0
        self._start = time.monotonic()
        self._bar: Any = None
        self._lock = threading.Lock()
        self._closed = False
        if show is not False and total > 0:
            _register(self)

    @property
    def n(self) -> int:
        """Bytes done so far, at most :attr:`total`."""
        return min(self.total, self._done() if self._done is not None else self._n)

    def update(self, n: int) -> None:
        """Count ``n`` more bytes done (for callers without a ``done`` callable)."""
        self._n += n

    def _draw(self, now: float) -> None:
        with self._lock:
            if self._closed:
                return
            if self._bar is None:
                if now - self._start < DELAY:
                    return
                if not (self.show or (self.show is None and enabled())):
                    self._closed = True  # decided once: nobody watches this one
                    return
                self._bar = _tqdm(self.total, self.desc)
            self._bar.update(self.n - self._bar.n)

    def close(self) -> None:
        """Finish the bar (at its final count) if it was shown, and stop drawing it. Idempotent."""
        with self._lock:
            bar, self._bar, self._closed = self._bar, None, True
            if bar is not None:
                bar.update(self.n - bar.n)
                bar.close()
        _unregister(self)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _tqdm(total: int, desc: str) -> Any:
    from importlib.util import find_spec

    # tqdm.auto picks the notebook widget in Jupyter, which without ipywidgets prints "IProgress not found"
    tqdm = __import__("tqdm.auto" if find_spec("ipywidgets") else "tqdm.std", fromlist=["tqdm"]).tqdm
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1000, desc=desc, mininterval=REFRESH)


# ---- the drawing thread -------------------------------------------------------------------------------------

_active: list[Progress] = []
_wake = threading.Condition()
_drawing: list[bool] = []  # [True] once the drawing thread runs (it never ends: it sleeps while nothing is active)


def _register(p: Progress) -> None:
    with _wake:
        _active.append(p)
        if not _drawing:
            _drawing.append(True)
            # not threading.Thread.start(): it waits until the new thread has been scheduled, 2-5 ms on busy cores,
            # on every first load of a process (a warm mapped load takes about that much in all)
            _thread.start_new_thread(_draw_loop, ())
        _wake.notify()


def _unregister(p: Progress) -> None:
    with _wake:
        if p in _active:
            _active.remove(p)


def _draw_loop() -> None:
    while True:
        with _wake:
            while not _active:
                _wake.wait()
            bars = list(_active)
        now = time.monotonic()
        for p in bars:
            try:
                p._draw(now)
            except Exception:  # a display problem (a closed stderr) must never break a load
                p._closed = True
            if p._closed:
                _unregister(p)
        time.sleep(REFRESH)


# ---- where the bytes of a load are counted ------------------------------------------------------------------


class CountingSource(Source):
    """A remote source that counts the bytes read through it (everything else is the wrapped source's)."""

    def __init__(self, inner: Source) -> None:
        self.inner = inner
        self.bytes_read = 0  # updated from several threads without a lock: a display figure only

    def read_into(self, offset: int, buf: memoryview) -> None:
        self.inner.read_into(offset, buf)
        self.bytes_read += len(buf)

    def read_into_many(self, offset: int, bufs: Sequence[memoryview]) -> None:
        self.inner.read_into_many(offset, bufs)
        self.bytes_read += sum(len(b) for b in bufs)

    def deferred_checks(self) -> AbstractContextManager[None]:
        return self.inner.deferred_checks()

    def fileno(self) -> int | None:
        return self.inner.fileno()

    def direct_fileno(self) -> int | None:
        return self.inner.direct_fileno()

    def close(self) -> None:
        self.inner.close()

    @property
    def preferred_concurrency(self) -> int:  # type: ignore[override]
        return self.inner.preferred_concurrency

    @property
    def preferred_chunk_bytes(self) -> int | None:  # type: ignore[override]
        return self.inner.preferred_chunk_bytes

    def __getattr__(self, name: str) -> Any:  # uri, size and each transport's own attributes
        return getattr(self.inner, name)


def counted(source: Source) -> Source:
    """``source`` with a read counter when it is remote (a local file is counted by the kernel instead)."""
    return source if source.fileno() is not None else CountingSource(source)


def _rchar() -> int | None:
    try:
        with open("/proc/self/io", "rb") as f:
            for line in f:
                if line.startswith(b"rchar:"):
                    return int(line.split()[1])
    except (OSError, ValueError):  # not Linux, or /proc not mounted
        pass
    return None


def tracked(source: Source, total: int, load: Callable[[], T]) -> T:
    """Run ``load``, one load of ``total`` bytes from ``source`` (as :func:`counted` returned it), under a bar.

    Returns:
        What ``load`` returns.
    """
    if isinstance(source, CountingSource):
        start = source.bytes_read
        done: Callable[[], int] = lambda: source.bytes_read - start  # noqa: E731
    else:
        first = _rchar()
        done = (lambda: (_rchar() or 0) - first) if first is not None else (lambda: 0)  # type: ignore[operator]
    with Progress("loading", total, done) as p:
        out = load()
        p._done = lambda: total  # finished: page faults on a cached mapping are counted nowhere
    return out
