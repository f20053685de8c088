"""The expert directory: which expert replicas are up and where their data plane listens.

Any Ray caller can reach the directory, so a registration (and a deregistration) carries an HMAC of
its record under the data plane's secret (`app_secret`, which the directory reads the same way); a
per-replica sequence number and a timestamp make a recorded one useless to replay.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import time

from ray import serve

from cluster.runtime.channel import new_secret

HEARTBEAT_S = 2.0  # an expert replica re-registers this often
ENTRY_TTL_S = 6.0  # a replica not heard from for this long (three heartbeats) is out of the view
REFRESH_S = 1.0  # an attention replica reads the view this often
# Every register and view is a Serve call, and each costs the caller and the directory milliseconds of
# CPU: at 1 s / 0.5 s an idle `mini` application on 2 cores spent 30% of a core, 21% at 2 s / 1 s
# (the directory 4.1% -> 2.2%, the attention replica 3.5% -> 2.0%, each expert replica ~2.6% -> 1.7%).
# A dead replica's calls are re-sent by the client at once, whatever the view says (cluster/runtime).
SIGNED_WINDOW_S = 30.0  # a directory record signed further off than this (wall clock, any node) is refused

log = logging.getLogger(__name__)


def app_secret() -> bytes:
    """The data plane's key for Serve applications: made once per Ray cluster and kept in Ray's GCS, so
    it is never in an application's arguments or config (an in-place config update then restarts
    nothing) and every replica of every node reads the same one through Ray."""
    from ray.experimental.internal_kv import _internal_kv_get, _internal_kv_put

    key, ns = b"channel-secret", b"mixserve"
    _internal_kv_put(key, new_secret(), overwrite=False, namespace=ns)  # the first caller's wins
    return _internal_kv_get(key, namespace=ns)


def _record_mac(secret: bytes, op: str, replica, fields: tuple, seq, ts) -> bytes:
    # JSON: one unambiguous encoding of the record, whatever its strings hold and whatever types it came in.
    msg = json.dumps([op, replica, *fields, seq, ts]).encode()
    return hmac.new(secret, b"mxdir-" + msg, hashlib.sha256).digest()


def signed(secret: bytes, op: str, replica: str, *fields, seq: int, ts: float | None = None) -> tuple:
    """The arguments of `ExpertDirectory.<op>` for this record: (replica, *fields, seq, ts, mac)."""
    ts = time.time() if ts is None else ts
    return (replica, *fields, seq, ts, _record_mac(secret, op, replica, fields, seq, ts))


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1024)
class ExpertDirectory:
    """Expert replicas announce themselves here; attention replicas read the view. Holds only soft
    state: after a restart the replicas' next heartbeats rebuild it within HEARTBEAT_S."""

    def __init__(self):
        self.secret = app_secret()
        self.entries: dict[str, tuple[int, tuple[str, int], float]] = {}
        self.gone: dict[str, float] = {}  # deregistered replicas: a late heartbeat must not revive them
        self.seqs: dict[str, int] = {}  # replica -> last sequence number taken: a replayed record is old
        self.refused = 0  # records without a valid MAC, stale or replayed

    def _verified(self, op: str, replica, fields: tuple, seq, ts, mac) -> bool:
        """The MAC is checked over the values as they came, before any other use of them: once it
        holds, they are what a holder of the secret signed (a str, ints, a float)."""
        try:
            want = _record_mac(self.secret, op, replica, fields, seq, ts)
            ok = isinstance(mac, bytes) and hmac.compare_digest(mac, want)
            ok = ok and abs(time.time() - ts) <= SIGNED_WINDOW_S and seq > self.seqs.get(replica, -1)
        except (TypeError, ValueError, RecursionError):  # any Ray caller can send anything
            ok = False
        if not ok:
            self.refused += 1
            return False
        self.seqs[replica] = seq
        return True

    def register(self, replica: str, group: int, host: str, port: int, seq: int, ts: float, mac: bytes) -> bool:
        """True when the record is signed with the secret, fresh and newer than the replica's last."""
        if not self._verified("register", replica, (group, host, port), seq, ts, mac):
            return False
        if replica not in self.gone:
            self.entries[replica] = (group, (host, port), time.monotonic())
        return True

    def deregister(self, replica: str, seq: int, ts: float, mac: bytes) -> bool:
        if not self._verified("deregister", replica, (), seq, ts, mac):
            return False
        self.entries.pop(replica, None)
        self.gone[replica] = time.monotonic()
        return True

    def view(self) -> dict[int, list[tuple[str, str, int]]]:
        now = time.monotonic()
        # Long gone: forget them, sequence numbers too (their records are well past SIGNED_WINDOW_S by now).
        for r, t in list(self.gone.items()):
            if now - t > 10 * ENTRY_TTL_S:
                del self.gone[r]
                self.seqs.pop(r, None)
        for r, (_, _, t) in list(self.entries.items()):
            if now - t > 10 * ENTRY_TTL_S:
                del self.entries[r]
                self.seqs.pop(r, None)
        out: dict[int, list] = {}
        for r, (g, addr, t) in sorted(self.entries.items()):
            if now - t <= ENTRY_TTL_S:
                out.setdefault(g, []).append((r, *addr))
        return out
