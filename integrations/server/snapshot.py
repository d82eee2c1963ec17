"""How the server keeps a local artifact's weights fixed while it serves: a read lease, or a sealed snapshot.

The default, :func:`take_lease`: the load maps ``model.tensors`` itself (no copy: the page cache's pages are the
tensors, as for a stock ``from_pretrained``), under a read lease (:mod:`hf_tensorizer.engine.lease`): a process that
later opens the file for writing, or truncates it, waits in the kernel while this one moves the mapped tensors into
private memory at the same addresses; nothing is copied unless that happens. While the imports run, a thread asks
the file into the page cache (:func:`prefetch`), so a cold file is there when the load maps it.

Where no lease can be had (another process has the file open for writing, a filesystem without leases, a short
``lease-break-time``) or with ``--no-lease``: the sealed snapshot below.

Why: a server scaled from zero spends most of its start in imports (torch, transformers, kserve), with the disk
idle. :class:`Snapshot` copies ``model.tensors`` into a ``memfd`` on a background thread started before those
imports, then seals it (``F_SEAL_WRITE | F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL``). The load then maps the
snapshot (the library's zero-copy ``mmap`` strategy, or its ``pread`` path when a cast copies anyway): the disk read
overlaps the imports, and the running model cannot change when the artifact file is rewritten or truncated in place
(what a mapping of the file itself allows: new bytes, or ``SIGBUS``), because nothing can write to a sealed memfd.

The snapshot is a shadow folder: the small files copied, ``model.tensors`` a symbolic link to the memfd's
``/proc/<pid>/fd/<n>``. After the load :meth:`Snapshot.close` closes the descriptor and removes the folder: the
memory lives as long as the model's tensors map it (with ``pread``, not at all).

Only for what it helps: a local folder holding ``model.tensors`` (no pipeline: its components are subfolders), CPU,
no encryption key (decrypting copies anyway), and no ``strategy`` chosen on the command line. This module imports
nothing heavy (no torch), so the copy starts within milliseconds of the process.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hf_tensorizer.engine.lease import FileLease

log = logging.getLogger("integrations.server")

WEIGHTS = "model.tensors"
MANIFEST = "hf_tensorizer.json"
REMOTE_MARKER_PREFIX = "hf_tensorizer"  # the cache's marker of a remote artifact: such a folder is not local
PIPELINE_INDEX = "model_index.json"
SEALS = ("F_SEAL_WRITE", "F_SEAL_SHRINK", "F_SEAL_GROW", "F_SEAL_SEAL")
_COPY_BYTES = 64 << 20
_SMALL_FILE_BYTES = 256 << 20  # a "small" file bigger than this is no config: linked, not copied


def take_lease(folder: str) -> tuple[FileLease | None, str | None]:
    """A read lease on ``folder``'s ``model.tensors`` (:class:`~hf_tensorizer.engine.lease.FileLease`), or
    ``(None, why not)``. Imports nothing heavy: callable before torch is."""
    from hf_tensorizer.engine.lease import FileLease
    from hf_tensorizer.errors import LeaseUnavailableError

    try:
        return FileLease.take(os.path.join(folder, WEIGHTS)), None
    except (LeaseUnavailableError, OSError) as exc:
        return None, str(exc)


def prefetch(path: str) -> threading.Thread:
    """Read ``path`` into the page cache from a daemon thread (``sendfile`` to ``/dev/null``: the kernel reads the
    file, nothing is copied to user memory), so that the disk works while the imports run. Best effort; returns the
    thread. A file already in the page cache (64 sampled pages) is left alone. Measured on the 2-core VM: a cold
    1.07 GB file in 0.3-0.9 s for 0.01-0.09 s of CPU. (``POSIX_FADV_WILLNEED`` read only its first 8 MB.)"""

    def run() -> None:
        from hf_tensorizer.engine.pagecache import read_into_cache, resident_fraction  # ctypes only: no torch

        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return
        try:
            size = os.fstat(fd).st_size
            if (resident_fraction(fd, size, samples=64) or 0.0) >= 1.0:
                return  # warm: nothing to read (a pass over cached pages would still cost ~0.07 s of CPU per GB)
            devnull = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
            try:
                read_into_cache(fd, devnull, 0, size)
            finally:
                os.close(devnull)
        except OSError:  # no sendfile to /dev/null here: the load reads the file itself
            pass
        finally:
            os.close(fd)

    thread = threading.Thread(target=run, name="weights-prefetch", daemon=True)
    thread.start()
    return thread


class SnapshotError(OSError):
    """The snapshot could not be taken (no memfd support, no memory, the file changed while copied)."""


def supported() -> bool:
    """Whether this platform has ``memfd_create`` and file seals (Linux)."""
    return hasattr(os, "memfd_create") and all(hasattr(fcntl, s) for s in SEALS) and hasattr(fcntl, "F_ADD_SEALS")


def reason_not_to(
    model_uri: str,
    *,
    loader: str,
    device: str,
    key_file: str | None,
    tensorizer_options: Mapping[str, Any],
    env: Mapping[str, str] | None = None,
) -> str | None:
    """Why the server should load ``model_uri`` without a snapshot, or ``None`` when it should take one.

    Args:
        model_uri: the ``--model-uri``.
        loader: ``hf_tensorizer`` or ``hf``.
        device: the ``--device``.
        key_file: the ``--key-file``.
        tensorizer_options: the ``--tensorizer-option`` values.
        env: the environment (``HF_TENSORIZER_KEY``); ``os.environ`` when ``None``.

    Returns:
        A short reason (for the log), or ``None``.
    """
    from hf_tensorizer.constants import KEY_ENV  # constants only: no torch

    env = os.environ if env is None else env
    if loader != "hf_tensorizer":
        return f"--loader {loader}"
    if not supported():
        return "no memfd_create / file seals on this platform"
    if "://" in model_uri:
        return "a URI (the weights stream from it)"
    if device != "cpu":
        return f"device {device} (the weights are copied to it anyway)"
    if key_file or env.get(KEY_ENV):
        return "an encryption key (decryption copies anyway)"
    if "strategy" in tensorizer_options or "mmap" in tensorizer_options:
        return "a strategy chosen with --tensorizer-option"
    if os.path.isfile(os.path.join(model_uri, PIPELINE_INDEX)):
        return "a diffusers pipeline (weights in component folders)"
    if not os.path.isfile(os.path.join(model_uri, WEIGHTS)):
        return f"no {WEIGHTS} in {model_uri}"
    return None


def _copy(src: int, dst: int, size: int) -> None:
    """Copy ``size`` bytes of ``src`` to ``dst`` in the kernel (``sendfile``), or by reads and writes."""
    offset = 0
    use_sendfile = hasattr(os, "sendfile")
    while offset < size:
        n = 0
        if use_sendfile:
            try:
                n = os.sendfile(dst, src, offset, min(_COPY_BYTES, size - offset))
            except OSError as exc:
                if exc.errno not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                    raise
                use_sendfile = False
                continue
        else:
            chunk = os.pread(src, min(_COPY_BYTES, size - offset), offset)
            n = os.pwrite(dst, chunk, offset) if chunk else 0
        if n == 0:
            raise SnapshotError(errno.EIO, f"the weights file ended at {offset} of {size} bytes while copied")
        offset += n


def seal_file(path: str, name: str = "hf_tensorizer-snapshot") -> int:
    """A sealed memfd holding a copy of ``path``; the caller owns (closes) the descriptor.

    Args:
        path: a regular file.
        name: the memfd's name (shown in ``/proc/<pid>/maps`` as ``/memfd:NAME (deleted)``).

    Returns:
        The memfd's descriptor, sealed against writes, growing, shrinking and further seal changes.

    Raises:
        SnapshotError: the file changed while it was copied (rewritten, truncated, replaced).
        OSError: the file cannot be read, or there is no memory for the copy.
    """
    src = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        before = os.fstat(src)
        os.posix_fadvise(src, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, before.st_size)  # sized once: a copy that cannot fit fails here or on a write
            _copy(src, fd, before.st_size)
            after = os.fstat(src)
            if (after.st_size, after.st_mtime_ns, after.st_ctime_ns) != (before.st_size, before.st_mtime_ns,
                                                                          before.st_ctime_ns):  # fmt: skip
                raise SnapshotError(errno.EAGAIN, f"{path} changed while it was copied")
            seals = 0
            for s in SEALS:
                seals |= getattr(fcntl, s)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
        except BaseException:
            os.close(fd)
            raise
    finally:
        os.close(src)
    return fd


class Snapshot:
    """A background copy of a local artifact folder: small files copied, ``model.tensors`` in a sealed memfd.

    Args:
        folder: the artifact folder (holding ``model.tensors``).

    Use: ``snap = Snapshot(folder); snap.start()`` early, then ``shadow = snap.wait()`` (a folder to load from),
    load, and ``snap.close()`` (the model's mapping keeps the memory while it lives).
    """

    def __init__(self, folder: str) -> None:
        self.folder = os.path.abspath(folder)
        self.fd: int | None = None
        self.shadow: str | None = None
        self.seconds: float | None = None
        self.size = 0
        self._error: BaseException | None = None
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> Snapshot:
        """Start the copy on a daemon thread; returns ``self``."""
        self._thread = threading.Thread(target=self._run, name="weights-snapshot", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        started = time.perf_counter()
        try:
            self._take()
        except BaseException as exc:  # reported by wait(); the server then reads the file itself
            self._error = exc
            self.close()
        self.seconds = time.perf_counter() - started
        self._done.set()

    def _take(self) -> None:
        shadow = tempfile.mkdtemp(prefix="hf_tensorizer-snapshot-")
        self.shadow = shadow
        for name in os.listdir(self.folder):  # the small files first: a config rewritten later cannot mismatch
            src = os.path.join(self.folder, name)
            if name == WEIGHTS or not os.path.isfile(src):
                continue
            dst = os.path.join(shadow, name)
            if os.path.getsize(src) > _SMALL_FILE_BYTES:  # another variant's weights: not what the server loads
                continue
            shutil.copyfile(src, dst)
        self.fd = seal_file(os.path.join(self.folder, WEIGHTS))
        self.size = os.fstat(self.fd).st_size
        # /proc/<pid>/fd/<n> opens the memfd itself (a new descriptor of the same sealed file)
        link = os.path.join(shadow, WEIGHTS)
        os.symlink(f"/proc/{os.getpid()}/fd/{self.fd}", link)
        if os.stat(link).st_size != self.size:  # no /proc (a sandbox): fail here, so the load reads the file
            raise SnapshotError(errno.ENOENT, f"{link} does not reach the snapshot")

    def wait(self, timeout: float | None = None) -> str:
        """The shadow folder, once the copy is done.

        Raises:
            SnapshotError: the copy failed (its cause chained) or did not finish within ``timeout``.
        """
        if not self._done.wait(timeout):
            raise SnapshotError(errno.ETIMEDOUT, "the weights snapshot did not finish in time")
        if self._error is not None:
            raise SnapshotError(errno.EIO, f"weights snapshot failed: {self._error}") from self._error
        assert self.shadow is not None
        return self.shadow

    @property
    def done(self) -> bool:
        """Whether the copy has ended (taken or failed)."""
        return self._done.is_set()

    def close(self) -> None:
        """Close the memfd and remove the shadow folder (tensors mapping the memfd keep its pages alive)."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        if self.shadow is not None:
            shutil.rmtree(self.shadow, ignore_errors=True)
            self.shadow = None


def seals_of(fd: int) -> set[str]:
    """The names of the seals set on ``fd`` (``F_SEAL_WRITE``...)."""
    got = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    return {s for s in SEALS if got & getattr(fcntl, s)}
