"""The active-learning database beside ase.db's own tables: claims, rounds, an integrity check.

Its ase.db rows carry ``round``, ``status``, ``band``, ``reliability``, ``novelty``, ``reason``,
``trajectory`` and ``step``; ``data`` holds the MLIP energy (eV), forces (eV/Å) and per-atom
importances (and reliabilities, for heads with a per-atom logit) at selection time.

ase.db has no row locking, so two drivers labelling one database would both
call the reference on the same pending frame. :class:`ALStore` adds two tables
to the same database (SQLite file or PostgreSQL) and touches them only in real
transactions on the backend's own connection:

``probe_claims(id, owner, expires)``
    one row per frame being labelled: the ase.db row id, the driver that holds
    it and when its lease ends (seconds since the epoch, the database's clock).
    A driver claims a ``pending`` frame before its reference call, renews its
    leases while it runs (:meth:`ALStore.heartbeat`) and, in one transaction,
    writes the result and drops the claim. A claim whose lease has lapsed (its
    owner died) is taken over by the next driver that asks.
``probe_rounds(round, explored, selected, rejected, model, probe, finished)``
    one row per active-learning round: written with the exploration, finished
    (with the retrained model and head files, if any) when the round is done,
    so a restarted loop knows where it stopped.

SQLite takes the write lock at the start of each transaction (``BEGIN
IMMEDIATE``), so a claim reads and writes under one lock. PostgreSQL claims
each row with one atomic ``INSERT ... ON CONFLICT DO UPDATE ... WHERE expired``
and then re-reads the row's status (a later statement of the same transaction,
so it sees every result committed before the claim), releasing rows that are no
longer pending. Lease times come from the database (PostgreSQL: the server's
clock; SQLite: each client's clock, which must agree to well within a lease).
"""

from __future__ import annotations

import math
import os
import socket
import threading
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
from ase import Atoms
from ase.db import connect
from ase.db.core import Database

from probe_ase.exceptions import InputError, StoreError

#: every status an active-learning row can have (see :mod:`probe_ase.al.learner`)
STATUSES = ("pending", "done", "failed", "rejected", "source")

_NOW = {"postgresql": "EXTRACT(EPOCH FROM clock_timestamp())::double precision",
        "db": "((julianday('now') - 2440587.5) * 86400.0)"}

_TABLES = (
    "CREATE TABLE IF NOT EXISTS probe_claims (id INTEGER PRIMARY KEY, owner TEXT NOT NULL, "
    "expires DOUBLE PRECISION NOT NULL)",
    "CREATE TABLE IF NOT EXISTS probe_rounds (round INTEGER PRIMARY KEY, explored INTEGER NOT NULL, "
    "selected INTEGER NOT NULL, rejected INTEGER NOT NULL, model TEXT, probe TEXT, finished DOUBLE PRECISION)",
)


@dataclass(frozen=True)
class RoundRecord:
    """One active-learning round as stored: counts, the model and head it produced, when it finished.

    ``model`` and ``probe`` are file paths (None when the round retrained
    nothing); ``finished`` is seconds since the epoch, None while the round
    is unfinished.
    """

    round: int
    explored: int
    selected: int
    rejected: int
    model: str | None = None
    probe: str | None = None
    finished: float | None = None


@dataclass
class IntegrityReport:
    """What :func:`check_database` found: rows per status, live claims, and every problem."""

    counts: dict[str, int]
    rows: int
    live_claims: int
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when no problem was found."""
        return not self.problems

    def __str__(self) -> str:
        counts = ", ".join(f"{k} {v}" for k, v in self.counts.items())
        lines = [f"{self.rows} rows: {counts}; {self.live_claims} frames being labelled (live claims)"]
        lines += [f"problem: {p}" for p in self.problems] or ["integrity: ok"]
        return "\n".join(lines)


class ALStore:
    """Claims and round records of one active-learning database.

    Args:
        db: ase.db path (SQLite) or ``postgresql://`` URL.
        lease: seconds a claim lasts unless renewed; a driver that dies holds
            its frames this long at most. :meth:`heartbeat` renews every
            third of it.
        owner: this driver's name in the claims (default: host, process id
            and a random suffix).
    """

    def __init__(self, db: str | os.PathLike, lease: float = 60.0, owner: str | None = None) -> None:
        if not (lease > 0 and math.isfinite(lease)):
            raise InputError(f"lease must be a positive number of seconds, got {lease}", lease=lease)
        self.url, self.lease = os.fspath(db), float(lease)
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.db = connect(self.url, use_lock_file=False)  # SQLite's own locks and ours suffice
        if getattr(self.db, "type", None) not in _NOW:  # ase's JSON backend has no type; SQL ones do
            raise InputError(f"active learning needs an SQLite file or a PostgreSQL URL, got a "
                             f"{type(self.db).__name__}: {self.url}", db=self.url)
        self.db.count()  # creates ase.db's tables, outside any transaction of ours
        with self.transaction() as cur:
            if self.db.type == "postgresql":  # two drivers creating the tables at once would collide
                cur.execute("SELECT pg_advisory_xact_lock(7265021)")
            for statement in _TABLES:
                cur.execute(statement)

    @property
    def poll(self) -> float:
        """Seconds between looks for frames to claim while other drivers hold the rest."""
        return min(1.0, self.lease / 4)

    # ---- transactions --------------------------------------------------------
    @contextmanager
    def transaction(self, db: Database | None = None) -> Iterator[_Cursor]:
        """One transaction on ``db`` (default: this store's), committed on success, rolled back on error.

        ase.db calls on ``db`` inside the block join the transaction; the
        cursor yielded takes ``?`` placeholders on either backend.
        """
        db = self.db if db is None else db
        if db.connection is not None:
            raise StoreError(f"a transaction on {self.url} is already open on this object", db=self.url)
        con = db._connect()  # ase's own connection (PostgreSQL: ase-db-backends' wrapper around psycopg2's)
        raw = con.con if db.type == "postgresql" else con
        db.connection, db.change_count = con, 0
        try:
            if db.type != "postgresql":
                raw.execute("BEGIN IMMEDIATE")  # take SQLite's write lock now, not at the first write
            yield _Cursor(raw.cursor(), db.type == "postgresql")
            raw.commit()
        except BaseException:
            raw.rollback()
            raise
        finally:
            db.connection = None
            raw.close()

    def _now(self) -> str:
        return _NOW[self.db.type]

    # ---- claims --------------------------------------------------------------
    def claim(self, n: int) -> list[tuple[int, Atoms]]:
        """Claim up to ``n`` pending frames (unclaimed, or whose lease lapsed); return their ids and structures."""
        if n <= 0:
            return []
        now = self._now()
        with self.transaction() as cur:
            pending = [row.id for row in self.db.select(status="pending", include_data=False)]
            cur.execute(f"SELECT id FROM probe_claims WHERE expires >= {now}")
            held = {row[0] for row in cur.fetchall()}
            claimed = []
            for row_id in (i for i in pending if i not in held):
                cur.execute(f"INSERT INTO probe_claims (id, owner, expires) VALUES (?, ?, {now} + ?) "
                            "ON CONFLICT (id) DO UPDATE SET owner = excluded.owner, expires = excluded.expires "
                            f"WHERE probe_claims.expires < {now} RETURNING id", [row_id, self.owner, self.lease])
                claimed += [row[0] for row in cur.fetchall()]
                if len(claimed) == n:
                    break
            frames = []
            for row_id in claimed:  # re-read: a frame finished since the list above is not ours to label
                row = self.db.get(id=row_id)
                if row.status == "pending":
                    frames.append((row_id, row.toatoms()))
                else:
                    cur.execute("DELETE FROM probe_claims WHERE id = ? AND owner = ?", [row_id, self.owner])
        return frames

    def finish(self, row_id: int, atoms: Atoms | None = None, **key_value_pairs) -> bool:
        """Write a frame's outcome and drop its claim in one transaction.

        ``atoms`` (with a calculator holding the reference results) replaces
        the row's structure; ``key_value_pairs`` (``status=...``) are set.
        Returns False, writing nothing, when this driver's claim had lapsed
        and the frame was finished by another driver meanwhile.
        """
        with self.transaction() as cur:
            cur.execute("DELETE FROM probe_claims WHERE id = ? AND owner = ? RETURNING id", [row_id, self.owner])
            held = bool(cur.fetchall())
            if not held and self.db.get(id=row_id).status != "pending":
                return False
            self.db.update(row_id, atoms=atoms, **key_value_pairs)
        return True

    def release(self) -> None:
        """Drop every claim this driver holds (its frames stay ``pending``)."""
        with self.transaction() as cur:
            cur.execute("DELETE FROM probe_claims WHERE owner = ?", [self.owner])

    def renew(self, db: Database | None = None) -> None:
        """Extend every lease this driver holds by :attr:`lease` seconds from now."""
        with self.transaction(db) as cur:
            cur.execute(f"UPDATE probe_claims SET expires = {self._now()} + ? WHERE owner = ?",
                        [self.lease, self.owner])

    @contextmanager
    def heartbeat(self) -> Iterator[None]:
        """Renew this driver's leases every third of a lease (own thread and connection) while the block runs."""
        stop = threading.Event()
        db = connect(self.url, use_lock_file=False)

        def beat() -> None:
            while not stop.wait(self.lease / 3):
                try:
                    self.renew(db)
                except Exception as err:  # noqa: BLE001 - a missed beat is retried; the lease covers two
                    warnings.warn(f"could not renew the claims of {self.owner}: {err}", stacklevel=1)

        thread = threading.Thread(target=beat, name="probe-ase-claims", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()

    def pending(self) -> int:
        """Rows still ``pending`` (claimed or not)."""
        return self.db.count(status="pending")

    # ---- rounds --------------------------------------------------------------
    @staticmethod
    def begin_round(cur: _Cursor, record: RoundRecord) -> None:
        """Store a round's exploration counts through ``cur``, the transaction that writes its frames."""
        cur.execute("INSERT INTO probe_rounds (round, explored, selected, rejected) VALUES (?, ?, ?, ?)",
                    [record.round, record.explored, record.selected, record.rejected])

    def finish_round(self, round: int, model: str | os.PathLike | None = None,
                     probe: str | os.PathLike | None = None) -> None:
        """Mark ``round`` finished, with the model and head files it produced (None: unchanged)."""
        with self.transaction() as cur:
            cur.execute(f"UPDATE probe_rounds SET model = ?, probe = ?, finished = {self._now()} WHERE round = ?",
                        [None if model is None else os.fspath(model), None if probe is None else os.fspath(probe),
                         round])

    def rounds(self) -> list[RoundRecord]:
        """Every stored round, oldest first."""
        with self.transaction() as cur:
            cur.execute("SELECT round, explored, selected, rejected, model, probe, finished FROM probe_rounds "
                        "ORDER BY round")
            return [RoundRecord(*row) for row in cur.fetchall()]

    def checkpoint(self) -> RoundRecord | None:
        """The latest finished round that produced a model and head (to resume from), or None."""
        done = [r for r in self.rounds() if r.finished is not None and r.model is not None]
        if not done:
            return None
        last = done[-1]
        for path in (last.model, last.probe):
            if not os.path.exists(path):
                raise InputError(f"round {last.round} of {self.url} was retrained into {path}, which is missing",
                                 round=last.round, path=path)
        return last

class _Cursor:
    """A DB-API cursor that takes ``?`` placeholders on SQLite and PostgreSQL alike."""

    def __init__(self, cursor, postgres: bool) -> None:
        self.cursor, self.postgres = cursor, postgres

    def execute(self, statement: str, params: list | tuple = ()) -> None:
        self.cursor.execute(statement.replace("?", "%s") if self.postgres else statement, params)

    def fetchall(self) -> list[tuple]:
        return self.cursor.fetchall()


def check_database(db: str | os.PathLike, forces: bool = True) -> IntegrityReport:
    """Check an active-learning database; never changes it.

    Checks that every row has a known status and the counts add up; every
    ``done`` row has a finite reference energy (eV) and, with ``forces``,
    finite forces (eV/Å) for each atom; every ``failed`` row says why; every
    region row points at a ``source`` row; every claim is on a pending row and
    still leased (an expired one is orphaned: its driver died); every
    finished round's model and head files exist.
    """
    store = ALStore(db)
    problems, statuses = [], {}
    for row in store.db.select():
        status = row.get("status")
        statuses[row.id] = status
        if status not in STATUSES:
            problems.append(f"row {row.id}: unknown status {status!r}")
        elif status == "done":
            energy = row.get("energy")
            if energy is None or not np.isfinite(energy):
                problems.append(f"row {row.id}: done without a finite reference energy")
            f = row.get("forces")
            if forces and (f is None or np.shape(f) != (row.natoms, 3) or not np.isfinite(f).all()):
                problems.append(f"row {row.id}: done without finite reference forces for its {row.natoms} atoms")
        elif status == "failed" and not row.get("error"):
            problems.append(f"row {row.id}: failed without an error message")
    for row in store.db.select("source_id"):
        if statuses.get(row.source_id) != "source":
            problems.append(f"row {row.id}: region of row {row.source_id}, which is not a source frame")
    counts = {s: sum(v == s for v in statuses.values()) for s in STATUSES}
    if sum(counts.values()) != len(statuses):
        problems.append(f"status counts {counts} do not add up to {len(statuses)} rows")
    with store.transaction() as cur:
        cur.execute(f"SELECT id, owner, {store._now()} - expires FROM probe_claims ORDER BY id")
        claims = cur.fetchall()
    live = 0
    for row_id, owner, overdue in claims:
        if statuses.get(row_id) != "pending":
            problems.append(f"claim by {owner} on row {row_id}, which is {statuses.get(row_id, 'missing')}")
        elif overdue > 0:
            problems.append(f"orphaned claim by {owner} on row {row_id}: lease lapsed {overdue:.0f} s ago "
                            "(its driver died; the next label() takes it over)")
        else:
            live += 1
    for record in store.rounds():
        for path in (record.model, record.probe) if record.finished is not None else ():
            if path is not None and not os.path.exists(path):
                problems.append(f"round {record.round}: file {path} is missing")
    return IntegrityReport(counts, len(statuses), live, problems)
