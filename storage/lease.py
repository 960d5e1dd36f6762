"""One writer per shard of a cache in object storage: a lease object per shard.

Object stores have no locks, but they have two atomic conditional writes, and a lease needs no
more. Taking a free shard creates `<cache>/done/locks/<shard>.lease` only if it does not exist
(If-None-Match: *); exactly one of several writers succeeds. The lease says who holds it and
until when; its holder renews it every third of its term, each time only if it is still the
version it wrote (If-Match on its ETag), and hands it back by writing it expired the same way.
A writer killed mid-shard stops renewing: once its term has passed, the next writer takes the
lease over by replacing exactly the expired version it read (If-Match again), so of two writers
racing for it one wins. Deleting an expired lease and creating a new one would let both win.

Terms are wall-clock times: machines sharing a cache need clocks within a small part of the term.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid

from storage.location import Remote, RemoteUnavailable


class Lease:
    """The right to write one shard, held until `release`. `lost` turns true if a renewal found
    that another writer took the lease over (this one failed to renew within its term)."""

    def __init__(self, obj: Remote, *, seconds: float, owner: str, etag: str):
        self.obj, self.seconds, self.owner, self._etag = obj, seconds, owner, etag
        self.lost = False
        self._stop = threading.Event()
        self._renewing = threading.Thread(target=self._renew, name=f"lease {obj.name}",
                                          daemon=True)
        self._renewing.start()

    @classmethod
    def take(cls, obj: Remote, *, seconds: float, wait: bool) -> "Lease | None":
        """The lease at `obj`: created if absent, taken over if expired; None when another
        writer holds it and wait=False (with wait=True: poll until it is free or expires)."""
        owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        while True:
            etag = obj.create(_body(owner, time.time() + seconds))
            if etag:
                return cls(obj, seconds=seconds, owner=owner, etag=etag)
            found = obj.read_versioned()
            if found is None:  # handed back and removed in between: create it again
                continue
            data, their_etag = found
            if _expires(data) < time.time():
                etag = obj.replace(_body(owner, time.time() + seconds), etag=their_etag)
                if etag:
                    return cls(obj, seconds=seconds, owner=owner, etag=etag)
                continue  # another writer took it over first
            if not wait:
                return None
            time.sleep(min(1.0, seconds / 4))

    def release(self) -> None:
        """Hand the lease back (written expired), unless it was lost; never raises: a lease that
        cannot be reached expires by itself."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._renewing.join()
        if not self.lost:
            try:
                self.obj.replace(_body(self.owner, 0.0), etag=self._etag)
            except RemoteUnavailable:
                pass

    def _renew(self) -> None:
        while not self._stop.wait(self.seconds / 3):
            try:
                etag = self.obj.replace(_body(self.owner, time.time() + self.seconds),
                                        etag=self._etag)
            except RemoteUnavailable:
                continue  # try again; the writer's own requests will fail the same way
            if etag is None:
                self.lost = True
                return
            self._etag = etag


def _body(owner: str, expires: float) -> bytes:
    return json.dumps({"owner": owner, "expires": expires}).encode()


def _expires(data: bytes) -> float:
    """A lease's term; an unreadable lease counts as expired (its writer cannot renew it)."""
    try:
        return float(json.loads(data)["expires"])
    except (ValueError, KeyError, TypeError):
        return 0.0
