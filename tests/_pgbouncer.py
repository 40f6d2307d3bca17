"""A PgBouncer of the tests' own, in transaction pooling, in front of the test server.

``start_pgbouncer(server_dsn)`` runs Debian's ``pgbouncer`` (``apt-get
install pgbouncer``; ``.ci/run`` installs it) on a free port of 127.0.0.1,
with ``pool_mode = transaction``, in front of the server the tests use (the
embedded pgserver's Unix socket or ``NEOQ_TEST_DSN``'s host), and stops it
when the block ends. One instance serves a whole test module: it is cheap to
share, as PgBouncer keeps a pool per database and user.

Every test through it gets a role of its own (``PooledDatabase``), whose
default ``search_path`` is a schema of its own: PgBouncer 1.18 refuses
libpq's ``options`` startup parameter, which the other tests use to pick
their schema, and a role's settings are what a fresh server session starts
with, so they hold whichever server session PgBouncer hands out. The servers
the tests use take any role without a password, and so does PgBouncer
(``auth_type = trust``, roles looked up on the server with ``auth_user``).

Two databases are declared: every name (``*``) is the server's database of
that name, with ``DEFAULT_POOL_SIZE`` server sessions per role; and
``SINGLE`` is the test database behind a single server session, where what
transaction pooling does to session state shows at once.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import TYPE_CHECKING

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

if TYPE_CHECKING:
    from collections.abc import Iterator

__all__ = [
    "DEFAULT_POOL_SIZE",
    "SINGLE",
    "PgBouncer",
    "PooledDatabase",
    "pgbouncer_path",
    "pooled_database",
    "start_pgbouncer",
]

DEFAULT_POOL_SIZE = 10
"""Server sessions PgBouncer opens per database and role."""

SINGLE = "neoq_single"
"""The database alias behind one server session."""

_STARTUP_TIMEOUT = 10.0
_STOP_TIMEOUT = 10.0


def pgbouncer_path() -> str | None:
    """Where the ``pgbouncer`` executable is (Debian puts it in /usr/sbin), or None."""
    return shutil.which("pgbouncer") or shutil.which("pgbouncer", path="/usr/sbin:/usr/local/sbin")


class PgBouncer:
    """A running PgBouncer; get one from :func:`start_pgbouncer`.

    Attributes:
        port: the port it listens on, on 127.0.0.1.
        server_dsn: the connection string of the server behind it.
        log: its log file (PgBouncer writes to stderr when not daemonised).
    """

    def __init__(self, port: int, server_dsn: str, log: Path) -> None:
        self.port = port
        self.server_dsn = server_dsn
        self.log = log

    def dsn(self, *, user: str, dbname: str, **params: str) -> str:
        """A key=value connection string leading through PgBouncer."""
        return make_conninfo(
            "", host="127.0.0.1", port=str(self.port), user=user, dbname=dbname, **params
        )

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _run_as(host: str) -> list[str]:
    """``-u USER`` when running as root, which PgBouncer refuses to run as: the
    owner of the server's socket directory (pgserver runs as a user of its
    own, and keeps its socket in a private directory), else postgres or nobody."""
    if os.geteuid() != 0:
        return []
    if host.startswith("/"):
        with suppress(OSError, KeyError):
            owner = pwd.getpwuid(Path(host).stat().st_uid).pw_name
            if owner != "root":
                return ["-u", owner]
    for name in ("postgres", "nobody"):
        with suppress(KeyError):
            pwd.getpwnam(name)
            return ["-u", name]
    raise RuntimeError("PgBouncer will not run as root, and neither postgres nor nobody exists")


def _config(port: int, server: dict[str, str], auth_file: Path, pool_size: int) -> str:
    host = server.get("host") or "/var/run/postgresql"
    target = f"host={host} port={server.get('port') or '5432'}"
    return f"""\
[databases]
{SINGLE} = {target} dbname={server.get("dbname") or "postgres"} pool_size=1
* = {target}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = trust
auth_file = {auth_file}
auth_user = {server.get("user") or "postgres"}
pool_mode = transaction
default_pool_size = {pool_size}
max_client_conn = 500
server_idle_timeout = 10
server_lifetime = 600
query_wait_timeout = 30
log_connections = 0
log_disconnections = 0
"""


def _wait_listening(process: subprocess.Popen[bytes], port: int, log: Path) -> None:
    """Poll the port until pgbouncer listens (bounded); between tries, wait on
    the process itself, so an exit at startup is reported at once."""
    deadline = time.monotonic() + _STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        try:
            process.wait(timeout=0.02)
        except subprocess.TimeoutExpired:
            continue
        raise RuntimeError(f"pgbouncer exited at startup:\n{log.read_text(errors='replace')}")
    raise RuntimeError(f"pgbouncer not listening within {_STARTUP_TIMEOUT:g} s")


@contextmanager
def start_pgbouncer(server_dsn: str, *, pool_size: int = DEFAULT_POOL_SIZE) -> Iterator[PgBouncer]:
    """Run a PgBouncer in front of ``server_dsn``'s server for the block, with
    ``pool_size`` server sessions per database and role.

    Raises:
        RuntimeError: pgbouncer is not installed, or did not start.
    """
    executable = pgbouncer_path()
    if executable is None:
        raise RuntimeError("pgbouncer is not installed (apt-get install pgbouncer)")
    server = {k: str(v) for k, v in conninfo_to_dict(server_dsn).items()}
    directory = Path(tempfile.mkdtemp(prefix="neoq-pgbouncer-"))
    # Readable by the user PgBouncer drops to when started as root.
    directory.chmod(0o755)
    auth_file = directory / "users.txt"
    auth_file.write_text(f'"{server.get("user") or "postgres"}" ""\n')
    log = directory / "pgbouncer.log"
    process: subprocess.Popen[bytes] | None = None
    try:
        for _ in range(3):  # the free port may be taken in between: try another
            port = _free_port()
            ini = directory / "pgbouncer.ini"
            ini.write_text(_config(port, server, auth_file, pool_size))
            for path in (auth_file, ini):
                path.chmod(0o644)
            with log.open("ab") as out:
                command = [executable, *_run_as(server.get("host") or ""), str(ini)]
                process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
            try:
                _wait_listening(process, port, log)
            except RuntimeError:
                if process.poll() is None:
                    raise
                continue
            break
        else:
            raise RuntimeError(f"pgbouncer did not start:\n{log.read_text(errors='replace')}")
        yield PgBouncer(port, server_dsn, log)
    finally:
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)  # immediate shutdown
            try:
                process.wait(_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        shutil.rmtree(directory, ignore_errors=True)


class PooledDatabase:
    """A role and its schema, reached through PgBouncer or directly.

    Attributes:
        role: the role's name, also its schema's.
        dsn: through PgBouncer, as that role.
        direct_dsn: straight to the server, as that role (for LISTEN, and
            for the tests' own look at the tables).
        single_dsn: through PgBouncer's one-session database, as that role.
    """

    def __init__(self, bouncer: PgBouncer, role: str) -> None:
        self.role = role
        server = conninfo_to_dict(bouncer.server_dsn)
        dbname = str(server.get("dbname") or "postgres")
        self.dsn = bouncer.dsn(user=role, dbname=dbname)
        self.direct_dsn = make_conninfo(bouncer.server_dsn, user=role)
        self.single_dsn = bouncer.dsn(user=role, dbname=SINGLE)


@contextmanager
def pooled_database(bouncer: PgBouncer) -> Iterator[PooledDatabase]:
    """A fresh role whose default search_path is a fresh schema it owns; both
    dropped afterwards, with every server session of the role ended first."""
    role = f"t_{uuid.uuid4().hex[:12]}"
    ident = sql.Identifier(role)
    with psycopg.connect(bouncer.server_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(ident))
        conn.execute(sql.SQL("CREATE SCHEMA {} AUTHORIZATION {}").format(ident, ident))
        conn.execute(sql.SQL("ALTER ROLE {} SET search_path = {}").format(ident, ident))
    try:
        yield PooledDatabase(bouncer, role)
    finally:
        with psycopg.connect(bouncer.server_dsn, autocommit=True) as conn:
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s",
                (role,),
            )
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(ident))
            conn.execute(sql.SQL("DROP OWNED BY {}").format(ident))
            conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(ident))
