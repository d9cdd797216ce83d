"""Helpers for testing the celery backend with real processes: a throwaway ``redis-server`` and
``kiapi worker`` processes, next to ``kiapi_core.testing.start_server`` for API nodes."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from kiapi_core.testing import free_port, kiapi_command


@dataclass
class RedisServer:
    """A ``redis-server`` on a free loopback port with its data in ``dir``, AOF on."""

    port: int
    dir: Path
    proc: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        """SIGTERM: Redis flushes its append-only file and exits."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def restart(self, down_s: float = 0.0, wait_s: float = 15) -> None:
        """Stop, stay down ``down_s``, start again on the same port and data."""
        self.stop()
        time.sleep(down_s)
        self.proc = _spawn(self.port, self.dir)
        _wait_ready(self, wait_s)


def redis_server_binary() -> str | None:
    return shutil.which("redis-server") or (
        "/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists() else None
    )


def _spawn(port: int, directory: Path) -> subprocess.Popen[bytes]:
    binary = redis_server_binary()
    if binary is None:
        raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
    # No RDB snapshots; the append-only file is the durability kiapi's docs ask for.
    args = ["--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory), "--save", ""]
    args += ["--appendonly", "yes", "--daemonize", "no", "--logfile", str(directory / "redis.log")]
    return subprocess.Popen([binary, *args], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)


def _wait_ready(server: RedisServer, wait_s: float) -> None:
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            log = (server.dir / "redis.log").read_text(errors="replace")
            raise RuntimeError(f"redis-server exited with {server.proc.returncode}: {log}")
        try:
            with socket.create_connection(("127.0.0.1", server.port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                if sock.recv(16).startswith(b"+PONG"):
                    return
        except OSError:
            pass
        time.sleep(0.02)
    server.stop()
    raise RuntimeError(f"redis-server did not answer on port {server.port} within {wait_s}s")


def start_redis(directory: Path, wait_s: float = 15) -> RedisServer:
    directory.mkdir(parents=True, exist_ok=True)
    port = free_port()
    server = RedisServer(port, directory, _spawn(port, directory))
    _wait_ready(server, wait_s)
    return server


@dataclass
class LiveWorker:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout: float = 30) -> None:
        """SIGTERM (Celery's warm shutdown: running jobs finish first), then SIGKILL."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def start_worker(
    home: Path,
    name: str,
    env: dict[str, str],
    *args: str,
    wait_s: float = 60,
) -> LiveWorker:
    """``kiapi worker --name NAME ARGS`` as a real process; returns once it consumes.

    Ready means announced in the worker directory (``P:worker:NAME@host`` in Redis), which the
    worker does on Celery's ``worker_ready``.
    """
    import redis

    home.mkdir(parents=True, exist_ok=True)
    log = home / f"worker-{name}.log"
    full_env = {**os.environ, "KIAPI_HOME": str(home), "TQDM_DISABLE": "1", **env}
    node = name if "@" in name else f"{name}@{socket.gethostname()}"
    with log.open("ab") as out:
        proc = subprocess.Popen(
            kiapi_command("worker", "--name", node, *args),
            env=full_env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    worker = LiveWorker(node, proc, log)
    client = redis.Redis.from_url(full_env["KIAPI_REDIS_URL"])
    key = f"{full_env.get('KIAPI_REDIS_PREFIX', 'kiapi')}:worker:{node}"
    deadline = time.monotonic() + wait_s
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"worker exited with {proc.returncode}:\n{worker.output()}")
            if client.exists(key):
                return worker
            time.sleep(0.05)
    finally:
        client.close()
    worker.kill()
    raise RuntimeError(f"worker {name} was not ready within {wait_s}s:\n{worker.output()}")
