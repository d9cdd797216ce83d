"""Talking to a running kiapi server from the command line (standard library only).

JSON calls with the bearer token, Server-Sent Events from ``/v1/jobs/{id}/events``, streamed
downloads, and the text progress bar ``kiapi generate`` draws on stderr.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

# The server sends a keep-alive comment every 15 s, so a silent minute means it is gone.
EVENTS_TIMEOUT_S = 60.0
CHUNK = 1024 * 1024


class ServerError(Exception):
    """The server answered with an error status; ``message`` is its ``detail``, readable."""

    def __init__(self, status: int, message: str, body: Any = None) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message
        self.body = body


class Unreachable(Exception):
    """No server answered at the URL."""


def _detail_text(detail: Any) -> str:
    """``detail`` as one line: pydantic-style lists become ``field: message; ...``."""
    if isinstance(detail, list):
        parts = []
        for item in detail:
            if isinstance(item, dict) and "msg" in item:
                loc = ".".join(str(p) for p in item.get("loc", [])[1:])
                parts.append(f"{loc}: {item['msg']}" if loc else str(item["msg"]))
            else:
                parts.append(str(item))
        return "; ".join(parts)
    if isinstance(detail, dict):
        return json.dumps(detail)
    return str(detail)


def default_url(host: str, port: int) -> str:
    """The URL of a server bound to ``host:port`` as seen from this machine."""
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


@dataclass
class Client:
    base_url: str
    api_key: str | None = None
    timeout: float = 30.0

    def _request(
        self,
        method: str,
        path: str,
        body: Any = None,
        query: dict[str, Any] | None = None,
        accept: str = "application/json",
        headers: dict[str, str] | None = None,
    ) -> urllib.request.Request:
        url = self.base_url.rstrip("/") + path
        given = {k: v for k, v in (query or {}).items() if v is not None}
        if given:
            url += "?" + urllib.parse.urlencode(given)
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(url, data=data, method=method)
        request.add_header("Accept", accept)
        if data is not None:
            request.add_header("Content-Type", "application/json")
        if self.api_key:
            request.add_header("Authorization", f"Bearer {self.api_key}")
        for name, value in (headers or {}).items():
            request.add_header(name, value)
        return request

    def _open(self, request: urllib.request.Request, timeout: float | None = None) -> Any:
        try:
            return urllib.request.urlopen(request, timeout=timeout or self.timeout)
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            try:
                body = json.loads(raw)
            except ValueError:
                body = raw.decode(errors="replace")
            detail = body.get("detail", body) if isinstance(body, dict) else body
            raise ServerError(exc.code, _detail_text(detail), body) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise Unreachable(
                f"cannot reach kiapi at {self.base_url} ({reason}); start it with `kiapi serve`"
                " or pass --url"
            ) from None

    def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        query: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> Any:
        """One JSON request; the decoded answer, or ServerError/Unreachable."""
        request = self._request(method, path, body, query, headers=headers)
        with self._open(request) as response:
            return json.load(response)

    def events(self, job_id: str) -> Iterator[tuple[str, dict[str, Any]]]:
        """``(event, job)`` from the job's Server-Sent Events (``progress``, ``end``), until the
        stream ends; other events (``preview``, whose data is not a job) are passed over."""
        request = self._request("GET", f"/v1/jobs/{job_id}/events", accept="text/event-stream")
        with self._open(request, timeout=EVENTS_TIMEOUT_S) as stream:
            event, data = "message", list[str]()
            for raw in stream:
                line = raw.decode("utf-8").rstrip("\r\n")
                if not line:
                    if data and event in ("progress", "end"):
                        yield event, json.loads("\n".join(data))
                    event, data = "message", []
                elif line.startswith(":"):
                    continue  # keep-alive comment
                else:
                    name, _, value = line.partition(":")
                    value = value.removeprefix(" ")
                    if name == "event":
                        event = value
                    elif name == "data":
                        data.append(value)

    def download(self, file_id: str, dest: Path | None) -> tuple[Path | None, int]:
        """Stream a file to ``dest`` (atomically: temp file, then rename), or to stdout when
        ``dest`` is None; returns the path and the byte count."""
        request = self._request("GET", f"/v1/files/{file_id}/download", accept="*/*")
        with self._open(request) as response:
            if dest is None:
                return None, _copy(response, _stdout())
            dest.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", dir=dest.parent)
            try:
                with os.fdopen(fd, "wb") as out:
                    size = _copy(response, out)
                # mkstemp makes the file private; the result gets the mode any new file would.
                os.chmod(tmp, 0o666 & ~_umask())
                os.replace(tmp, dest)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
            return dest, size


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _stdout() -> IO[bytes]:
    import sys

    return sys.stdout.buffer


def _copy(source: IO[bytes], out: IO[bytes]) -> int:
    size = 0
    while chunk := source.read(CHUNK):
        out.write(chunk)
        size += len(chunk)
    out.flush()
    return size


def eta_text(job: dict[str, Any]) -> str:
    """A job's ETA for people: "~12s left" while running, "starts in ~1m05s" while queued."""
    if job.get("status") == "running" and job.get("eta_s") is not None:
        return f"~{_seconds(float(job['eta_s']))} left"
    if job.get("status") == "queued" and job.get("estimated_start_at") is not None:
        return f"starts in ~{_seconds(float(job['estimated_start_at']) - time.time())}"
    return ""


def _seconds(value: float) -> str:
    whole = max(0, round(value))
    return f"{whole}s" if whole < 60 else f"{whole // 60}m{whole % 60:02d}s"


class ProgressBar:
    """A job's progress on a text stream: redrawn in place on a terminal, one line per
    change otherwise (logs and pipes stay readable)."""

    def __init__(self, stream: IO[str], width: int = 30) -> None:
        self.stream = stream
        self.width = width
        self.tty = stream.isatty()
        self.last = ""
        self.last_key = ""

    def render(self, job: dict[str, Any], with_eta: bool = True) -> str:
        fraction = min(max(float(job.get("progress") or 0.0), 0.0), 1.0)
        filled = round(fraction * self.width)
        label = job.get("progress_label") or job.get("status", "")
        if job.get("status") == "queued" and job.get("queue_position"):
            label = f"queued, position {job['queue_position']}"
        if with_eta and (eta := eta_text(job)):
            label = f"{label}, {eta}"
        return f"[{'#' * filled}{'.' * (self.width - filled)}] {fraction * 100:5.1f}%  {label}"

    def update(self, job: dict[str, Any]) -> None:
        text = self.render(job)
        # One line per change of phase or percent off a terminal, not one per second of ETA.
        key = text if self.tty else self.render(job, with_eta=False)
        if key == self.last_key:
            return
        self.last_key = key
        if self.tty:
            columns = shutil.get_terminal_size((80, 20)).columns
            self.stream.write("\r" + text[: columns - 1].ljust(min(len(self.last), columns - 1)))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()
        self.last = text

    def close(self) -> None:
        if self.tty and self.last:
            self.stream.write("\n")
            self.stream.flush()
