"""The HTTP protocol kiapi serves with (web/protocol.py), driven in process with a fake socket."""

from __future__ import annotations

import asyncio
import gc
import weakref
from pathlib import Path
from typing import Any

import uvicorn
from uvicorn.server import ServerState

from kiapi_core.settings import Settings
from kiapi_core.web.protocol import SSE_WRITER, protocol_class


class FakeTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.sent = bytearray()
        self.closed = False

    def write(self, data: Any) -> None:
        self.sent += data

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 5000), "sockname": ("127.0.0.1", 8000)}.get(name, default)

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def test_a_served_request_is_freed_without_the_garbage_collector(tmp_path: Path) -> None:
    # The scope's SSE writer referred to its request cycle, whose scope holds the writer: every
    # request's objects then waited for a garbage collection, which cost ~15% of the
    # requests/s of GET /v1/jobs/{id} against a bare app (bench/throughput.py).
    seen: list[Any] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(scope["extensions"][SSE_WRITER])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async def serve() -> tuple[weakref.ref[Any], bytes]:
        config = uvicorn.Config(app, log_level="warning", access_log=False)
        config.load()
        cls = protocol_class(Settings(home=tmp_path, plugins=[]))
        proto = cls(config=config, server_state=ServerState(), app_state={})
        transport = FakeTransport()
        proto.connection_made(transport)
        proto.data_received(b"GET /v1/jobs/x HTTP/1.1\r\nHost: a\r\n\r\n")
        cycle = weakref.ref(proto.cycle)
        for _ in range(100):
            await asyncio.sleep(0)
            if b"ok" in transport.sent:
                break
        proto.connection_lost(None)
        return cycle, bytes(transport.sent)

    gc.disable()
    try:
        cycle, sent = asyncio.run(serve())
        assert sent.startswith(b"HTTP/1.1 200") and sent.endswith(b"ok\r\n0\r\n\r\n"), sent
        assert seen[0](b"late") is False  # the response ended: the writer declines
        seen.clear()
        assert cycle() is None, "the request's cycle outlived it (a reference cycle)"
    finally:
        gc.enable()
