"""Live previews with the celery backend: the latest per job in Redis, announced on ``P:events``.

- ``P:preview:{job id}``: a hash (the preview's fields, its bytes in base64: the client decodes
  replies as text), expiring after PREVIEW_TTL_S so a worker lost mid-job leaves nothing for
  long; deleted by the worker when the job ends.
- On ``P:events`` (the job events channel every API node listens to): ``"<job id>
  {"preview": {...}}"``, so a node's SSE followers hear of it (``preview_from_event``).
"""

from __future__ import annotations

import base64
import json
from typing import Any

import redis

from kiapi_core.jobs.previews import PREVIEW_TTL_S, Preview, PreviewInfo

_INFO_FIELDS = ("job_id", "step", "steps", "width", "height", "media_type", "etag")


def _info(fields: dict[str, Any]) -> PreviewInfo:
    return PreviewInfo(
        job_id=str(fields["job_id"]),
        step=int(fields["step"]),
        steps=int(fields["steps"]),
        width=int(fields["width"]),
        height=int(fields["height"]),
        media_type=str(fields["media_type"]),
        etag=str(fields["etag"]),
    )


def preview_from_event(message: str) -> PreviewInfo | None:
    """The preview a ``P:events`` message announces; None for any other message."""
    _, _, body = message.partition(" ")
    if not body.startswith('{"preview"'):
        return None
    return _info(json.loads(body)["preview"])


class RedisPreviews:
    def __init__(self, client: redis.Redis, prefix: str) -> None:
        self.r = client
        self.prefix = prefix

    def _key(self, job_id: str) -> str:
        return f"{self.prefix}:preview:{job_id}"

    def put(self, preview: Preview) -> None:
        info = preview.info
        fields: dict[str, str | int] = {**info.event_data(), "etag": info.etag}
        key = self._key(info.job_id)
        pipe = self.r.pipeline(transaction=True)
        data = base64.b64encode(preview.data).decode()
        record: dict[Any, Any] = {**fields, "data": data}  # the stubs' key type is invariant
        pipe.hset(key, mapping=record)
        pipe.expire(key, int(PREVIEW_TTL_S))
        pipe.publish(f"{self.prefix}:events", f"{info.job_id} {json.dumps({'preview': fields})}")
        pipe.execute()

    def get(self, job_id: str) -> Preview | None:
        reply: Any = self.r.hgetall(self._key(job_id))
        if not reply or any(f not in reply for f in (*_INFO_FIELDS, "data")):
            return None
        return Preview(_info(reply), base64.b64decode(reply["data"]))

    def drop(self, job_id: str) -> None:
        self.r.delete(self._key(job_id))
