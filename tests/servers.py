"""Throwaway PostgreSQL and MariaDB servers for the tests, on 127.0.0.1 at free ports.

Each server lives in its own temporary folder (data, socket, log), is started by
:func:`start_postgres` / :func:`start_mariadb` and stopped (then its folder removed) by
:func:`stop_postgres` / :func:`stop_mariadb`. Every wait is bounded: readiness is polled with
a deadline, and a server whose graceful stop hangs is killed by its own process id.

The binaries come from the Debian packages ``postgresql-15`` and ``mariadb-server``
(``make services``). ``initdb``/``pg_ctl`` refuse to run as root, so as root they run as the
``postgres`` user through ``runuser``, in a folder that user owns (mode 0755).
"""
from __future__ import annotations

import contextlib
import glob
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

HOST = "127.0.0.1"
USER = "lrq"
START_TIMEOUT = 60.0
STOP_TIMEOUT = 20.0
PORT_ATTEMPTS = 3  # a free port can be taken between picking it and the server binding it

T = TypeVar("T")


class ServerError(RuntimeError):
    """A test server could not be started."""


# ---------------------------------------------------------------- helpers


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def wait_for(check: Callable[[], T | None], timeout: float, what: str,
             interval: float = 0.05) -> T:
    """Poll ``check`` until it returns something other than None; raise after ``timeout`` s.

    ``check`` may raise :class:`ServerError` to give up early (e.g. the server exited).
    """
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while True:
        try:
            result = check()
            if result is not None:
                return result
        except ServerError:
            raise
        except Exception as e:  # noqa: BLE001 - not ready yet; remember why
            last = e
        if time.monotonic() >= deadline:
            raise ServerError(f"{what}: not ready after {timeout:.0f} s"
                              + (f" (last error: {last})" if last else ""))
        time.sleep(interval)


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"({path} not readable)"


def _run(cmd: list[str], timeout: float, what: str, log: Path | None = None) -> None:
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                           stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as e:
        raise ServerError(f"{what}: `{' '.join(cmd)}` did not finish in {timeout:.0f} s") from e
    if p.returncode != 0:
        more = f"\n--- {log}:\n{_tail(log)}" if log is not None else ""
        raise ServerError(f"{what}: `{' '.join(cmd)}` exited {p.returncode}:\n"
                          f"{p.stdout}{p.stderr}{more}")


def _pid_alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie, left by a non-reaping init, counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _is_root() -> bool:
    return os.geteuid() == 0


# ---------------------------------------------------------------- PostgreSQL


def find_postgres_bin() -> Path | None:
    """The folder holding ``initdb`` and ``pg_ctl`` (newest Debian version first), or None."""
    def version(d: str) -> tuple[int, ...]:
        v = Path(d).parent.name
        return tuple(int(x) for x in v.split(".") if x.isdigit()) or (0,)

    for d in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=version, reverse=True):
        if os.access(f"{d}/initdb", os.X_OK) and os.access(f"{d}/pg_ctl", os.X_OK):
            return Path(d)
    initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
    if initdb and pg_ctl:
        return Path(os.path.realpath(initdb)).parent
    return None


@dataclass
class PostgresServer:
    root: Path          # temporary folder: data/, the socket, server.log
    bindir: Path
    port: int
    password: str       # of USER, which owns ``database`` and may create databases
    database: str = "lrq"
    user: str = USER
    host: str = HOST
    opts: str = ""      # the server options it was started with, for ``start_again``
    _created: list[str] = field(default_factory=list, repr=False)

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def log(self) -> Path:
        return self.root / "server.log"

    def url(self, database: str | None = None) -> str:
        return (f"postgresql+psycopg://{self.user}:{self.password}@{self.host}:{self.port}/"
                f"{database or self.database}")

    def connect(self, database: str | None = None, user: str | None = None,
                password: str | None = None):  # -> psycopg.Connection
        import psycopg

        return psycopg.connect(host=self.host, port=self.port, dbname=database or self.database,
                               user=user or self.user, password=password or self.password,
                               connect_timeout=5, autocommit=True,
                               options="-c statement_timeout=30000 -c lock_timeout=10000")

    def create_database(self, name: str | None = None) -> str:
        """A new, empty database owned by USER; returns its name."""
        name = name or f"lrq_t_{secrets.token_hex(4)}"
        with self.connect() as conn:
            conn.execute(f'CREATE DATABASE "{name}" OWNER "{self.user}"')
        return name

    def drop_database(self, name: str) -> None:
        """Drop ``name``, ending any session still connected to it (PostgreSQL 13+)."""
        with self.connect() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _as_postgres(cmd: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *cmd] if _is_root() else cmd


def start_postgres(timeout: float = START_TIMEOUT) -> PostgresServer:
    """initdb + pg_ctl start in a new temporary folder; USER and its database created."""
    bindir = find_postgres_bin()
    if bindir is None:
        raise ServerError("PostgreSQL server binaries (initdb, pg_ctl) not found")
    root = Path(tempfile.mkdtemp(prefix="lrq-pg-"))
    try:
        os.chmod(root, 0o755)  # the postgres user must reach it (mkdtemp makes 0700)
        if _is_root():
            try:
                pw = pwd.getpwnam("postgres")
            except KeyError:
                raise ServerError("running as root needs the 'postgres' user "
                                  "(made by the postgresql-common package)") from None
            os.chown(root, pw.pw_uid, pw.pw_gid)
        superpass = secrets.token_hex(12)
        pwfile = root / "superuser.pw"
        pwfile.write_text(superpass + "\n")
        if _is_root():
            os.chown(pwfile, pw.pw_uid, pw.pw_gid)
        _run(_as_postgres([str(bindir / "initdb"), "-D", str(root / "data"), "-U", "postgres",
                           f"--pwfile={pwfile}", "--auth-local=trust",
                           "--auth-host=scram-sha-256", "-E", "UTF8", "--locale=C",
                           "--no-sync", "--no-instructions"]),
             timeout, "initdb")
        pwfile.unlink()
        server = None
        for attempt in range(PORT_ATTEMPTS):
            port = free_port()
            server = PostgresServer(
                root=root, bindir=bindir, port=port, password=secrets.token_hex(12),
                opts=(f"-c listen_addresses={HOST} -p {port} -k {root} "
                      "-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
                      "-c max_connections=100 -c shared_buffers=32MB"))
            try:
                start_again(server, timeout)
                break
            except ServerError:
                if attempt + 1 < PORT_ATTEMPTS and "already in use" in _tail(server.log, 10):
                    continue
                raise
        assert server is not None

        def superuser_connects():
            import psycopg

            return psycopg.connect(host=HOST, port=server.port, dbname="postgres",
                                   user="postgres", password=superpass, connect_timeout=2,
                                   autocommit=True)

        conn = wait_for(superuser_connects, timeout, f"PostgreSQL on {HOST}:{server.port}")
        with conn:
            conn.execute(f"CREATE ROLE \"{server.user}\" LOGIN CREATEDB "
                         f"PASSWORD '{server.password}'")
            conn.execute(f'CREATE DATABASE "{server.database}" OWNER "{server.user}"')
        return server
    except BaseException:
        _stop_postgres_in(root, bindir)
        shutil.rmtree(root, ignore_errors=True)
        raise


def _stop_postgres_in(root: Path, bindir: Path, timeout: float = STOP_TIMEOUT) -> None:
    data = root / "data"
    pidfile = data / "postmaster.pid"
    if not pidfile.exists():
        return
    try:
        pid = int(pidfile.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        pid = None
    try:
        _run(_as_postgres([str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "-t",
                           str(int(timeout)), "stop"]), timeout + 5, "pg_ctl stop")
        return
    except ServerError:
        pass
    if pid is not None and _pid_alive(pid):  # the graceful stop hung: kill our postmaster
        os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ServerError):
            wait_for(lambda: None if _pid_alive(pid) else True, 10, f"postgres pid {pid} exit")


def halt_postgres(server: PostgresServer, timeout: float = STOP_TIMEOUT) -> None:
    """``pg_ctl stop -m fast``, keeping the data: every connection is cut and the port stays
    closed until ``start_again``."""
    _run(_as_postgres([str(server.bindir / "pg_ctl"), "-D", str(server.data), "-m", "fast",
                       "-w", "-t", str(int(timeout)), "stop"]), timeout + 5, "pg_ctl stop",
         server.log)


def start_again(server: PostgresServer, timeout: float = START_TIMEOUT) -> None:
    """``pg_ctl start`` on the server's data, port and options (after ``halt_postgres``)."""
    _run(_as_postgres([str(server.bindir / "pg_ctl"), "-D", str(server.data), "-l",
                       str(server.log), "-w", "-t", str(int(timeout)), "-o", server.opts,
                       "start"]), timeout + 10, "pg_ctl start", server.log)


def stop_postgres(server: PostgresServer, timeout: float = STOP_TIMEOUT) -> None:
    """Stop (fast shutdown, else SIGKILL) and remove the server's folder."""
    try:
        _stop_postgres_in(server.root, server.bindir, timeout)
    finally:
        shutil.rmtree(server.root, ignore_errors=True)


# ---------------------------------------------------------------- MariaDB


def find_mariadbd() -> str | None:
    for name in ("mariadbd", "mysqld"):
        found = shutil.which(name)
        if found:
            return found
        for d in ("/usr/sbin", "/usr/local/sbin", "/usr/libexec"):
            if os.access(f"{d}/{name}", os.X_OK):
                return f"{d}/{name}"
    return None


def find_mariadb_install_db() -> str | None:
    for name in ("mariadb-install-db", "mysql_install_db"):
        found = shutil.which(name) or next(
            (f"{d}/{name}" for d in ("/usr/bin", "/usr/sbin", "/usr/local/bin")
             if os.access(f"{d}/{name}", os.X_OK)), None)
        if found:
            return found
    return None


@dataclass
class MariaDBServer:
    root: Path          # temporary folder: data/, the socket, error.log
    proc: subprocess.Popen
    port: int
    password: str       # of USER@127.0.0.1, which has every privilege
    database: str = "lrq"
    user: str = USER
    host: str = HOST

    @property
    def log(self) -> Path:
        return self.root / "error.log"

    def url(self, database: str | None = None) -> str:
        return (f"mysql+pymysql://{self.user}:{self.password}@{self.host}:{self.port}/"
                f"{database or self.database}?charset=utf8mb4")

    def connect(self, database: str | None = None):  # -> pymysql.Connection
        import pymysql

        return pymysql.connect(host=self.host, port=self.port, user=self.user,
                               password=self.password, database=database, connect_timeout=5,
                               read_timeout=60, write_timeout=60, autocommit=True,
                               charset="utf8mb4")

    def _admin(self, sql: str) -> None:
        conn = self.connect()
        try:
            with conn.cursor() as cur:
                cur.execute("SET SESSION lock_wait_timeout = 10")
                cur.execute(sql)
        finally:
            conn.close()

    def create_database(self, name: str | None = None) -> str:
        name = name or f"lrq_t_{secrets.token_hex(4)}"
        self._admin(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4 "
                    "COLLATE utf8mb4_unicode_ci")
        return name

    def drop_database(self, name: str) -> None:
        self._admin(f"DROP DATABASE IF EXISTS `{name}`")


def start_mariadb(timeout: float = START_TIMEOUT) -> MariaDBServer:
    """mariadb-install-db + mariadbd in a new temporary folder; USER and its database created.

    root can only log in through the socket, so the TCP user PyMySQL needs is made by an
    ``--init-file`` the server runs at start-up.
    """
    mariadbd, install_db = find_mariadbd(), find_mariadb_install_db()
    if mariadbd is None or install_db is None:
        raise ServerError("MariaDB server binaries (mariadbd, mariadb-install-db) not found")
    root = Path(tempfile.mkdtemp(prefix="lrq-mariadb-"))
    proc: subprocess.Popen | None = None
    try:
        data = root / "data"
        user = ["--user=root"] if _is_root() else []
        _run([install_db, "--no-defaults", *user, f"--datadir={data}",
              "--auth-root-authentication-method=socket", "--skip-test-db",
              "--skip-name-resolve"], timeout, "mariadb-install-db")
        password = secrets.token_hex(12)
        database = "lrq"
        init = root / "init.sql"
        init.write_text(
            f"CREATE USER IF NOT EXISTS '{USER}'@'{HOST}' IDENTIFIED BY '{password}';\n"
            f"GRANT ALL PRIVILEGES ON *.* TO '{USER}'@'{HOST}' WITH GRANT OPTION;\n"
            f"CREATE DATABASE IF NOT EXISTS `{database}` CHARACTER SET utf8mb4 "
            "COLLATE utf8mb4_unicode_ci;\n")
        for attempt in range(PORT_ATTEMPTS):
            port = free_port()
            log = root / "error.log"
            log.unlink(missing_ok=True)
            with open(root / "stdout.log", "ab") as out:
                proc = subprocess.Popen(
                    [mariadbd, "--no-defaults", *user, f"--datadir={data}",
                     f"--socket={root / 'mysqld.sock'}", f"--pid-file={root / 'mariadbd.pid'}",
                     f"--log-error={log}", f"--tmpdir={root}", f"--port={port}",
                     f"--bind-address={HOST}", "--skip-name-resolve", f"--init-file={init}",
                     "--character-set-server=utf8mb4", "--collation-server=utf8mb4_unicode_ci",
                     "--skip-log-bin", "--innodb-flush-log-at-trx-commit=0",
                     "--innodb-doublewrite=0", "--innodb-buffer-pool-size=64M",
                     "--innodb-use-native-aio=0", "--max-connections=200"],
                    stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                    start_new_session=True)
            server = MariaDBServer(root=root, proc=proc, port=port, password=password,
                                   database=database)

            def ready(server: MariaDBServer = server):
                if server.proc.poll() is not None:
                    raise ServerError(f"mariadbd exited {server.proc.returncode}:\n"
                                      f"{_tail(server.log)}")
                conn = server.connect(server.database)
                conn.close()
                return True

            try:
                wait_for(ready, timeout, f"MariaDB on {HOST}:{port}")
                return server
            except ServerError:
                _stop_process(proc)
                if attempt + 1 < PORT_ATTEMPTS and "already in use" in _tail(log, 20):
                    continue
                raise
        raise AssertionError("unreachable")
    except BaseException:
        if proc is not None:
            _stop_process(proc)
        shutil.rmtree(root, ignore_errors=True)
        raise


def _stop_process(proc: subprocess.Popen, timeout: float = STOP_TIMEOUT) -> None:
    """SIGTERM (a graceful shutdown for mariadbd), then SIGKILL if it hangs."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def stop_mariadb(server: MariaDBServer, timeout: float = STOP_TIMEOUT) -> None:
    try:
        _stop_process(server.proc, timeout)
    finally:
        shutil.rmtree(server.root, ignore_errors=True)
