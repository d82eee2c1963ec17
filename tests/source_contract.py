"""The contract every :class:`~hf_tensorizer.sources.Source` meets, written once and mixed into each transport's tests.

Like fsspec's abstract test classes: :class:`SourceContract` is not collected by pytest (its name does not start with
``Test``); a transport's test module subclasses it as ``Test<Transport>SourceContract`` and provides the one abstract
fixture, ``transport`` (a :class:`Transport`: puts bytes at a fresh location on that transport's server and opens
them with :func:`~hf_tensorizer.sources.open_source`), plus two class attributes saying what the transport does
when an object is replaced under an open source, and whether it is a local file.
"""

from __future__ import annotations

import abc
import random
import threading
from collections.abc import Callable, Iterator
from typing import ClassVar
from urllib.parse import urlsplit

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hf_tensorizer.errors import ObjectChangedError, SourceError, TensorizerError, TruncatedFileError, UsageError
from hf_tensorizer.sources import Source

SIZE = 300_001  # larger than 1.5 parts for the remote transports (PART below), so big reads are split
PART = 64 << 10
# retries quick, big reads split into parts, for the remote transports' options
REMOTE_OPTIONS = {"backoff": 0.01, "max_backoff": 0.05, "retries": 3, "timeout": 5, "part_size": PART, "concurrency": 4}


def payload(n: int, seed: int = 0) -> bytes:
    """``n`` reproducible random bytes (never all zeros, so a buffer left untouched is caught)."""
    return random.Random(seed).randbytes(n)


class Transport(abc.ABC):
    """Places objects on one transport's (local) server and opens them.

    Attributes:
        secrets: credentials the transport was given; none may appear in a source's ``uri`` or ``repr``.
    """

    secrets: tuple[str, ...] = ()

    @abc.abstractmethod
    def put(self, data: bytes) -> str:
        """Store ``data`` at a fresh location; returns the URI (or path) that opens it."""

    @abc.abstractmethod
    def missing(self) -> str:
        """A URI of an object that does not exist (in a bucket / repository / directory that does)."""

    def replace(self, uri: str, data: bytes) -> None:
        """Replace the object at ``uri`` with ``data`` (the way that transport's writers replace objects)."""
        raise NotImplementedError(f"{type(self).__name__} cannot replace objects")

    @abc.abstractmethod
    def open(self, uri: str) -> Source:
        """``open_source(uri, **options)`` with the options this transport needs for the test server."""


class SourceContract:
    """The contract tests; subclass as ``Test<Transport>SourceContract`` and override the ``transport`` fixture."""

    #: what a read does after the object was replaced under an open source: ``"pinned"`` (the old bytes: the
    #: transport pins a version or holds the old file), ``"changed"`` (:class:`ObjectChangedError`), or None when
    #: the test server cannot replace objects
    on_replace: ClassVar[str | None] = None
    #: a local file (``fileno()`` is a descriptor) rather than a remote object (``fileno()`` is None)
    local: ClassVar[bool] = False

    @pytest.fixture
    def transport(self) -> Transport:
        raise NotImplementedError("a SourceContract subclass must provide the `transport` fixture")

    @pytest.fixture
    def make_source(self, transport: Transport) -> Iterator[Callable[[bytes], Source]]:
        """``make_source(data)``: ``data`` put at a fresh location and opened; closed at the end of the test."""
        opened: list[Source] = []

        def make(data: bytes) -> Source:
            src = transport.open(transport.put(data))
            opened.append(src)
            return src

        yield make
        for src in opened:
            src.close()

    @pytest.fixture
    def data(self) -> bytes:
        return payload(SIZE)

    @pytest.fixture
    def source(self, make_source: Callable[[bytes], Source], data: bytes) -> Source:
        return make_source(data)

    # --- identity ----------------------------------------------------------------------------------------

    def test_size_equals_the_object_length(self, source: Source, data: bytes) -> None:
        assert isinstance(source.size, int)
        assert source.size == len(data)

    def test_uri_carries_no_credentials(self, source: Source, transport: Transport) -> None:
        assert isinstance(source.uri, str) and source.uri
        if "://" in source.uri:
            parts = urlsplit(source.uri)
            assert parts.password is None, source.uri
            assert not parts.query, source.uri
        for secret in transport.secrets:
            assert secret not in source.uri
            assert secret not in repr(source)

    def test_preferred_concurrency_is_a_positive_int(self, source: Source) -> None:
        assert isinstance(source.preferred_concurrency, int)
        assert source.preferred_concurrency >= 1

    def test_fileno_only_for_local_files(self, source: Source) -> None:
        fd = source.fileno()
        direct = source.direct_fileno()
        if self.local:
            assert isinstance(fd, int) and fd >= 0
        else:
            assert fd is None
        assert direct is None or (isinstance(direct, int) and direct >= 0)
        if fd is None:
            assert direct is None, "an O_DIRECT descriptor without a plain one"

    # --- reads ---------------------------------------------------------------------------------------------

    def test_read_into_at_start_middle_last_byte_and_to_the_end(self, source: Source, data: bytes) -> None:
        n = len(data)
        cases = {
            "start": (0, 1000),
            "middle": (n // 2 - 777, 1555),
            "last byte": (n - 1, 1),
            "exactly to the end": (n - 5000, 5000),
            "whole object (split into parts)": (0, n),
            "across part boundaries": (PART - 3, 2 * PART + 7),
        }
        for name, (offset, length) in cases.items():
            buf = bytearray(b"\xa5" * (length + 2))  # a guard byte either side: nothing written outside the view
            source.read_into(offset, memoryview(buf)[1 : 1 + length])
            assert buf[1:-1] == data[offset : offset + length], name
            assert buf[0] == buf[-1] == 0xA5, f"{name}: bytes written outside the buffer"

    def test_zero_length_reads(self, source: Source, data: bytes) -> None:
        for offset in (0, len(data) // 2, len(data)):
            source.read_into(offset, memoryview(bytearray()))
            assert source.read(offset, 0) == b""
            source.read_into_many(offset, [])

    def test_read_returns_bytes(self, source: Source, data: bytes) -> None:
        got = source.read(12_345, 6789)
        assert type(got) is bytes
        assert got == data[12_345 : 12_345 + 6789]

    def test_read_into_many_scatters_in_order(self, source: Source, data: bytes) -> None:
        sizes = [7, 0, PART, 1, 3 * PART // 2, 0, 4096, 13]  # empty buffers and some larger than a part
        bufs = [bytearray(s) for s in sizes]
        offset = 101
        source.read_into_many(offset, [memoryview(b) for b in bufs])
        for b in bufs:
            assert b == data[offset : offset + len(b)]
            offset += len(b)

    @pytest.mark.parametrize(
        "span",
        [
            pytest.param(lambda n: (n - 3, 10), id="straddles-the-end"),
            pytest.param(lambda n: (n, 1), id="at-the-end"),
            pytest.param(lambda n: (n + 100, 1), id="beyond-the-end"),
            pytest.param(lambda n: (0, n + 1), id="whole-object-plus-one"),
        ],
    )
    def test_read_past_the_end_raises_truncated(
        self, source: Source, data: bytes, span: Callable[[int], tuple[int, int]]
    ) -> None:
        offset, length = span(len(data))
        with pytest.raises(TruncatedFileError):
            source.read_into(offset, memoryview(bytearray(length)))
        with pytest.raises(TruncatedFileError):
            source.read(offset, length)

    def test_read_into_many_past_the_end_raises_truncated(self, source: Source, data: bytes) -> None:
        with pytest.raises(TruncatedFileError):
            source.read_into_many(len(data) - 100, [memoryview(bytearray(60)), memoryview(bytearray(60))])

    def test_negative_offset_raises_usage_error(self, source: Source) -> None:
        for offset in (-1, -5000):
            with pytest.raises(UsageError):
                source.read(offset, 10)
            with pytest.raises(UsageError):
                source.read_into_many(offset, [memoryview(bytearray(3)), memoryview(bytearray(4))])

    @settings(
        max_examples=30,
        deadline=None,
        derandomize=True,
        database=None,
        # the fixture's source is opened once and serves every example; the method is shared by every
        # transport's subclass by design (derandomized, no example database to replay across them)
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.differing_executors],
    )
    @given(draw=st.data())
    def test_random_ranges(self, source: Source, data: bytes, draw: st.DataObject) -> None:
        offset = draw.draw(st.integers(0, len(data)), label="offset")
        length = draw.draw(st.integers(0, len(data) - offset), label="length")
        assert source.read(offset, length) == data[offset : offset + length]

    def test_concurrent_reads_from_eight_threads(self, source: Source, data: bytes) -> None:
        errors: list[BaseException] = []
        barrier = threading.Barrier(8)

        def worker(seed: int) -> None:
            rng = random.Random(seed)
            try:
                barrier.wait()
                for _ in range(12):
                    offset = rng.randrange(len(data))
                    length = rng.randint(0, min(len(data) - offset, rng.choice([100, 5000, 3 * PART])))
                    buf = bytearray(length)
                    source.read_into(offset, memoryview(buf))
                    assert buf == data[offset : offset + length], (offset, length)
            except BaseException as exc:  # reported by the main thread
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        assert not any(t.is_alive() for t in threads), "a read hung"
        assert not errors, errors[0]

    # --- lifetime ------------------------------------------------------------------------------------------

    def test_close_is_idempotent(self, source: Source) -> None:
        source.read(0, 10)
        source.close()
        source.close()

    def test_context_manager(self, transport: Transport, data: bytes) -> None:
        with transport.open(transport.put(data)) as src:
            assert isinstance(src, Source)
            assert src.read(0, 100) == data[:100]
        src.close()  # already closed by the block: still fine

    def test_read_after_close_raises_a_typed_error(self, source: Source) -> None:
        source.close()
        with pytest.raises(TensorizerError):
            source.read(0, 10)

    # --- errors and edge objects ---------------------------------------------------------------------------

    def test_missing_object_raises_source_error(self, transport: Transport) -> None:
        uri = transport.missing()
        with pytest.raises(SourceError) as err:
            transport.open(uri)
        for secret in transport.secrets:
            assert secret not in str(err.value)

    def test_empty_object(self, make_source: Callable[[bytes], Source]) -> None:
        src = make_source(b"")
        assert src.size == 0
        src.read_into(0, memoryview(bytearray()))
        assert src.read(0, 0) == b""
        with pytest.raises(TruncatedFileError):
            src.read(0, 1)

    def test_replaced_object_is_detected_or_pinned(self, transport: Transport, data: bytes) -> None:
        if self.on_replace is None:
            pytest.skip(f"{type(self).__name__}: the test server cannot replace an object")
        uri = transport.put(data)
        with transport.open(uri) as src:
            assert src.read(0, 100) == data[:100]
            new = payload(len(data), seed=1)  # same length: only a version check can tell
            transport.replace(uri, new)
            if self.on_replace == "changed":
                with pytest.raises(ObjectChangedError):
                    src.read(100, 1000)
            else:
                assert src.read(0, len(data)) == data  # the version opened, never a mix
        with transport.open(uri) as fresh:
            assert fresh.read(0, len(new)) == new
