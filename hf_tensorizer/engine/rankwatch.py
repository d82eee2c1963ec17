"""Bounded waits for the ranks of a distributed load: every rank hears of a peer's failure or death in seconds.

A torch.distributed collective that a peer never joins waits for the process group's ``timeout`` (gloo's default
is 30 minutes), and a gloo peer killed mid-collective is not always noticed before then. Our distributed loads
therefore never wait blindly:

* status exchanges (did every rank open the same file, did every read succeed) go through the process group's
  key-value store, not a collective: each rank posts its status under a key and polls for the others';
* the collectives that move bytes run with ``async_op=True`` and are polled;
* while polling, a rank watches its peers: each rank taking part beats a heartbeat key every :data:`BEAT_S`
  (a daemon thread on its own store connection, from its first distributed load on), posts an exit marker when
  its interpreter exits, and posts an error status as soon as it fails between two exchanges.

A peer whose heartbeat stopped for :data:`LIVENESS_S` (``HF_TENSORIZER_DIST_LIVENESS_S``, default 5 s), that
exited, or that posted an error makes every waiting rank raise :class:`DistributedError` naming it. A peer that
never arrived (no heartbeat yet) is waited for up to the store's timeout (the process group's). After a
``DistributedError`` the process group may hold unfinished collectives: destroy it before using it again.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import threading
import time
from datetime import timedelta
from typing import Any

from ..errors import DistributedError

BEAT_S = 0.5
LIVENESS_S = float(os.environ.get("HF_TENSORIZER_DIST_LIVENESS_S", "5"))
CHECK_S = 0.25  # how often a waiting rank looks at its peers
GRACE_S = 1.0  # a peer seen gone while a collective is pending: the collective may still finish (bytes were sent)
_PREFIX = "hf_tensorizer/"
_lock = threading.RLock()
_beat: tuple[int, threading.Thread] | None = None
_watches: dict[tuple[int, tuple[int, ...]], Watch] = {}


def _default_store() -> Any:
    from torch.distributed import distributed_c10d

    return distributed_c10d._get_default_store()


def _client(store: Any, timeout_s: float | None = None) -> Any:
    """A store connection of our own (store clients are not meant to be shared between threads)."""
    try:
        client = store.clone()
    except Exception:  # a store without clone(): share it (its calls are short)
        return store
    if timeout_s is not None:
        client.set_timeout(timedelta(seconds=timeout_s))
    return client


def _beat_loop(client: Any, key: str) -> None:
    n = 0
    while True:
        time.sleep(BEAT_S)
        n += 1
        try:
            client.set(key, str(n))
        except Exception:  # the group was destroyed or its store host is gone: nothing left to tell
            return


def _ensure_heartbeat(store: Any, rank: int) -> None:
    global _beat
    with _lock:
        if _beat is not None and _beat[0] == id(store) and _beat[1].is_alive():
            return
        client = _client(store, 10.0)
        key = f"{_PREFIX}hb/{rank}"
        client.set(key, "0")  # synchronously: peers see this rank as started from now on
        thread = threading.Thread(target=_beat_loop, args=(client, key), daemon=True, name="hf_tensorizer-heartbeat")
        thread.start()
        _beat = (id(store), thread)


@atexit.register
def _post_exit() -> None:
    """Tell waiting peers that this process is gone (an uncaught error, or a normal exit)."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            _client(_default_store(), 2.0).set(f"{_PREFIX}gone/{dist.get_rank()}", "1")
    except Exception:  # best effort: the heartbeat says the same, later
        pass


def watch_for(group: Any) -> Watch:
    """The :class:`Watch` of ``group`` (``None``: the default group); one per group and process, so that every
    rank numbers its exchanges alike."""
    import torch.distributed as dist

    store = _default_store()
    ranks = tuple(dist.get_process_group_ranks(group) if group is not None else range(dist.get_world_size()))
    key = (id(store), ranks)
    with _lock:
        if key not in _watches:
            _watches[key] = Watch(store, ranks, dist.get_rank())
    return _watches[key]


class Watch:
    """Status exchanges and bounded waits for one group of ranks (see the module docstring).

    Args:
        store: the process group's store.
        ranks: the global ranks of the group.
        me: this process's global rank.
    """

    def __init__(self, store: Any, ranks: tuple[int, ...], me: int) -> None:
        self.store, self.ranks, self.me = store, ranks, me
        self.peers = [r for r in ranks if r != me]
        self.space = _PREFIX + hashlib.sha256(repr(ranks).encode()).hexdigest()[:12] + "/"
        self.seq = 0
        self.reported: BaseException | None = None  # an own error the peers already got through an exchange
        self._beats: dict[int, tuple[bytes, float]] = {}
        _ensure_heartbeat(store, me)

    def _key(self, seq: int, rank: int) -> str:
        return f"{self.space}{seq}/{rank}"

    def _call(self, fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except Exception as exc:
            raise DistributedError(f"rank {self.me}: lost the process group's store (its host died?): {exc}") from exc

    def exchange(self, payload: dict[str, Any]) -> dict[int, dict[str, Any]]:
        """Post this rank's ``payload`` and return every rank's (a barrier through the store, bounded).

        Raises:
            DistributedError: a peer died, exited or never arrived within the store's timeout.
        """
        self.seq += 1
        keys = {r: self._key(self.seq, r) for r in self.ranks}
        self._call(self.store.set, keys[self.me], json.dumps(payload))
        if self.seq > 2:  # every rank has read seq - 2 (it posted seq - 1 after reading it): drop ours
            self._call(self.store.delete_key, self._key(self.seq - 2, self.me))
        deadline = time.monotonic() + self.store.timeout.total_seconds()
        delay, next_check = 0.0005, time.monotonic() + CHECK_S
        while not self._call(self.store.check, list(keys.values())):
            now = time.monotonic()
            if now >= next_check:
                missing = [r for r in self.peers if not self._call(self.store.check, [keys[r]])]
                self._check_peers(missing)
                next_check = now + CHECK_S
                if now > deadline:
                    raise DistributedError(f"rank {self.me}: ranks {missing} never reached the distributed load "
                                           "within the process group's timeout")  # fmt: skip
            time.sleep(delay)
            delay = min(0.02, delay * 2)
        return {r: json.loads(self._call(self.store.get, keys[r])) for r in self.ranks}

    def fail(self, exc: BaseException) -> None:
        """Tell the peers at once that this rank failed (they may be waiting in an exchange or a collective). Errors
        the peers already know of (a :class:`DistributedError`, an error posted in an exchange) are not posted."""
        if isinstance(exc, DistributedError) or exc is self.reported:
            return
        self.seq += 1
        try:
            self.store.set(self._key(self.seq, self.me), json.dumps({"error": describe(exc)}))
        except Exception:  # the peers still see the heartbeat stop or the exit marker
            pass

    def wait(self, work: Any, what: str) -> None:
        """Wait for an ``async_op`` collective, watching the peers.

        Raises:
            DistributedError: the collective failed, or a peer failed, exited or stopped beating meanwhile.
        """
        delay, next_check = 0.0001, time.monotonic() + CHECK_S
        try:
            while not work.is_completed():
                now = time.monotonic()
                if now >= next_check:
                    try:
                        self._check_peers(self.peers, early=True)
                    except DistributedError:
                        if not _completes(work, GRACE_S):
                            raise
                        break
                    next_check = now + CHECK_S
                time.sleep(delay)
                delay = min(0.01, delay * 2)
            work.wait()
        except DistributedError:
            raise
        except Exception as exc:
            raise DistributedError(f"rank {self.me}: {what} failed: {exc}") from exc

    def _check_peers(self, ranks: list[int], early: bool = False) -> None:
        if early:  # a peer that failed between exchanges posted its next status already
            ahead = [r for r in ranks if self._call(self.store.check, [self._key(self.seq + 1, r)])]
            for r in ahead:
                error = json.loads(self._call(self.store.get, self._key(self.seq + 1, r))).get("error")
                if error:
                    raise DistributedError(f"rank {r} failed: {error}")
        now = time.monotonic()
        for r in ranks:
            if self._call(self.store.check, [f"{_PREFIX}gone/{r}"]):
                raise DistributedError(f"rank {r} exited during the distributed load")
            if not self._call(self.store.check, [f"{_PREFIX}hb/{r}"]):
                continue  # not started yet: waited for up to the store's timeout
            value = self._call(self.store.get, f"{_PREFIX}hb/{r}")
            seen = self._beats.get(r)
            if seen is None or seen[0] != value:
                self._beats[r] = (value, now)
            elif now - seen[1] > LIVENESS_S:
                raise DistributedError(
                    f"rank {r} stopped responding (no heartbeat for {now - seen[1]:.1f} s): it died or hangs"
                )


def _completes(work: Any, seconds: float) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if work.is_completed():
            return True
        time.sleep(0.01)
    return False


def describe(exc: BaseException) -> str:
    """``Type: message`` of an error, for the peers' messages."""
    return f"{type(exc).__name__}: {exc}"
