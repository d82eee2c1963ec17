"""How a remote read adapts to its server while it reads: the decision (:class:`Tuner`, pure: timings in,
decisions out) and the gate that applies its concurrency (:class:`Gate`).

Servers differ in what they reward. nginx on loopback: 4 ranged GETs in flight beat 16 on a small machine. Real S3:
~85–90 MB/s per connection, so many connections. moto and some on-premises S3-compatible stores answer every
ranged GET by copying the whole object first: there 8 MiB ranges run 20× slower than one sequential GET. No fixed
default fits all three, so a load starts with a few ranged GETs in flight, times them, and moves:

0. **first read**: the source's first read (a load's header, at byte 0) is sent as one open-ended GET. When it waits for
   its first byte ≥ :data:`EARLY_RATIO` × what opening the object took (the HEAD) and ≥ :data:`EARLY_MIN_S`, the
   server does work per ranged GET that has nothing to do with the bytes asked for (moto copies the whole object
   for each): the load stays on that body (one sequential GET from byte 0, no ranged GET at all). Otherwise the
   body is dropped and the probe below decides.
1. **probe**: the first wave of reads (one per request in flight, at least 4, each ≥ 1 MiB) at :data:`START` in flight.
   Each request gives its time to the first byte (``ttfb``) and its body rate (bytes ÷ time after the first byte);
   the window gives the aggregate rate (bytes ÷ its wall time).
2. **one stream** when ranges are slow: requests spend most of their time before the first byte
   (≥ :data:`FIXED_SHARE`) and one body moves ≥ :data:`STREAM_GAIN` × what the whole window did in parallel. The
   load then reads the rest as one sequential GET (:mod:`.sequential`); its first window is checked, and if the
   stream does worse than the ranges did the load goes back to them.
3. **grow**: otherwise double the requests in flight while a window gains ≥ :data:`GROW_GAIN` ×, enough of the
   object is left to measure the next step (its window), and the machine has CPU to run more: the cores idle over
   the window (``/proc/stat``, every process) reach :data:`CPU_ROOM` (on a busy machine more requests only share
   the same cores, and the copies into fresh memory slow down). If the first step gains nothing, half as many
   are tried when enough is left for them to pay, and kept only when ≥ :data:`SHRINK_GAIN` × faster; settle on
   the best window.

A window lasts at least :data:`MIN_WINDOW_S` (a shorter one is scheduling noise on a busy machine; a very fast server
may end it after :data:`WINDOW_MOST` × the requests it needs) and is judged by
Little's law: the requests it kept in flight on average (their summed durations ÷ its wall time, i.e. bytes in
flight ÷ rate) must reach :data:`OCCUPIED` × the limit, or the limit was not what held the rate back (the reader
threads or the copies were) and a step up is not tried. The CPU readings and the occupancy of each window are in
``report()["cpu"]`` (``LoadMetrics.transfer["cpu"]``).

Explicit settings win: a caller's ``concurrency``/``part_size`` (the source) or ``num_readers``/``chunk_bytes``
(``TensorDeserializer``) hold the transfer as given (``Tuner(held=...)``). ``HF_TENSORIZER_REMOTE_ADAPT=0`` holds
every source at its configured concurrency.

Memory: the tuner only ever lowers how many of the engine's reads are in flight, or serves them from one stream
into the same buffers, so the bound of a load (readers × chunk bytes) is unchanged.
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

__all__ = [
    "CPU_ROOM",
    "EARLY_MIN_S",
    "EARLY_RATIO",
    "FIXED_SHARE",
    "GROW_GAIN",
    "MIN_WINDOW_S",
    "OCCUPIED",
    "SHRINK_GAIN",
    "START",
    "STREAM_GAIN",
    "CpuMeter",
    "CpuUse",
    "Decision",
    "Gate",
    "Sample",
    "Tuner",
]

START = 4  # requests in flight while probing (capped by the source's concurrency)
MIN_SAMPLE_BYTES = 1 << 20  # smaller reads (the index, headers) time the latency only: not counted
FIXED_SHARE = 0.5  # requests spending at least this share before their first byte have a costly fixed part...
STREAM_GAIN = 2.0  # ...and one body at least this many times the window's aggregate: read one stream
GROW_GAIN = 1.15  # a step must gain this much to count (noise on a busy machine is ~10 %)
EARLY_RATIO = 4.0  # a first GET waiting this many times the HEAD for its first byte...
EARLY_MIN_S = 0.03  # ...and at least this long (a busy machine's scheduling noise stays below): one stream at once
SHRINK_GAIN = 1.15  # fewer requests in flight are kept only when they are at least this much faster
MIN_WINDOW_S = 0.1  # a window spans at least this long (shorter ones measure the scheduler, not the server)...
WINDOW_MOST = 16  # ...unless it already holds this many times the requests it needs (a very fast server)
OCCUPIED = 0.75  # a window whose requests were in flight less than this share of the limit was not limited by it
CPU_ROOM = 0.5  # idle cores a step up needs (below it more requests only share the same busy cores)


@dataclass(frozen=True)
class CpuUse:
    """CPU use over one interval, in cores (1.0 = one core busy all the time).

    Args:
        cores: the machine's CPUs.
        busy: cores busy over the interval, every process (``/proc/stat``).
        own: cores this process used (its CPU time ÷ the interval).
    """

    cores: int
    busy: float
    own: float

    @property
    def idle(self) -> float:
        return max(0.0, self.cores - self.busy)

    def as_dict(self) -> dict[str, float]:
        return {"cores": self.cores, "busy": round(self.busy, 2), "own": round(self.own, 2),
                "idle": round(self.idle, 2)}  # fmt: skip


class CpuMeter:
    """Reads CPU use since its previous reading: the machine's from ``/proc/stat``, this process's from its CPU
    time. ``read()`` returns None where ``/proc/stat`` is missing (not Linux) or the interval is too short to say."""

    def __init__(self, stat: str = "/proc/stat") -> None:
        self._stat = stat
        self._tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self._last = self._now()

    def _now(self) -> tuple[float, float, float] | None:
        try:
            with open(self._stat) as f:
                fields = [int(x) for x in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        idle = sum(fields[3:5])  # idle + iowait
        return time.monotonic(), (sum(fields[:8]) - idle) / self._tick, time.process_time()

    def read(self) -> CpuUse | None:
        now, last = self._now(), self._last
        self._last = now
        if now is None or last is None or now[0] - last[0] < 0.02:
            return None
        wall = now[0] - last[0]
        cores = os.cpu_count() or 1
        return CpuUse(cores, min(cores, (now[1] - last[1]) / wall), (now[2] - last[2]) / wall)


@dataclass(frozen=True)
class Sample:
    """One completed request (or one read served by the stream).

    Args:
        nbytes: bytes it carried.
        start: ``time.monotonic()`` when it was sent.
        first_byte: when its response headers arrived (``start`` when unknown).
        end: when its last byte landed.
        limit: the decision's concurrency when it was sent (0: served by the stream).
    """

    nbytes: int
    start: float
    first_byte: float
    end: float
    limit: int


@dataclass(frozen=True)
class Decision:
    """What the reads do now and why.

    Args:
        mode: ``"ranged"`` (parallel ranged GETs), ``"stream"`` (one sequential GET) or ``"held"`` (as configured).
        concurrency: ranged GETs in flight (1 for the stream).
        reason: why, with the numbers that decided it.
    """

    mode: str
    concurrency: int
    reason: str


def _mbs(rate: float) -> str:
    return f"{rate / 1e6:.0f} MB/s" if rate < 1e9 else f"{rate / 1e9:.2f} GB/s"


class Tuner:
    """The decision logic: :meth:`add` each completed request; it returns a new :class:`Decision` when it moves.

    Pure bookkeeping (no clock, no threads, no I/O): the caller serializes calls and supplies the timings, so it
    is tested with synthetic timings.

    Args:
        max_concurrency: the most requests in flight it may choose (the source's connections).
        can_stream: whether the transport can serve reads from one sequential GET.
        held: set when the caller fixed the transfer (e.g. ``"num_readers=4"``): the decision never moves.
        start: requests in flight while probing.
        cpu: CPU use since its previous call (a :class:`CpuMeter`'s ``read``; None: no CPU condition): called when
            a window opens and when it closes.
    """

    def __init__(self, *, max_concurrency: int, can_stream: bool = True, held: str | None = None,
                 start: int = START, cpu: Callable[[], CpuUse | None] | None = None) -> None:  # fmt: skip
        self.max_concurrency = max(1, max_concurrency)
        self.cpu = cpu
        self.cpu_seen: list[dict[str, Any]] = []  # per judged window: concurrency, occupancy, CPU use
        self.can_stream = can_stream
        self.rates: dict[int, float] = {}  # aggregate bytes/s of a window, per concurrency tried
        self._window: list[Sample] = []
        self.ttfb = 0.0  # median time to the first byte of a ranged GET in the probe: what a late read would pay
        self.total = 0  # the object's size when known: a step up is tried only when enough is left to use it
        self._seen = 0  # bytes of the requests counted so far
        self._phase = "held" if held else "probe"
        if held:
            first = Decision("held", self.max_concurrency, f"set by the caller ({held})")
        else:
            c = min(start, self.max_concurrency)
            first = Decision("ranged", c, f"probing: {c} ranged GETs in flight")
        self.history: list[Decision] = [first]

    @property
    def current(self) -> Decision:
        return self.history[-1]

    @property
    def settled(self) -> bool:
        return self._phase in ("held", "settled")

    def hold(self, why: str) -> Decision:
        """Fix the transfer at the full concurrency from now on (the caller set it)."""
        self._phase = "held"
        return self._move(Decision("held", self.max_concurrency, f"set by the caller ({why})"))

    def force(self, mode: str, why: str) -> Decision:
        """Settle on ``mode`` (``"ranged"`` at the full concurrency, or ``"stream"``) whatever was measured."""
        self._phase = "settled"
        return self._move(Decision(mode, 1 if mode == "stream" else self.max_concurrency, why))

    def first_read(self, ttfb: float, open_s: float) -> Decision | None:
        """The load's first GET (at byte 0, open-ended) waited ``ttfb`` for its first byte; opening the object (the
        HEAD) took ``open_s``. Returns the stream decision when ranges carry a fixed cost far above a request's
        (see the module docstring, step 0), else None (the probe decides)."""
        if self._phase != "probe" or not self.can_stream or open_s <= 0:
            return None
        if ttfb < EARLY_MIN_S or ttfb < EARLY_RATIO * open_s:
            return None
        self.ttfb = ttfb
        self._phase = "stream"
        return self._move(
            Decision(
                "stream",
                1,
                (
                    f"the first GET waited {ttfb * 1e3:.0f} ms for its first byte, {ttfb / open_s:.0f}× the HEAD "
                    f"({open_s * 1e3:.1f} ms): the server works per request far beyond the bytes asked for; "
                    "one sequential GET from there"
                ),
            )
        )

    def add(self, s: Sample) -> Decision | None:
        """Count one completed request; returns the new decision when this one completes a window that moves it."""
        self._seen += s.nbytes
        if self.settled or s.nbytes < MIN_SAMPLE_BYTES:
            return None
        cur = self.current
        if s.limit != (0 if cur.mode == "stream" else cur.concurrency):
            return None  # sent under an earlier decision
        if not self._window and self.cpu is not None and cur.mode != "stream":
            self.cpu()  # the window's CPU reading starts here
        self._window.append(s)
        # the probe decides on one wave (a server that punishes ranges makes every one of them costly)
        need = (
            6
            if cur.mode == "stream"
            else max(4, cur.concurrency)
            if self._phase == "probe"
            else max(6, 2 * cur.concurrency)
        )
        if len(self._window) < need:
            return None
        if self._phase != "probe" and _span(self._window) < MIN_WINDOW_S and len(self._window) < WINDOW_MOST * need:
            return None  # too short to tell a rate from the scheduler's noise: keep counting
        window, self._window = self._window, []
        return self._stream_checked(window) if cur.mode == "stream" else self._ranged_window(cur.concurrency, window)

    def report(self) -> dict[str, Any]:
        """What ran and why, for ``LoadMetrics.transfer``: the current decision, the rates measured, the steps."""
        return {**asdict(self.current), "rates": {c: round(r) for c, r in self.rates.items()},
                "steps": [f"{d.mode} ×{d.concurrency}: {d.reason}" for d in self.history],
                "cpu": list(self.cpu_seen)}  # fmt: skip

    # --- internals -------------------------------------------------------------------------------------------

    def _move(self, d: Decision) -> Decision:
        self.history.append(d)
        return d

    def _settle(self, why: str, concurrency: int | None = None) -> Decision:
        self._phase = "settled"
        best = concurrency or max(self.rates, key=lambda c: self.rates[c])
        return self._move(Decision("ranged", best, why))

    def _left_for(self, c: int, window: list[Sample], rate: float, times: int = 1) -> bool:
        """Whether ``times`` windows at ``c`` in flight (as many requests as one needs, and at least
        :data:`MIN_WINDOW_S` at ``rate``) fit in what is left of the object."""
        need = max(max(6, 2 * c) * sum(s.nbytes for s in window) / len(window), rate * MIN_WINDOW_S)
        return not self.total or self.total - self._seen >= times * need

    def _ranged_window(self, c: int, window: list[Sample]) -> Decision | None:
        span = _span(window)
        nbytes, busy = sum(s.nbytes for s in window), sum(s.end - s.start for s in window)
        rate = nbytes / max(span, 1e-9)
        # Little's law: requests in flight on average = bytes in flight ÷ rate = summed request time ÷ wall time
        occupancy = busy / max(span, 1e-9)
        if self._phase != "probe" and occupancy >= OCCUPIED * c:
            # the gate was kept full: c requests always in flight, each moving its bytes in its own time, so the
            # rate is c × bytes ÷ request time, free of the window's edges (a window closes while the requests
            # sent beside its last ones are still in flight, which the wall-time rate counts as idle)
            rate = c * nbytes / max(busy, 1e-9)
        self.rates[c] = rate
        use = self.cpu() if self.cpu is not None else None
        if self._phase != "probe":
            self.cpu_seen.append({"concurrency": c, "occupancy": round(occupancy, 2), "rate": round(rate),
                                  **(use.as_dict() if use else {})})  # fmt: skip
        if self._phase == "probe":
            self._phase = "grow"
            fixed = statistics.median((s.first_byte - s.start) / max(s.end - s.start, 1e-9) for s in window)
            body = statistics.median(s.nbytes / max(s.end - s.first_byte, 1e-9) for s in window)
            ttfb = self.ttfb = statistics.median(s.first_byte - s.start for s in window)
            if self.can_stream and fixed >= FIXED_SHARE and body >= STREAM_GAIN * rate:
                self._phase = "stream"
                return self._move(
                    Decision(
                        "stream",
                        1,
                        (
                            f"ranged GETs spent {fixed:.0%} of their time before the first byte ({ttfb * 1e3:.0f} ms); "
                            f"{c} in flight moved {_mbs(rate)} in all, one body moves {_mbs(body)}: one sequential GET"
                        ),
                    )
                )
            # the first wave paid connection set-up and slow start: its rate says little about this concurrency, so
            # it is measured again on warm connections before any step is judged against it
            self._phase = "base"
            return self._move(Decision("ranged", c, f"probe: {c} in flight moved {_mbs(rate)}; measuring {c} again"))
        if self._phase == "base":
            self._phase = "grow"
        best = max(self.rates, key=lambda k: self.rates[k])
        if self._phase == "grow":
            prev = max((k for k in self.rates if k < c), default=None)
            if prev is not None and rate < GROW_GAIN * self.rates[prev]:
                if len(self.rates) == 2 and prev > 1 and self._left_for(prev // 2, window, rate, 2):
                    # the first step up gained nothing: try fewer, while enough is left to measure them and profit
                    self._phase = "shrink"
                    return self._move(
                        Decision(
                            "ranged",
                            max(1, prev // 2),
                            (
                                f"{prev} → {c} in flight: {_mbs(self.rates[prev])} → {_mbs(rate)}, no gain; trying "
                                f"{max(1, prev // 2)}"
                            ),
                        )
                    )
                # a step that gained less than GROW_GAIN is noise: keep the fewer requests unless another beat them
                keep = best if self.rates[best] >= GROW_GAIN * self.rates[prev] else prev
                return self._settle(f"{prev} → {c} in flight: {_mbs(self.rates[prev])} → {_mbs(rate)}, no gain; "
                                    f"settled at {keep} ({_mbs(self.rates[keep])})", keep)  # fmt: skip
            if c >= self.max_concurrency:
                return self._settle(f"{c} in flight (the most allowed) moved {_mbs(rate)}; settled at {best}")
            if occupancy < OCCUPIED * c:
                why = f"only {occupancy:.1f} were in flight on average: the readers, not the limit, set the pace"
                return self._settle(f"{c} in flight moved {_mbs(rate)} but {why}; settled at {best}")
            if use is not None and use.idle < CPU_ROOM:
                why = f"{use.idle:.1f} of {use.cores} cores idle (this process {use.own:.1f}): no CPU for more"
                return self._settle(f"{c} in flight moved {_mbs(rate)} with {why}; settled at {best}")
            nxt = min(2 * c, self.max_concurrency)
            if not self._left_for(nxt, window, rate):
                left = (self.total - self._seen) / 1e6
                return self._settle(f"{c} in flight moved {_mbs(rate)}; {left:.0f} MB left, too little to measure "
                                    f"{nxt}; settled at {best}")  # fmt: skip
            return self._move(Decision("ranged", nxt, f"{c} in flight moved {_mbs(rate)}; trying {nxt}"))
        # shrink: one step down was tried
        up = min(k for k in self.rates if k > c)
        if rate >= SHRINK_GAIN * self.rates[up]:
            return self._settle(f"{up} → {c} in flight: {_mbs(self.rates[up])} → {_mbs(rate)}; settled at {c}", c)
        return self._settle(f"{up} → {c} in flight: {_mbs(self.rates[up])} → {_mbs(rate)}, no gain; settled at {up}",
                            up)  # fmt: skip

    def _stream_checked(self, window: list[Sample]) -> Decision:
        span = _span(window)  # as the ranged windows: wall time
        rate = sum(s.nbytes for s in window) / max(span, 1e-9)
        self.rates[0] = rate  # 0: the stream
        ranged = max((r for c, r in self.rates.items() if c), default=0.0)
        if rate * GROW_GAIN < ranged:
            self._phase = "settled"
            best = max((c for c in self.rates if c), key=lambda k: self.rates[k])
            return self._move(
                Decision(
                    "ranged",
                    best,
                    (f"one stream moved {_mbs(rate)}, below the {_mbs(ranged)} of {best} ranged GETs: back to ranges"),
                )
            )
        self._phase = "settled"
        against = f" against {_mbs(ranged)} ranged" if ranged else ""
        return self._move(Decision("stream", 1, f"one stream moves {_mbs(rate)}{against}; kept"))


def _span(window: list[Sample]) -> float:
    """A window's wall time: its first request's send to its last byte."""
    return max(s.end for s in window) - min(s.start for s in window)


class Gate:
    """At most ``limit`` requests in flight; the limit may change at any time (waiters see it at once). Once
    ``diverted`` (reads switched to one stream), waiters that may go elsewhere leave at once.

    Args:
        limit: requests admitted at the same time.
    """

    def __init__(self, limit: int) -> None:
        self._cv = threading.Condition()
        self._limit = max(1, limit)
        self._inflight = 0
        self.diverted = False

    @property
    def limit(self) -> int:
        return self._limit

    def set_limit(self, limit: int, *, diverted: bool = False) -> None:
        with self._cv:
            self._limit = max(1, limit)
            self.diverted = diverted
            self._cv.notify_all()

    def acquire(self, divertable: bool = False) -> int:
        """Wait for a slot; returns the limit in force when it was taken, or 0 (no slot taken) when
        ``divertable`` and the reads were diverted to the stream."""
        with self._cv:
            while True:
                if divertable and self.diverted:
                    self._cv.notify()  # a wake-up meant for a slot passes on to a waiter that takes one
                    return 0
                if self._inflight < self._limit:
                    self._inflight += 1
                    return self._limit
                self._cv.wait()

    def release(self) -> None:
        with self._cv:
            self._inflight -= 1
            # one slot frees one waiter: waking all (a load's 16 readers at a limit of 4) cost ~5 % of an HTTP load
            # on 2 cores; a new limit or the diversion wakes every waiter (set_limit)
            self._cv.notify()

    def __enter__(self) -> int:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
