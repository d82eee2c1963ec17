"""One exception hierarchy for everything hf_tensorizer raises on bad input or failed I/O.

Every error derives from :class:`TensorizerError`, so callers can catch a single type. Messages say what
was wrong and where (tensor name, offset, URI); they never contain credentials.
"""

from __future__ import annotations


class TensorizerError(Exception):
    """Base class of every hf_tensorizer error."""


# --- format: the bytes of a file do not describe a valid artifact -------------------------------------


class FormatError(TensorizerError, ValueError):
    """The file is not a valid hf_tensorizer file (bad magic, header, index or layout)."""


class UnsupportedVersionError(FormatError):
    """The file was written by a newer format version or needs a feature this reader lacks."""


class TruncatedFileError(FormatError):
    """The file ends before the header, the index or a tensor's data does."""


class HeaderTooLargeError(FormatError):
    """The index is larger than the configured cap (protects against hostile headers)."""


class UnknownDtypeError(FormatError):
    """A tensor's dtype name is not one this reader knows."""


# --- integrity and security ------------------------------------------------------------------------


class IntegrityError(TensorizerError):
    """Stored bytes do not match their digest."""

    def __init__(self, message: str, *, tensors: list[str] | None = None) -> None:
        super().__init__(message)
        self.tensors: list[str] = list(tensors or [])


class HashMismatchError(IntegrityError):
    """A tensor's data does not match the digest recorded in the index."""


class IndexDigestError(IntegrityError):
    """The index bytes do not match the digest stored in the preamble."""


class EncryptionError(TensorizerError):
    """Encryption or decryption failed: wrong key, tampered ciphertext, or missing key."""


class DecryptionError(EncryptionError):
    """Ciphertext or authenticated metadata failed verification (wrong key or tampering)."""


class MissingKeyError(EncryptionError):
    """The file is encrypted and no key or passphrase was given."""

    def advise(self, how: str) -> MissingKeyError:
        """This error with its advice on passing a key replaced by ``how``.

        The library's message ends in ``: pass encryption=...``, the way a Python caller passes a key; the CLI, the
        server and ``from_pretrained`` call this to say how their own users pass one instead.

        Args:
            how: the advice, e.g. ``"give --key-file PATH"``.

        Returns:
            A new error (or this one, when its message gives no such advice).
        """
        head, sep, _ = str(self).partition(": pass ")
        return MissingKeyError(f"{head}: {how}") if sep else self


# --- sources and sinks -----------------------------------------------------------------------------


class SourceError(TensorizerError, OSError):
    """Reading from a location failed (file, HTTP, S3, Hub)."""


class SourceNotFoundError(SourceError, FileNotFoundError):
    """The file or object does not exist (also a ``FileNotFoundError``, as ``open()`` would raise)."""


class SourcePermissionError(SourceError, PermissionError):
    """The file or object may not be read (also a ``PermissionError``)."""


class SourceIsADirectoryError(SourceError, IsADirectoryError):
    """A directory was given where a file is read (also an ``IsADirectoryError``)."""


def source_error(message: str, exc: BaseException | None = None) -> SourceError:
    """A :class:`SourceError` for a failed read, of the subclass that matches the OS error behind it.

    ``except FileNotFoundError`` (or ``PermissionError``, ``IsADirectoryError``) then catches ours the way it
    catches ``open()``'s, while ``except SourceError`` keeps working.

    Args:
        message: what failed, naming the location.
        exc: the OS error behind it, if any.

    Returns:
        The error to raise (``raise source_error(msg, exc) from exc``).
    """
    for os_type, ours in _OS_SUBCLASSES:
        if isinstance(exc, os_type):
            return ours(message)
    return SourceError(message)


class InvalidURIError(SourceError, ValueError):
    """A URI is malformed or uses an unknown scheme."""


class ObjectChangedError(SourceError):
    """The object changed while it was being read (ETag, version or commit moved; a local file truncated in place)."""


class LeaseUnavailableError(SourceError):
    """A read lease on a local file could not be taken (no leases on this platform or filesystem, the file open for
    writing elsewhere, a kernel ``lease-break-time`` too short to move mapped tensors away): callers copy instead."""


class NetworkLimitError(SourceError):
    """A remote read broke a time rule: its deadline passed, the server asked to wait past it (Retry-After), or
    the bytes came slower than the minimum rate. The message names the URI and the option that sets the limit."""


class LoadTimeoutError(TensorizerError, TimeoutError):
    """A whole load ran past its time limit (the KServe predictor's ``--load-timeout``): something it waits on
    never answers. The server exits with status 1 and this message rather than stay unready."""


class ObjectTooLargeError(SourceError):
    """An object that is read whole (a config, a tokenizer, a shard index) is larger than the configured cap."""


_OS_SUBCLASSES: tuple[tuple[type[OSError], type[SourceError]], ...] = (
    (FileNotFoundError, SourceNotFoundError),
    (PermissionError, SourcePermissionError),
    (IsADirectoryError, SourceIsADirectoryError),
)


class SinkError(TensorizerError, OSError):
    """Writing to a destination failed; nothing partial was left behind."""


class DistributedError(TensorizerError):
    """A distributed load failed on another rank, or the ranks lost each other (a peer died or timed out)."""


# --- usage -----------------------------------------------------------------------------------------


class UsageError(TensorizerError, ValueError):
    """An argument combination is invalid (e.g. a key for a filter that matches nothing)."""


class ClosedError(UsageError):
    """The deserializer (or handle) was closed: it answers nothing any more, not even its keys."""
