"""A throwaway PostgreSQL server for tests and benchmarks: its own data directory, loopback only.

Needs PostgreSQL's server binaries (``initdb``, ``pg_ctl``; Debian:
``apt-get install postgresql``) and the ``postgres`` extra (psycopg2 and
ase-db-backends). The server refuses to run as root, so as root it runs as
the ``postgres`` user.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager


def server_binaries() -> str | None:
    """The folder holding ``initdb`` and ``pg_ctl`` (PATH first, then Debian's layout), or None."""
    found = shutil.which("pg_ctl")
    if found and shutil.which("initdb"):
        return os.path.dirname(os.path.realpath(found))
    for folder in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if os.path.exists(os.path.join(folder, "initdb")):
            return folder
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def postgres_server(user: str = "probe") -> Iterator[str]:
    """Start a server on 127.0.0.1 in a temporary folder; yield the URL of its ``postgres`` database; stop it.

    The superuser ``user`` logs in without a password (trust, loopback only).
    Stopped with ``-m immediate`` and its folder removed on exit.
    """
    binaries = server_binaries()
    if binaries is None:
        raise FileNotFoundError("PostgreSQL server binaries (initdb, pg_ctl) not found")
    root = tempfile.mkdtemp(prefix="probe-ase-pg-")
    run_as: list[str] = []
    if os.geteuid() == 0:  # initdb and postgres refuse root
        os.chown(root, pwd.getpwnam("postgres").pw_uid, -1)
        run_as = ["runuser", "-u", "postgres", "--"]
    data, port = os.path.join(root, "data"), _free_port()
    pg_ctl = [*run_as, os.path.join(binaries, "pg_ctl"), "-D", data]
    try:
        subprocess.run([*run_as, os.path.join(binaries, "initdb"), "-D", data, "-A", "trust", "-U", user,
                        "--no-sync"], check=True, capture_output=True)
        subprocess.run([*pg_ctl, "-o", f"-h 127.0.0.1 -p {port} -k {root} -F", "-l", os.path.join(root, "log"),
                        "-w", "start"], check=True, capture_output=True)
        try:
            yield f"postgresql://{user}@127.0.0.1:{port}/postgres"
        finally:
            subprocess.run([*pg_ctl, "-m", "immediate", "stop"], capture_output=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def create_database(server_url: str, prefix: str = "al") -> str:
    """Create an empty database on the server at ``server_url``; return its URL."""

    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    _admin(server_url, f"CREATE DATABASE {name}")
    return server_url.rsplit("/", 1)[0] + "/" + name


def drop_database(server_url: str, url: str) -> None:
    """Drop the database at ``url`` (made by :func:`create_database` on ``server_url``), closing its connections."""

    _admin(server_url, f"DROP DATABASE IF EXISTS {url.rsplit('/', 1)[1]} WITH (FORCE)")


def _admin(server_url: str, sql: str) -> None:
    """Run one statement outside a transaction (CREATE / DROP DATABASE need that)."""
    import psycopg2

    con = psycopg2.connect(server_url)
    try:
        con.autocommit = True
        with con.cursor() as cur:
            cur.execute(sql)
    finally:
        con.close()
