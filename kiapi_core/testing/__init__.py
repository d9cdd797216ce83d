"""Helpers for testing kiapi and its plugins, in-process or against a real server process.

``create_app(Settings(...), extra_plugins=[(name, module)])`` builds the app in-process (drive
it with Starlette's ``TestClient``); ``start_server(home, env)`` runs ``kiapi serve`` exactly as
a user would (its own process, a free loopback port) and waits for ``/health``;
``LiveServer.kill()`` sends SIGKILL for crash tests. Plugin authors can use these in their own
suites.

Tiny random checkpoints for model plugins' tests: ``write_safetensors`` with ``Tensor`` /
``TensorSink`` (BF16, F32 and FP8 E4M3 Linear weights) and ``write_qwen_tokenizer`` (a locally
trained Qwen-style tokenizer); they need numpy / tokenizers and are imported on first use.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kiapi_core.app import create_app as create_app
    from kiapi_core.testing.safetensors import Tensor as Tensor
    from kiapi_core.testing.safetensors import TensorSink as TensorSink
    from kiapi_core.testing.safetensors import write_safetensors as write_safetensors
    from kiapi_core.testing.tokenizer import write_qwen_tokenizer as write_qwen_tokenizer

# Checkpoint-building helpers: name -> module, imported on first use (they need numpy).
_CHECKPOINT_HELPERS = {
    "Tensor": "safetensors",
    "TensorSink": "safetensors",
    "write_safetensors": "safetensors",
    "write_qwen_tokenizer": "tokenizer",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class LiveServer:
    url: str
    proc: subprocess.Popen[bytes]
    home: Path
    log: Path

    def client(self, **kw: Any) -> Any:
        import httpx

        return httpx.Client(base_url=self.url, timeout=kw.pop("timeout", 120), **kw)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def kiapi_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "kiapi_core.cli", *args]


def start_server(
    home: Path, env: dict[str, str] | None = None, port: int | None = None, wait_s: float = 60
) -> LiveServer:
    """``kiapi serve`` as a real process on a free loopback port, ready when this returns."""
    import httpx

    port = port or free_port()
    home.mkdir(parents=True, exist_ok=True)
    log = home / f"server-{port}.log"
    full_env = {**os.environ, "KIAPI_HOME": str(home), "TQDM_DISABLE": "1", **(env or {})}
    with log.open("ab") as out:
        proc = subprocess.Popen(
            kiapi_command("serve", "--port", str(port)),
            env=full_env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    server = LiveServer(f"http://127.0.0.1:{port}", proc, home, log)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{server.output()}")
        try:
            if httpx.get(server.url + "/health", timeout=1).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    server.stop()
    raise RuntimeError(f"server did not start in {wait_s}s:\n{server.output()}")


def wait_for(predicate: Callable[[], Any], timeout: float = 30, interval: float = 0.05) -> Any:
    """Poll until ``predicate()`` is truthy; its value, or AssertionError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s")


def __getattr__(name: str) -> Any:
    # create_app pulls in the whole host: imported when a test asks for it, so a script that
    # only starts servers stays light.
    if name == "create_app":
        from kiapi_core.app import create_app

        return create_app
    if name in _CHECKPOINT_HELPERS:
        import importlib

        module = importlib.import_module(f"kiapi_core.testing.{_CHECKPOINT_HELPERS[name]}")
        return getattr(module, name)
    raise AttributeError(f"module 'kiapi_core.testing' has no attribute {name!r}")
