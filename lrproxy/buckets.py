"""A key's rate_per_s for all workers together (`server.workers`): the token buckets of
limits.py in one file that every worker maps. The shell's part (a file, locks); the
bucket's rule stays in the pure core."""

from __future__ import annotations

import fcntl
import hashlib
import logging
import mmap
import os
import struct
from typing import Final

from lrproxy.limits import TokenBucket, bucket_for
from lrproxy.log import MAIN

log = logging.getLogger(MAIN)

SHARED_BUCKETS_ENV: Final = "LRPROXY_BUCKETS"  # the supervisor's file, for its workers
_SLOT: Final = struct.Struct("=Qdd")  # a key name's hash (0: free), its tokens, their time
SLOTS: Final = 4096


class SharedBuckets:
    """The keys' token buckets in one file that every worker maps (`server.workers`), so
    that a key's rate_per_s holds for the whole service, as nginx's limit_req zone does
    in shared memory, not once per process. A take locks the file (flock, two system
    calls) around its read and write of the key's slot; the kernel lets go of a lock
    whose process died. Clocks are CLOCK_MONOTONIC, the same in every process.

    A key has a slot for the file's life, found by its name's hash (a renamed key gets
    a new one); with all SLOTS taken, a new key's bucket is its process's own."""

    def __init__(self, path: str, *, create: bool = False) -> None:
        """The file at `path`, made (empty: every slot free) when `create`; a worker
        only opens the supervisor's (FileNotFoundError if it has gone: a new file of
        its own would share nothing)."""
        flags = os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT | os.O_TRUNC if create else 0)
        fd = os.open(path, flags, 0o600)
        size = SLOTS * _SLOT.size
        if os.fstat(fd).st_size < size:
            os.ftruncate(fd, size)  # zeros: every slot free
        self.fd = fd
        self.map = mmap.mmap(fd, size)

    @classmethod
    def create(cls, path: str) -> SharedBuckets:
        """The supervisor's file, new and empty, for its workers to open."""
        return cls(path, create=True)

    def close(self) -> None:
        self.map.close()
        os.close(self.fd)

    def bucket(self, name: str, rate_per_s: float) -> SharedBucket | TokenBucket:
        key = int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little")
        key = key or 1  # 0 marks a free slot
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        try:
            slot = self._slot(key)
        finally:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        if slot < 0:
            log.warning("rate_per_s of key %r is per process: the shared table of %d keys "
                        "is full (renamed keys keep their slots until a restart)", name, SLOTS)
            return bucket_for(rate_per_s)
        return SharedBucket(self, slot * _SLOT.size, rate_per_s, max(1.0, rate_per_s))

    def _slot(self, key: int) -> int:
        """`key`'s slot, claimed if it has none (under the lock); -1 with none free."""
        start = key % SLOTS
        for i in range(SLOTS):
            n = (start + i) % SLOTS
            have = _SLOT.unpack_from(self.map, n * _SLOT.size)[0]
            if have == key:
                return n
            if have == 0:
                _SLOT.pack_into(self.map, n * _SLOT.size, key, -1.0, 0.0)  # full at first take
                return n
        return -1


class SharedBucket:
    """One key's bucket in a SharedBuckets file: TokenBucket's `take`, across processes."""

    __slots__ = ("_fd", "_map", "_offset", "burst", "rate")

    def __init__(self, table: SharedBuckets, offset: int, rate: float, burst: float) -> None:
        self._fd, self._map, self._offset = table.fd, table.map, offset
        self.rate, self.burst = rate, burst

    def take(self, now: float) -> float:
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            key, tokens, at = _SLOT.unpack_from(self._map, self._offset)
            b = TokenBucket(self.rate, self.burst, tokens, at)
            wait = b.take(max(now, at))  # (`now` read before another process's take)
            _SLOT.pack_into(self._map, self._offset, key, b.tokens, b.at)
            return wait
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
