"""A throwaway PostgreSQL server for the tests: initdb in a temp dir, pg_ctl start on a free port, stop, delete.

    with PostgresServer.start() as server:
        url = server.create_database("t1")      # postgresql+psycopg://postgres@127.0.0.1:PORT/t1

The binaries are Debian's (`apt-get install postgresql`, scripts/setup.sh): `initdb` and `pg_ctl` on
PATH, else the newest /usr/lib/postgresql/<N>/bin (Debian keeps them off PATH). PostgreSQL refuses to
run as root, so as root every server command runs as the `postgres` system user (`runuser -u
postgres`), in a directory that user owns. `postgres` runs in the foreground as our (grand)child, so
a SIGKILLed server is reaped here even where PID 1 reaps no orphans. The server listens on 127.0.0.1 only, with trust
authentication for its one superuser; fsync stays on (the durability tests rely on it). A missing
binary or user fails with the fix in the message; nothing is skipped.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from support import free_port

SUPERUSER = "postgres"
SYSTEM_USER = "postgres"
"""The account the server runs as when the tests run as root (Debian's package creates it)."""
START_TIMEOUT_S = 60
_DEBIAN_BIN_GLOB = "/usr/lib/postgresql/*/bin"


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL server binaries (or no user to run them as) on this machine."""


def server_bin_dir() -> Path:
    """The directory holding initdb and pg_ctl: PATH first, then Debian's newest /usr/lib/postgresql/N/bin."""
    on_path = shutil.which("initdb")
    if on_path and shutil.which("pg_ctl"):
        return Path(on_path).resolve().parent
    versions = sorted(glob.glob(_DEBIAN_BIN_GLOB), key=lambda p: int(Path(p).parent.name) if
                      Path(p).parent.name.isdigit() else 0)
    for candidate in reversed(versions):
        if (Path(candidate) / "initdb").is_file() and (Path(candidate) / "pg_ctl").is_file():
            return Path(candidate)
    raise PostgresUnavailable("no PostgreSQL server binaries (initdb, pg_ctl): run `bash scripts/setup.sh` "
                              "(it installs Debian's postgresql package)")


class PostgresServer:
    """A running throwaway server; `stop()` shuts it down and deletes its files."""

    def __init__(self, root: Path, bin_dir: Path, port: int, as_user: str | None):
        self.root = root
        self.data_dir = root / "data"
        self.log_path = root / "server.log"
        self.port = port
        self._bin_dir = bin_dir
        self._as_user = as_user
        self._process: subprocess.Popen | None = None
        self._databases = 0

    @classmethod
    def start(cls) -> PostgresServer:
        bin_dir = server_bin_dir()
        as_user = None
        root = Path(tempfile.mkdtemp(prefix="voxloop-pg-"))
        if os.geteuid() == 0:
            try:
                shutil.chown(root, SYSTEM_USER, SYSTEM_USER)
            except LookupError:
                shutil.rmtree(root)
                raise PostgresUnavailable(f"running as root, and there is no {SYSTEM_USER!r} user to run PostgreSQL "
                                          "as: install Debian's postgresql package (scripts/setup.sh)") from None
            as_user = SYSTEM_USER
        server = cls(root, bin_dir, free_port(), as_user)
        try:
            result = subprocess.run(
                server._command("initdb", "--pgdata", str(server.data_dir), "--username", SUPERUSER, "--auth",
                                "trust", "--encoding", "UTF8", "--no-instructions"),
                capture_output=True, text=True, timeout=120)
            if result.returncode != 0:
                raise RuntimeError(f"initdb failed ({result.returncode}): {result.stderr or result.stdout}")
            server.start_again()
        except BaseException:
            server.stop()
            raise
        return server

    def _command(self, tool: str, *args: str) -> list[str]:
        command = [str(self._bin_dir / tool), *args]
        # runuser forks and waits: the server stays a grandchild we can signal, and `runuser` reaps it.
        return ["runuser", "-u", self._as_user, "--", *command] if self._as_user else command

    def start_again(self) -> None:
        """(Re)start the server on its port (after `kill`, this is crash recovery from the WAL).

        `postgres` runs in the foreground under this process (not daemonized by pg_ctl), so it is
        reaped here even where PID 1 reaps no orphans.
        """
        import psycopg

        command = self._command("postgres", "-D", str(self.data_dir), "-p", str(self.port),
                                "-c", "listen_addresses=127.0.0.1", "-c", "unix_socket_directories=")
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self._process.poll() is not None:
                raise RuntimeError(f"postgres exited with {self._process.returncode}:\n{self._log_tail()}")
            try:
                psycopg.connect(f"host=127.0.0.1 port={self.port} user={SUPERUSER} dbname=postgres",
                                connect_timeout=2).close()
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"postgres did not accept connections within {START_TIMEOUT_S} s:\n"
                                       f"{self._log_tail()}") from None
                time.sleep(0.05)

    def _log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-2000:] if self.log_path.exists() else ""

    def _postmaster_pid(self) -> int:
        return int((self.data_dir / "postmaster.pid").read_text().split()[0])

    def kill(self) -> None:
        """SIGKILL the postmaster: a crash, no checkpoint, nothing kept beyond what was committed.

        Its backends notice the postmaster's death and exit; the next start runs WAL recovery.
        """
        os.kill(self._postmaster_pid(), signal.SIGKILL)
        self._process.wait(30)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def create_database(self, prefix: str = "voxloop") -> str:
        """A new empty database; returns its SQLAlchemy URL."""
        import sqlalchemy as sa

        self._databases += 1
        name = f"{prefix}_{self._databases}"
        engine = sa.create_engine(self.url(), isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as conn:
                conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
        finally:
            engine.dispose()
        return self.url(name)

    def stop(self) -> None:
        """Stop the server (fast shutdown: SIGINT) and delete its directory. Idempotent."""
        if self._process is not None and self._process.poll() is None:
            with contextlib.suppress(ProcessLookupError, FileNotFoundError):
                os.kill(self._postmaster_pid(), signal.SIGINT)
            try:
                self._process.wait(30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, FileNotFoundError):
                    os.kill(self._postmaster_pid(), signal.SIGKILL)
                self._process.wait(30)
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> PostgresServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
