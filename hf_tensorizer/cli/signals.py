"""SIGTERM handled like Ctrl-C, so an interrupted write cleans up after itself.

A Kubernetes Job, ``docker stop`` and systemd stop a process with SIGTERM, whose default action ends Python
at once: a local write would leave its ``<dest>.<random>.tmp`` file and an S3 write its multipart upload
(billed until a bucket lifecycle rule removes it). Raised as :class:`Terminated` (a ``KeyboardInterrupt``),
the signal unwinds the same path as Ctrl-C: the sinks abort (the temp file is removed, the multipart upload
aborted). SIGKILL cannot be caught; see ``hf-tensorizer serialize --help``.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived while a command ran."""


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """While the block runs, SIGTERM raises :class:`Terminated` in the main thread (once: a second SIGTERM during
    the clean-up is ignored, so the clean-up itself is not cut short). Does nothing off the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    fired = False

    def handler(signum: int, _frame: FrameType | None) -> None:
        nonlocal fired
        if not fired:
            fired = True
            raise Terminated(signal.Signals(signum).name)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
