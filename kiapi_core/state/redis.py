"""Job and file state in Redis, shared by every API node and ``kiapi worker`` (scale-out).

Why Redis and not Postgres: Celery already needs Redis as its broker, so state in the same
server keeps the deployment at one dependency; Lua scripts make every state change atomic
(claim, lease renewal, finish, cancel) using the Redis clock, so machines with skewed clocks
agree on lease expiry; and pub/sub carries the cross-node wake-ups that SSE and sync waits
need. The price is durability: run Redis with ``appendonly yes`` (docs/scale-out.md).

Keys (``P`` = KIAPI_REDIS_PREFIX):

- ``P:job:{id}`` hash per job; ``P:seq`` the submission counter (the list cursor).
- ``P:jobs`` (all), ``P:jobs:s:{status}``, ``P:jobs:t:{type}``, ``P:jobs:st:{status}:{type}``:
  sorted sets scored by seq, for newest-first paging with any filter; the queued one also
  gives queue positions (rank) and the waiting count (size).
- ``P:pq``, ``P:pq:t:{type}``: the queued jobs in claim order, scored ``(10 - priority) * 2**40
  + seq`` (exact in a double): queue positions, and what a worker claims for a message.
- ``P:deadlines``: queued jobs with a deadline (Cancel-After), scored by it.
- ``P:done``: finished jobs by when they finished, for retention (KIAPI_JOBS_TTL_S);
  ``P:done:indexed`` once the jobs finished before it existed are in it.
- ``P:idem:{key}``: an Idempotency-Key's request hash and job, expiring (KIAPI_IDEMPOTENCY_TTL_S).
- ``P:leases``: running job -> lease expiry. A worker renews its jobs' leases; a lapsed lease
  means the worker was lost, and the job is re-queued (or ends, after KIAPI_MAX_ATTEMPTS).
- ``P:undispatched``: created jobs whose Celery message is not confirmed sent yet.
- ``P:events``: pub/sub channel, one message per change with the job's new state.
- ``P:stream``: the event journal (kiapi_core/jobs/journal.py), a Stream with one entry per
  change written by the same script (MAXLEN ~ ``P:stream:retain``, KIAPI_EVENTS_RETAIN); each
  job hash keeps the ids of its first and newest entries (``eid0``, ``eid``).
- ``P:file:{id}`` hash per file; ``P:files``, ``P:files:job:{job}`` by seq; ``P:files:created``.
- ``P:worker:{node}`` (expiring) and ``P:workers``: the live workers and what they serve.
- ``P:wh:{delivery}`` hash per webhook delivery (with the job's state when it was made),
  ``P:wh:due`` the pending ones by next attempt (or lease end), ``P:wh:job:{id}`` a job's.

One Redis server (or a Sentinel-managed primary), not Redis Cluster: the scripts touch keys
they compute themselves.
"""

from __future__ import annotations

import builtins
import functools
import itertools
import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, cast

import redis

from kiapi_core.files.schemas import FileInfo
from kiapi_core.files.store import FileMeta, FileStore
from kiapi_core.ids import is_job_id, new_job_id
from kiapi_core.jobs.journal import JournalEntry, event_key
from kiapi_core.jobs.store import (
    DEADLINE_ERROR,
    STATUSES,
    IdempotencyConflict,
    IdempotencyKey,
    JobRecord,
    NotRetryable,
    QueueFull,
    RecordReader,
    check_progress,
    strict_dumps,
)
from kiapi_core.models.spec import ModelSpec
from kiapi_core.models.weights import WeightsRegistry
from kiapi_core.settings import Settings
from kiapi_core.web.errors import ApiError
from kiapi_core.webhooks.outbox import SHOWN_DELIVERIES, Delivery

log = logging.getLogger("kiapi.redis")

# Start-up cleanup of the shared files directory leaves younger temp files and unrecorded
# blobs alone: another node may be writing them right now.
SHARED_ORPHAN_GRACE_S = 3600.0


def connect(settings: Settings) -> redis.Redis:
    if settings.redis_url is None:
        raise ValueError("KIAPI_REDIS_URL is not set")
    client: redis.Redis = redis.Redis.from_url(
        settings.redis_url.get_secret_value(),
        decode_responses=True,
        socket_connect_timeout=5,
        # Commands are short; a dead server must not hang a request or a worker forever.
        socket_timeout=30,
        socket_keepalive=True,
        health_check_interval=15,
        retry_on_timeout=True,
    )
    return client


def _strs(reply: Any) -> builtins.list[str]:
    """A list reply as str (the client decodes responses; its stubs cannot know that)."""
    return [str(v) for v in reply]


def _hash(reply: Any) -> dict[str, str]:
    return {str(k): str(v) for k, v in reply.items()}


def _pairs(flat: Sequence[str]) -> dict[str, str]:
    return dict(zip(flat[::2], flat[1::2], strict=True))


def job_from_hash(h: dict[str, str], rank: int | None = None) -> JobRecord:
    r = RecordReader()
    status = r.text("status", h.get("status"), STATUSES) or "failed"
    return r.finish(
        JobRecord(
            id=h.get("id") or "",
            type=h.get("type") or "",
            status=status,
            params=r.json("params", h.get("params"), dict, {}),
            created_at=r.number("created_at", h.get("created_at")) or 0.0,
            seq=_int(h.get("seq")),
            result=r.json("result", h["result"], dict, None) if h.get("result") else None,
            artifacts=r.json("artifacts", h.get("artifacts") or "[]", list, []),
            error=h.get("error") or None,
            started_at=r.number("started_at", h.get("started_at")),
            finished_at=r.number("finished_at", h.get("finished_at")),
            progress=r.number("progress", h.get("progress")),
            progress_label=h.get("progress_label") or "queued",
            cancel_requested=h.get("cancel_requested") == "1",
            error_kind=h.get("error_kind") or None,
            error_status=_int(h.get("error_status")) or None,
            artifact_type=h.get("artifact_type") or None,
            worker=h.get("worker") or None,
            queue_position=rank + 1 if status == "queued" and rank is not None else None,
            version=_int(h.get("version")),
            attempt=_int(h.get("attempt")),
            priority=_int(h.get("priority")),
            deadline=r.number("deadline", h.get("deadline")),
            retry_of=h.get("retry_of") or None,
            retried_by=h.get("retried_by") or None,
            webhook=r.json("webhook", h["webhook"], dict, None) if h.get("webhook") else None,
            eta_at=r.number("eta_at", h.get("eta_at")),
            keep_alive_s=r.number("keep_alive_s", h.get("keep_alive_s")),
        )
    )


def _int(value: str | None) -> int:
    try:
        return int(value or 0)
    except ValueError:
        return 0


def event_job_id(message: str) -> str:
    """The job id a ``P:events`` message is about ("" for "the queue moved")."""
    return message.partition(" ")[0] if message != "*" else ""


def job_from_event(message: str) -> tuple[str, JobRecord | None]:
    """Decode a ``P:events`` message ``"<job id> <json>"``: (job id, its new state), or
    ("", None) for ``"*"``, "the queue moved"."""
    job_id, _, body = message.partition(" ")
    if message == "*" or not body:
        return "", None
    data = json.loads(body)
    rank = data.get("pos")
    return job_id, job_from_hash(_pairs(data["job"]), rank if rank is not False else None)


def _entry(eid: str, fields: dict[str, str]) -> JournalEntry:
    data = json.loads(fields["d"])
    rank = data.get("pos")
    job = job_from_hash(_pairs(data["job"]), rank if rank is not False else None)
    # A stream id starts with the entry's time (ms, Redis's clock).
    at = int(eid.partition("-")[0]) / 1000
    data_text = strict_dumps(job.to_json(now=at), "the job")
    return JournalEntry(eid, job.id, job.type, job.status, data_text)


# -- Lua ---------------------------------------------------------------------------------------
# ARGV[1] is always the key prefix. Times come from the Redis server (TIME), never from the
# caller, so lease expiry means the same thing on every machine.
_PRELUDE = """
local P = ARGV[1]
local function now()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local function fmt(x) return string.format('%.6f', x) end
local function jkey(id) return P .. ':job:' .. id end
local function enqueue(id, typ)
  local k = jkey(id)
  local score = (10 - tonumber(redis.call('HGET', k, 'priority') or '0')) * 1099511627776
                + tonumber(redis.call('HGET', k, 'seq'))
  redis.call('ZADD', P .. ':pq', score, id)
  -- A job routed to a worker's own queue is a turn of that worker's, not of its type's.
  local routed = redis.call('HGET', k, 'routed_to')
  if routed and routed ~= '' then
    redis.call('ZADD', P .. ':pq:w:' .. routed, score, id)
  else
    redis.call('ZADD', P .. ':pq:t:' .. typ, score, id)
  end
  local deadline = redis.call('HGET', k, 'deadline')
  if deadline and deadline ~= '' then redis.call('ZADD', P .. ':deadlines', deadline, id) end
end
local function reindex(id, seq, typ, from, to)
  if from then
    redis.call('ZREM', P .. ':jobs:s:' .. from, id)
    redis.call('ZREM', P .. ':jobs:st:' .. from .. ':' .. typ, id)
  end
  if from == 'queued' then
    redis.call('ZREM', P .. ':pq', id)
    redis.call('ZREM', P .. ':pq:t:' .. typ, id)
    redis.call('ZREM', P .. ':deadlines', id)
    local routed = redis.call('HGET', jkey(id), 'routed_to')
    if routed and routed ~= '' then redis.call('ZREM', P .. ':pq:w:' .. routed, id) end
  end
  redis.call('ZADD', P .. ':jobs:s:' .. to, seq, id)
  redis.call('ZADD', P .. ':jobs:st:' .. to .. ':' .. typ, seq, id)
  if to == 'queued' then enqueue(id, typ) end
  if to == 'succeeded' or to == 'failed' or to == 'canceled' then
    local at = tonumber(redis.call('HGET', jkey(id), 'finished_at') or '') or now()
    redis.call('ZADD', P .. ':done', at, id)
  end
end
local function publish(id)
  local k = jkey(id)
  local h = redis.call('HGETALL', k)
  local pos = redis.call('ZRANK', P .. ':pq', id)
  local body = cjson.encode({job = h, pos = pos})
  local st = redis.call('HMGET', k, 'type', 'status')
  local retain = redis.call('GET', P .. ':stream:retain') or '100000'
  local eid = redis.call('XADD', P .. ':stream', 'MAXLEN', '~', retain, '*', 'job', id,
                         'type', st[1] or '', 'status', st[2] or '', 'd', body)
  redis.call('HSET', k, 'eid', eid)
  redis.call('HSETNX', k, 'eid0', eid)  -- its first: where a read of its own entries starts
  redis.call('PUBLISH', P .. ':events', id .. ' ' .. body)
end
local function queue_moved()
  redis.call('PUBLISH', P .. ':events', '*')
end
-- The webhook outbox: a delivery for this change if the job's webhook wants the event.
local function webhook(id, event)
  local k = jkey(id)
  local spec = redis.call('HGET', k, 'webhook')
  if not spec or spec == '' then return end
  local w = cjson.decode(spec)
  local wanted = false
  for _, e in ipairs(w.events or {}) do if e == event then wanted = true end end
  if not wanted then return end
  local t = now()
  if event == 'progress' then
    local last = tonumber(redis.call('HGET', k, 'wh_progress_at') or '')
    if last and t - last < (tonumber(w.progress_ms) or 0) / 1000 then return end
    redis.call('HSET', k, 'wh_progress_at', fmt(t))
  end
  local did = 'msg_' .. id .. '_' .. event .. '_' .. redis.call('HGET', k, 'version')
  local dk = P .. ':wh:' .. did
  if redis.call('EXISTS', dk) == 1 then return end
  redis.call('HSET', dk, 'id', did, 'job', id, 'event', event, 'url', w.url,
             'snap', cjson.encode(redis.call('HGETALL', k)), 'status', 'pending',
             'attempts', '0', 'created_at', fmt(t), 'next_at', fmt(t))
  redis.call('ZADD', P .. ':wh:due', t, did)
  redis.call('RPUSH', P .. ':wh:job:' .. id, did)
end
local function end_job(id, k, from, status, err, kind, t)
  local seq = redis.call('HGET', k, 'seq')
  local typ = redis.call('HGET', k, 'type')
  redis.call('HSET', k, 'status', status, 'finished_at', fmt(t), 'progress_label', status,
             'error', err, 'error_kind', kind)
  redis.call('HINCRBY', k, 'version', 1)
  reindex(id, seq, typ, from, status)
  redis.call('ZREM', P .. ':leases', id)
  redis.call('ZREM', P .. ':undispatched', id)
  webhook(id, 'completed')
  publish(id)
end
-- A running job whose worker stopped renewing its lease: it ends here when a cancel was asked
-- for or it has had its runs; returns the new status then, false when it may run again.
local function lapse(id, k, max_attempts, t)
  local attempt = tonumber(redis.call('HGET', k, 'attempt') or '0')
  if redis.call('HGET', k, 'cancel_requested') == '1' then
    end_job(id, k, 'running', 'canceled', 'canceled by request', 'canceled', t)
    return 'canceled'
  end
  if attempt >= max_attempts then
    end_job(id, k, 'running', 'failed',
            'worker lost during the job ' .. attempt .. ' time(s) (KIAPI_MAX_ATTEMPTS='
            .. max_attempts .. ')', 'interrupted', t)
    return 'failed'
  end
  return false
end
"""

# ARGV: P, id, type, params, max_queue, priority, cancel_after_s, retry_of, idempotency key,
# its request hash, its ttl in ms ('' = none), artifact_type ('' = any number of artifacts),
# webhook JSON ('' = none), keep_alive_s ('' = the server's idle TTL)
_CREATE = """
local id, typ, retry_of = ARGV[2], ARGV[3], ARGV[8]
local ikey = false
if ARGV[9] ~= '' then
  ikey = P .. ':idem:' .. ARGV[9]
  local known = redis.call('HMGET', ikey, 'fp', 'job')
  if known[1] and redis.call('EXISTS', jkey(known[2])) == 1 then
    if known[1] ~= ARGV[10] then return {'conflict', known[2]} end
    return {'replay', redis.call('HGETALL', jkey(known[2])),
            redis.call('ZRANK', P .. ':pq', known[2])}
  end
end
if retry_of ~= '' then
  local old = redis.call('HMGET', jkey(retry_of), 'status', 'retried_by')
  if not old[1] or (old[1] ~= 'failed' and old[1] ~= 'canceled') or (old[2] and old[2] ~= '') then
    return {'not_retryable', old[1] or '', old[2] or ''}
  end
end
local waiting = redis.call('ZCARD', P .. ':jobs:s:queued')
if waiting >= tonumber(ARGV[5]) then return {'full', waiting} end
local seq = redis.call('INCR', P .. ':seq')
local t = now()
local k = jkey(id)
redis.call('HSET', k, 'id', id, 'type', typ, 'status', 'queued', 'params', ARGV[4],
           'created_at', fmt(t), 'seq', seq, 'artifacts', '[]', 'progress_label', 'queued',
           'cancel_requested', '0', 'version', '0', 'attempt', '0', 'priority', ARGV[6])
if ARGV[7] ~= '' then redis.call('HSET', k, 'deadline', fmt(t + tonumber(ARGV[7]))) end
if ARGV[12] ~= '' then redis.call('HSET', k, 'artifact_type', ARGV[12]) end
if ARGV[13] ~= '' then redis.call('HSET', k, 'webhook', ARGV[13]) end
if ARGV[14] ~= '' then redis.call('HSET', k, 'keep_alive_s', ARGV[14]) end
if retry_of ~= '' then
  redis.call('HSET', k, 'retry_of', retry_of)
  redis.call('HSET', jkey(retry_of), 'retried_by', id)
  redis.call('HINCRBY', jkey(retry_of), 'version', 1)
  publish(retry_of)
end
redis.call('ZADD', P .. ':jobs', seq, id)
redis.call('ZADD', P .. ':jobs:t:' .. typ, seq, id)
reindex(id, seq, typ, false, 'queued')
redis.call('ZADD', P .. ':undispatched', t, id)
if ikey then
  redis.call('HSET', ikey, 'fp', ARGV[10], 'job', id)
  redis.call('PEXPIRE', ikey, tonumber(ARGV[11]))
end
publish(id)
return {'ok', redis.call('HGETALL', k), redis.call('ZRANK', P .. ':pq', id)}
"""

# ARGV: P, id, priority
_PRIORITY = """
local id = ARGV[2]
local k = jkey(id)
local st = redis.call('HGET', k, 'status')
if not st then return false end
if st == 'queued' then
  redis.call('HSET', k, 'priority', ARGV[3])
  redis.call('HINCRBY', k, 'version', 1)
  enqueue(id, redis.call('HGET', k, 'type'))
  publish(id)
  queue_moved()
end
return {redis.call('HGETALL', k), redis.call('ZRANK', P .. ':pq', id)}
"""

# ARGV: P, error, limit -> ids of the queued jobs ended because their deadline passed
_EXPIRE = """
local t = now()
local ids = redis.call('ZRANGEBYSCORE', P .. ':deadlines', '-inf', fmt(t), 'LIMIT', 0,
                       tonumber(ARGV[3]))
for _, id in ipairs(ids) do
  local k = jkey(id)
  if redis.call('HGET', k, 'status') == 'queued' then
    end_job(id, k, 'queued', 'canceled', ARGV[2], 'canceled', t)
  else
    redis.call('ZREM', P .. ':deadlines', id)
  end
end
if #ids > 0 then queue_moved() end
return ids
"""

# ARGV: P, id, worker, lease_s, max_attempts, deadline error, exact ('1': from a worker's queue)
# A message names a job, but one for a queued job takes the first queued job of its type in
# claim order (priority, then FIFO): every queued job has a message, so whichever message comes
# first runs the job that should run first; the job it named keeps the message of the job run.
_CLAIM = """
local id = ARGV[2]
local k = jkey(id)
local st = redis.call('HGET', k, 'status')
if not st then return {'missing'} end
local t = now()
-- Even a message naming a job that runs under a live lease is a turn: the job it was used for
-- may have been another one, whose own message would otherwise leave a queued job without one.
local live = st == 'running' and tonumber(redis.call('HGET', k, 'lease_until') or '0') > t
-- A message from a worker's own queue (ARGV[7] = '1') for a job still routed there runs that
-- job: routed jobs are no turns of the shared queue (routing.py).
local routed = redis.call('HGET', k, 'routed_to')
if ARGV[7] == '1' and routed and routed ~= '' then
  -- A turn of the jobs routed to that worker, in claim order (priority, then FIFO).
  local wq = P .. ':pq:w:' .. routed
  local picked = false
  while not picked do
    local first = redis.call('ZRANGE', wq, 0, 0)[1]
    if not first then break end
    local fk = jkey(first)
    local deadline = tonumber(redis.call('HGET', fk, 'deadline') or '')
    if redis.call('HGET', fk, 'status') ~= 'queued' then
      redis.call('ZREM', wq, first)
    elseif deadline and deadline <= t then
      end_job(first, fk, 'queued', 'canceled', ARGV[6], 'canceled', t)
      queue_moved()
    else
      picked = first
    end
  end
  if not picked then return {live and 'busy' or 'done'} end
  id, k, st = picked, jkey(picked), 'queued'
elseif st ~= 'running' or live then
  local typ = redis.call('HGET', k, 'type')
  local picked = false
  while not picked do
    local first = redis.call('ZRANGE', P .. ':pq:t:' .. typ, 0, 0)[1]
    if not first then break end
    local fk = jkey(first)
    local deadline = tonumber(redis.call('HGET', fk, 'deadline') or '')
    if redis.call('HGET', fk, 'status') ~= 'queued' then
      redis.call('ZREM', P .. ':pq:t:' .. typ, first)
      redis.call('ZREM', P .. ':pq', first)
    elseif deadline and deadline <= t then
      end_job(first, fk, 'queued', 'canceled', ARGV[6], 'canceled', t)
      queue_moved()
    else
      picked = first
    end
  end
  if not picked and st == 'queued' then picked = id end  -- queued before priorities existed
  if not picked then return {live and 'busy' or 'done'} end
  if picked ~= id then
    -- The picked job's own message may not be sent yet: then the named job waits for it.
    local unsent = redis.call('ZSCORE', P .. ':undispatched', picked)
    if unsent and st == 'queued' then redis.call('ZADD', P .. ':undispatched', unsent, id) end
    id, k, st = picked, jkey(picked), 'queued'
  end
end
if st == 'running' then  -- its worker was lost: taken over
  local ended = lapse(id, k, tonumber(ARGV[5]), t)
  if ended then return {ended} end
end
local attempt = redis.call('HINCRBY', k, 'attempt', 1)
local lease = t + tonumber(ARGV[4])
-- Run once routed: a re-queue (lost worker, hand-back) goes to the shared queue.
local was = redis.call('HGET', k, 'routed_to')
if was and was ~= '' then
  redis.call('HDEL', k, 'routed_to')
  redis.call('ZREM', P .. ':pq:w:' .. was, id)
  if redis.call('HDEL', P .. ':routed', id) == 1 then
    redis.call('HINCRBY', P .. ':backlog', was, -1)
  end
end
redis.call('HSET', k, 'status', 'running', 'worker', ARGV[3] .. '#' .. attempt,
           'started_at', fmt(t), 'lease_until', fmt(lease), 'progress_label', 'running')
redis.call('HDEL', k, 'progress', 'eta_at')
redis.call('HINCRBY', k, 'version', 1)
if st == 'queued' then
  reindex(id, redis.call('HGET', k, 'seq'), redis.call('HGET', k, 'type'), 'queued', 'running')
end
redis.call('ZADD', P .. ':leases', lease, id)
redis.call('ZREM', P .. ':undispatched', id)
webhook(id, 'start')
publish(id)
if st == 'queued' then queue_moved() end
return {'claimed', redis.call('HGETALL', k)}
"""

# ARGV: P, id, owner, lease_s -> 1 renewed, 0 the job is no longer this owner's
_RENEW = """
local k = jkey(ARGV[2])
if redis.call('HGET', k, 'status') ~= 'running' or redis.call('HGET', k, 'worker') ~= ARGV[3] then
  return 0
end
local lease = now() + tonumber(ARGV[4])
redis.call('HSET', k, 'lease_until', fmt(lease))
redis.call('ZADD', P .. ':leases', lease, ARGV[2])
return 1
"""

# ARGV: P, id, progress, label, eta_at (each: '' keeps it)
_PROGRESS = """
local k = jkey(ARGV[2])
if redis.call('HGET', k, 'status') ~= 'running' then return 0 end
if ARGV[3] ~= '' then redis.call('HSET', k, 'progress', ARGV[3]) end
if ARGV[4] ~= '' then redis.call('HSET', k, 'progress_label', ARGV[4]) end
if ARGV[5] and ARGV[5] ~= '' then redis.call('HSET', k, 'eta_at', ARGV[5]) end
redis.call('HINCRBY', k, 'version', 1)
webhook(ARGV[2], 'progress')
publish(ARGV[2])
return 1
"""

# ARGV: P, id, status, owner, result, artifacts, error, error_kind, error_status ('' = none)
_FINISH = """
local id, status = ARGV[2], ARGV[3]
local k = jkey(id)
if redis.call('HGET', k, 'status') ~= 'running' or redis.call('HGET', k, 'worker') ~= ARGV[4] then
  return 0
end
local t = now()
local labels = {succeeded = 'done', failed = 'failed', canceled = 'canceled'}
redis.call('HSET', k, 'status', status, 'artifacts', ARGV[6], 'finished_at', fmt(t),
           'progress_label', labels[status])
local optional = {result = ARGV[5], error = ARGV[7], error_kind = ARGV[8], error_status = ARGV[9]}
for field, value in pairs(optional) do
  if value ~= '' then redis.call('HSET', k, field, value) else redis.call('HDEL', k, field) end
end
if status == 'succeeded' then redis.call('HSET', k, 'progress', '1.0') end
redis.call('HINCRBY', k, 'version', 1)
local typ = redis.call('HGET', k, 'type')
reindex(id, redis.call('HGET', k, 'seq'), typ, 'running', status)
redis.call('ZREM', P .. ':leases', id)
local started = tonumber(redis.call('HGET', k, 'started_at') or '')
if status == 'succeeded' and started then
  redis.call('LPUSH', P .. ':durations:' .. typ, fmt(t - started))
  redis.call('LTRIM', P .. ':durations:' .. typ, 0, 19)
end
webhook(id, 'completed')
publish(id)
return 1
"""

# ARGV: P, id, error, error_kind: ends a job failed if it is still queued
_FAIL_QUEUED = """
local id = ARGV[2]
local k = jkey(id)
if redis.call('HGET', k, 'status') ~= 'queued' then return 0 end
end_job(id, k, 'queued', 'failed', ARGV[3], ARGV[4], now())
queue_moved()
return 1
"""

# ARGV: P, id
_CANCEL = """
local id = ARGV[2]
local k = jkey(id)
local st = redis.call('HGET', k, 'status')
if not st then return false end
if st == 'queued' then
  end_job(id, k, 'queued', 'canceled', 'canceled by request', 'canceled', now())
  queue_moved()
elseif st == 'running' and redis.call('HGET', k, 'cancel_requested') ~= '1' then
  redis.call('HSET', k, 'cancel_requested', '1')
  redis.call('HINCRBY', k, 'version', 1)
  publish(id)
end
return {redis.call('HGETALL', k), redis.call('ZRANK', P .. ':pq', id)}
"""

# ARGV: P, max_attempts, limit -> {{id, type, 'queued'|'failed'|'canceled'}, ...}
_LAPSED = """
local t = now()
local ids = redis.call('ZRANGEBYSCORE', P .. ':leases', '-inf', fmt(t), 'LIMIT', 0,
                       tonumber(ARGV[3]))
local out = {}
local moved = false
for _, id in ipairs(ids) do
  local k = jkey(id)
  local st = redis.call('HGET', k, 'status')
  if st ~= 'running' then
    redis.call('ZREM', P .. ':leases', id)
  elseif tonumber(redis.call('HGET', k, 'lease_until') or '0') <= t then
    local typ = redis.call('HGET', k, 'type')
    local outcome = lapse(id, k, tonumber(ARGV[2]), t)
    if not outcome then
      redis.call('HSET', k, 'status', 'queued', 'progress_label', 'queued')
      redis.call('HDEL', k, 'worker', 'progress', 'started_at', 'lease_until', 'eta_at')
      redis.call('HINCRBY', k, 'version', 1)
      reindex(id, redis.call('HGET', k, 'seq'), typ, 'running', 'queued')
      redis.call('ZREM', P .. ':leases', id)
      -- Score 0: due for (re-)dispatch at once, should the caller die before sending it.
      redis.call('ZADD', P .. ':undispatched', 0, id)
      publish(id)
      moved = true
      outcome = 'queued'
    end
    table.insert(out, {id, typ, outcome})
  end
end
if moved then queue_moved() end
return out
"""

# ARGV: P, id, owner -> the job's type when it is queued again, false when it is not ours
# (or ended canceled: a cancel was asked for). The run still counts as an attempt: its artifact
# ids stay its own while it deletes them.
_RELEASE = """
local id = ARGV[2]
local k = jkey(id)
if redis.call('HGET', k, 'status') ~= 'running' or redis.call('HGET', k, 'worker') ~= ARGV[3] then
  return false
end
if redis.call('HGET', k, 'cancel_requested') == '1' then
  end_job(id, k, 'running', 'canceled', 'canceled by request', 'canceled', now())
  return false
end
local typ = redis.call('HGET', k, 'type')
redis.call('HSET', k, 'status', 'queued', 'progress_label', 'queued')
redis.call('HDEL', k, 'worker', 'progress', 'started_at', 'lease_until', 'eta_at')
redis.call('HINCRBY', k, 'version', 1)
reindex(id, redis.call('HGET', k, 'seq'), typ, 'running', 'queued')
redis.call('ZREM', P .. ':leases', id)
redis.call('ZADD', P .. ':undispatched', 0, id)
publish(id)
queue_moved()
return typ
"""

# ARGV: P, id, filename, content_type, bytes, sha256, created_at, job_id ('' = none)
_FILE_PUT = """
local id, job = ARGV[2], ARGV[8]
local k = P .. ':file:' .. id
local old = redis.call('HGET', k, 'job_id')
if old and old ~= '' then redis.call('ZREM', P .. ':files:job:' .. old, id) end
local seq = redis.call('INCR', P .. ':fseq')
redis.call('DEL', k)
redis.call('HSET', k, 'id', id, 'filename', ARGV[3], 'content_type', ARGV[4], 'bytes', ARGV[5],
           'sha256', ARGV[6], 'created_at', ARGV[7], 'job_id', job, 'seq', seq)
redis.call('ZADD', P .. ':files', seq, id)
redis.call('ZADD', P .. ':files:created', ARGV[7], id)
if job ~= '' then redis.call('ZADD', P .. ':files:job:' .. job, seq, id) end
return seq
"""

# ARGV: P, id -> 1 deleted, 0 there was no such file
_FILE_DELETE = """
local id = ARGV[2]
local k = P .. ':file:' .. id
local job = redis.call('HGET', k, 'job_id')
if not job then return 0 end
redis.call('DEL', k)
redis.call('ZREM', P .. ':files', id)
redis.call('ZREM', P .. ':files:created', id)
if job ~= '' then redis.call('ZREM', P .. ':files:job:' .. job, id) end
return 1
"""


# ARGV: P, owner, limit, lease_s -> the claimed deliveries' hashes
_WH_CLAIM = """
local t = now()
local limit = tonumber(ARGV[3])
local ids = redis.call('ZRANGEBYSCORE', P .. ':wh:due', '-inf', fmt(t), 'LIMIT', 0, 4 * limit)
local out = {}
-- A job's events go out in order, one at a time: only its oldest pending one is taken.
local function first_pending(job)
  for _, other in ipairs(redis.call('LRANGE', P .. ':wh:job:' .. job, 0, -1)) do
    if redis.call('HGET', P .. ':wh:' .. other, 'status') == 'pending' then return other end
  end
  return false
end
for _, did in ipairs(ids) do
  local dk = P .. ':wh:' .. did
  if redis.call('HGET', dk, 'status') ~= 'pending' then
    redis.call('ZREM', P .. ':wh:due', did)
  elseif #out >= limit or first_pending(redis.call('HGET', dk, 'job')) ~= did then
    -- left for later: enough taken, or an older event of its job is still on its way
  else
    local lease = t + tonumber(ARGV[4])
    redis.call('HSET', dk, 'owner', ARGV[2], 'lease_until', fmt(lease))
    redis.call('ZADD', P .. ':wh:due', lease, did)
    table.insert(out, redis.call('HGETALL', dk))
  end
end
return out
"""

# ARGV: P, delivery, owner, outcome (delivered|retry|failed), retry_in_s, status code, error
_WH_RECORD = """
local did = ARGV[2]
local dk = P .. ':wh:' .. did
if redis.call('HGET', dk, 'owner') ~= ARGV[3] or redis.call('HGET', dk, 'status') ~= 'pending' then
  return 0
end
local t = now()
redis.call('HINCRBY', dk, 'attempts', 1)
redis.call('HSET', dk, 'code', ARGV[6], 'error', ARGV[7], 'owner', '', 'lease_until', '')
if ARGV[4] == 'retry' then
  local at = t + tonumber(ARGV[5])
  redis.call('HSET', dk, 'next_at', fmt(at))
  redis.call('ZADD', P .. ':wh:due', at, did)
else
  redis.call('HSET', dk, 'status', ARGV[4], 'next_at', '')
  redis.call('HDEL', dk, 'snap')  -- sent or given up: the job's state is not needed any more
  if ARGV[4] == 'delivered' then redis.call('HSET', dk, 'delivered_at', fmt(t)) end
  redis.call('ZREM', P .. ':wh:due', did)
end
return 1
"""

# ARGV: P, id, node -> 1 when the queued job is now routed to ``node``'s own queue
_ROUTE = """
local id = ARGV[2]
local k = jkey(id)
if redis.call('HGET', k, 'status') ~= 'queued' then return 0 end
redis.call('HSET', k, 'routed_to', ARGV[3])
redis.call('ZREM', P .. ':pq:t:' .. redis.call('HGET', k, 'type'), id)
redis.call('ZADD', P .. ':pq:w:' .. ARGV[3], redis.call('ZSCORE', P .. ':pq', id), id)
if redis.call('HSET', P .. ':routed', id, ARGV[3]) == 1 then
  redis.call('HINCRBY', P .. ':backlog', ARGV[3], 1)
end
return 1
"""

# ARGV: P, id -> 1 when the job, queued and routed, is a turn of its shared queue again
_UNROUTE = """
local id = ARGV[2]
local k = jkey(id)
local node = redis.call('HGET', P .. ':routed', id)
if node and redis.call('HDEL', P .. ':routed', id) == 1 then
  redis.call('HINCRBY', P .. ':backlog', node, -1)
end
local routed = redis.call('HGET', k, 'routed_to')
if redis.call('HGET', k, 'status') ~= 'queued' or not routed or routed == '' then return 0 end
redis.call('HDEL', k, 'routed_to')
redis.call('ZREM', P .. ':pq:w:' .. routed, id)
enqueue(id, redis.call('HGET', k, 'type'))
return 1
"""


# ARGV: P, cutoff, offset, limit -> {deleted, looked at, eid0, eid, eid0, eid, ...}: retention
# of finished jobs, the oldest first. A job with a webhook delivery still pending is kept (and
# skipped: the offset). The id pairs bound each deleted job's journal entries.
_SWEEP = """
local ids = redis.call('ZRANGEBYSCORE', P .. ':done', '-inf', '(' .. ARGV[2],
                       'LIMIT', tonumber(ARGV[3]), tonumber(ARGV[4]))
local deleted = 0
local spans = {}
for _, id in ipairs(ids) do
  local k = jkey(id)
  local h = redis.call('HMGET', k, 'status', 'type', 'eid0', 'eid')
  local st, typ = h[1], h[2]
  local finished = st == 'succeeded' or st == 'failed' or st == 'canceled'
  local wk = P .. ':wh:job:' .. id
  local dids = redis.call('LRANGE', wk, 0, -1)
  local pending = false
  for _, did in ipairs(dids) do
    if redis.call('HGET', P .. ':wh:' .. did, 'status') == 'pending' then pending = true end
  end
  if not finished then
    redis.call('ZREM', P .. ':done', id)  -- deleted by hand, or an entry gone stale
  elseif not pending then
    for _, did in ipairs(dids) do redis.call('DEL', P .. ':wh:' .. did) end
    redis.call('DEL', wk, k)
    redis.call('ZREM', P .. ':jobs', id)
    redis.call('ZREM', P .. ':jobs:s:' .. st, id)
    redis.call('ZREM', P .. ':jobs:t:' .. typ, id)
    redis.call('ZREM', P .. ':jobs:st:' .. st .. ':' .. typ, id)
    redis.call('ZREM', P .. ':done', id)
    deleted = deleted + 1
    if h[4] then
      -- Written before eid0 was kept: from the stream's start.
      table.insert(spans, h[3] or '0-0')
      table.insert(spans, h[4])
    end
  end
end
return {deleted, #ids, unpack(spans)}
"""


class _Scripts:
    def __init__(self, client: redis.Redis) -> None:
        def reg(body: str) -> Any:
            return client.register_script(_PRELUDE + body)

        self.create = reg(_CREATE)
        self.priority = reg(_PRIORITY)
        self.expire = reg(_EXPIRE)
        self.claim = reg(_CLAIM)
        self.route = reg(_ROUTE)
        self.unroute = reg(_UNROUTE)
        self.renew = reg(_RENEW)
        self.progress = reg(_PROGRESS)
        self.finish = reg(_FINISH)
        self.cancel = reg(_CANCEL)
        self.fail_queued = reg(_FAIL_QUEUED)
        self.lapsed = reg(_LAPSED)
        self.release = reg(_RELEASE)
        self.file_put = reg(_FILE_PUT)
        self.file_delete = reg(_FILE_DELETE)
        self.wh_claim = reg(_WH_CLAIM)
        self.wh_record = reg(_WH_RECORD)
        self.sweep = reg(_SWEEP)


_SWEEP_BATCH = 500


def _span(cursor: int | None) -> str:
    return f"({cursor}" if cursor is not None else "+inf"


class RedisJobStore:
    """The ``JobStore`` seam over Redis; safe to share between threads."""

    def __init__(self, client: redis.Redis, prefix: str, events_retain: int = 100_000) -> None:
        self.r = client
        self.p = prefix
        self.scripts = _Scripts(client)
        self._indexed = False  # P:done holds every finished job (_index_finished)
        try:
            client.set(f"{prefix}:stream:retain", events_retain)
        except redis.RedisError as exc:  # down at start: the scripts' default holds meanwhile
            log.warning("could not set the event journal's retention in Redis (%s)", exc)

    def _key(self, job_id: str) -> str:
        return f"{self.p}:job:{job_id}"

    def _load(self, ids: Iterable[str]) -> builtins.list[JobRecord]:
        ids = builtins.list(ids)
        pipe = self.r.pipeline(transaction=False)
        for job_id in ids:
            pipe.hgetall(self._key(job_id))
            pipe.zrank(f"{self.p}:pq", job_id)
        replies = pipe.execute()
        jobs = []
        for h, rank in zip(replies[::2], replies[1::2], strict=True):
            if h:  # gone between the index read and now: skip rather than fail the page
                jobs.append(job_from_hash(h, rank))
        hooked = [j for j in jobs if j.webhook is not None]
        if hooked:
            shown = RedisOutbox(self.r, self.p).shown([j.id for j in hooked])
            for job, deliveries in zip(hooked, shown, strict=True):
                job.deliveries = deliveries
        return jobs

    # -- the JobStore protocol -----------------------------------------------------------------
    def create(
        self,
        job_type: str,
        params: dict[str, Any],
        max_queue: int,
        *,
        artifact_type: str | None = None,
        priority: int = 0,
        cancel_after_s: float | None = None,
        idempotency: IdempotencyKey | None = None,
        retry_of: str | None = None,
        webhook: dict[str, Any] | None = None,
        keep_alive_s: float | None = None,
    ) -> JobRecord:
        job_id = new_job_id()
        params_text = strict_dumps(params, "the job's params")
        key = idempotency
        reply = self.scripts.create(
            args=[
                self.p,
                job_id,
                job_type,
                params_text,
                max_queue,
                priority,
                "" if cancel_after_s is None else repr(float(cancel_after_s)),
                retry_of or "",
                key.key if key else "",
                key.fingerprint if key else "",
                max(1, int(key.ttl_s * 1000)) if key else 0,
                artifact_type or "",
                strict_dumps(webhook, "the job's webhook") if webhook else "",
                "" if keep_alive_s is None else repr(float(keep_alive_s)),
            ]
        )
        if reply[0] == "full":
            raise QueueFull(int(reply[1]), max_queue)
        if reply[0] == "conflict":
            raise IdempotencyConflict(str(reply[1]))
        if reply[0] == "not_retryable":
            raise NotRetryable(str(reply[1]) or None, str(reply[2]) or None)
        job = job_from_hash(_pairs(reply[1]), reply[2])
        job.replayed = reply[0] == "replay"
        return job

    def set_priority(self, job_id: str, priority: int) -> JobRecord | None:
        reply = self.scripts.priority(args=[self.p, job_id, priority])
        return job_from_hash(_pairs(reply[0]), reply[1]) if reply else None

    def expire_deadlines(self) -> builtins.list[str]:
        return _strs(self.scripts.expire(args=[self.p, DEADLINE_ERROR, 100]))

    def forget_idempotency(self, keys: builtins.list[str]) -> None:
        if keys:
            self.r.delete(*[f"{self.p}:idem:{k}" for k in keys])

    def get(self, job_id: str) -> JobRecord | None:
        if not is_job_id(job_id):
            return None
        found = self._load([job_id])
        return found[0] if found else None

    def list(
        self, *, status: str | None, job_type: str | None, limit: int, cursor: int | None
    ) -> tuple[builtins.list[JobRecord], int | None]:
        if status and job_type:
            key = f"{self.p}:jobs:st:{status}:{job_type}"
        elif status:
            key = f"{self.p}:jobs:s:{status}"
        elif job_type:
            key = f"{self.p}:jobs:t:{job_type}"
        else:
            key = f"{self.p}:jobs"
        ids = _strs(
            self.r.zrange(
                key, _span(cursor), "-inf", desc=True, byscore=True, offset=0, num=limit + 1
            )
        )
        more = len(ids) > limit
        jobs = self._load(ids[:limit])
        return jobs, (jobs[-1].seq if more and jobs else None)

    def claim_next(self, worker: str, types: frozenset[str] | None = None) -> JobRecord | None:
        # Celery hands each worker the id to run (``claim``); nothing polls this store.
        raise NotImplementedError("with the celery backend, jobs are claimed by id")

    def set_progress(
        self,
        job_id: str,
        progress: float | None,
        label: str | None,
        eta_at: float | None = None,
    ) -> None:
        check_progress(progress, label, eta_at)
        self.scripts.progress(
            args=[
                self.p,
                job_id,
                "" if progress is None else repr(float(progress)),
                label or "",
                "" if eta_at is None else repr(float(eta_at)),
            ]
        )

    def finish(
        self,
        job_id: str,
        status: str,
        *,
        worker: str | None,
        result: dict[str, Any] | None = None,
        artifacts: builtins.list[str] | None = None,
        error: str | None = None,
        error_kind: str | None = None,
        error_status: int | None = None,
    ) -> bool:
        result_text = strict_dumps(result, "the job's result") if result is not None else ""
        artifacts_text = strict_dumps(artifacts or [], "the job's artifacts")
        done = self.scripts.finish(
            args=[
                self.p,
                job_id,
                status,
                worker or "",
                result_text,
                artifacts_text,
                error or "",
                error_kind or "",
                str(error_status) if error_status else "",
            ]
        )
        return bool(done)

    def cancel(self, job_id: str) -> JobRecord | None:
        reply = self.scripts.cancel(args=[self.p, job_id])
        if not reply:
            return None
        return job_from_hash(_pairs(reply[0]), reply[1])

    def cancel_requested(self, job_id: str) -> bool:
        return bool(self.r.hget(self._key(job_id), "cancel_requested") == "1")

    def running(self) -> builtins.list[JobRecord]:
        return self._load(_strs(self.r.zrange(f"{self.p}:jobs:s:running", 0, -1)))

    def recover(self) -> builtins.list[str]:
        # Nothing to do when an API node starts: jobs run on workers elsewhere, and a job
        # whose worker was lost is re-queued when its lease lapses (``requeue_lapsed``).
        return []

    def sweep_finished(self, ttl_s: float, now: float | None = None) -> int:
        if ttl_s <= 0:
            return 0
        self._index_finished()
        cutoff = (time.time() if now is None else now) - ttl_s
        deleted = offset = 0
        bounds: builtins.list[str] = []  # the deleted jobs' first and newest journal ids
        # In batches, each one script: Redis serves nobody else while a script runs.
        while True:
            reply = self.scripts.sweep(args=[self.p, repr(cutoff), offset, _SWEEP_BATCH])
            gone, seen = int(reply[0]), int(reply[1])
            bounds += _strs(reply[2:])
            deleted += gone
            offset += seen - gone  # kept (a delivery pending): the next batch starts past them
            if seen < _SWEEP_BATCH:
                break
        if bounds:
            self._drop_entries(min(bounds, key=event_key), max(bounds, key=event_key))
        return deleted

    def _drop_entries(self, first: str, last: str) -> None:
        """The journal entries of jobs that are gone, between these ids: a deleted job's JSON
        (its prompt) must not stay readable from ``GET /v1/events``. Read here in pages, not
        in the script, so Redis serves others meanwhile; a deleted job gets no new entries."""
        stream, start = f"{self.p}:stream", first
        while True:
            page = cast(
                "builtins.list[tuple[str, dict[str, str]]]",
                self.r.xrange(stream, start, last, count=_SWEEP_BATCH),
            )
            jobs = sorted({f.get("job", "") for _, f in page})
            pipe = self.r.pipeline(transaction=False)
            for job_id in jobs:
                pipe.exists(self._key(job_id))
            live = {j for j, n in zip(jobs, pipe.execute(), strict=True) if n}
            gone = [eid for eid, f in page if f.get("job", "") not in live]
            if gone:
                self.r.xdel(stream, *gone)
            if len(page) < _SWEEP_BATCH:
                return
            start = "(" + str(page[-1][0])

    def _index_finished(self) -> None:
        """Jobs finished before ``P:done`` existed get their entries, once per Redis."""
        if self._indexed or self.r.exists(f"{self.p}:done:indexed"):
            self._indexed = True
            return
        for status in ("succeeded", "failed", "canceled"):
            key = f"{self.p}:jobs:s:{status}"
            for start in itertools.count(0, _SWEEP_BATCH):
                ids = _strs(self.r.zrange(key, start, start + _SWEEP_BATCH - 1))
                if not ids:
                    break
                pipe = self.r.pipeline(transaction=False)
                for job_id in ids:
                    pipe.hget(self._key(job_id), "finished_at")
                entries = {
                    job_id: at
                    for job_id, raw in zip(ids, pipe.execute(), strict=True)
                    if (at := _number(raw)) is not None
                }
                if entries:
                    self.r.zadd(f"{self.p}:done", entries, nx=True)
        self.r.set(f"{self.p}:done:indexed", "1")
        self._indexed = True

    def waiting_count(self) -> int:
        return int(self.r.zcard(f"{self.p}:jobs:s:queued"))

    def queue_counts(self) -> tuple[int, int]:
        pipe = self.r.pipeline(transaction=False)
        pipe.zcard(f"{self.p}:jobs:s:queued")
        pipe.zcard(f"{self.p}:jobs:s:running")
        waiting, running = pipe.execute()
        return int(waiting), int(running)

    def fail_unhandled(
        self, handled: frozenset[str], error: Callable[[str], str]
    ) -> builtins.list[str]:
        queued = self._load(_strs(self.r.zrange(f"{self.p}:jobs:s:queued", 0, -1)))
        failed = []
        for job in queued:
            if job.type not in handled and self.scripts.fail_queued(
                args=[self.p, job.id, error(job.type), "unavailable"]
            ):
                failed.append(job.id)
        return failed

    def recent_duration_s(self, job_type: str) -> float | None:
        values = [float(v) for v in self.r.lrange(f"{self.p}:durations:{job_type}", 0, 19)]
        return sum(values) / len(values) if values else None

    # -- the event journal ---------------------------------------------------------------------
    def events_after(
        self,
        after: str | None,
        *,
        job_id: str | None = None,
        job_type: str | None = None,
        status: str | None = None,
        limit: int = 1000,
    ) -> builtins.list[JournalEntry]:
        found: builtins.list[JournalEntry] = []
        start = f"({after}" if after is not None else "-"
        end = "+"
        if job_id is not None:
            # One job's entries lie between its first and its newest: a resume reads that
            # stretch, not every later job's changes (an old Last-Event-ID, a finished job).
            first, last = self.r.hmget(self._key(job_id), ["eid0", "eid"])
            if not last or (after is not None and event_key(after) >= event_key(str(last))):
                return found
            end = str(last)
            if first and (after is None or event_key(after) < event_key(str(first))):
                start = str(first)
        # Filtered reads page through the stream: entries are small and filters are rare.
        while len(found) < limit:
            page = cast(
                "builtins.list[tuple[str, dict[str, str]]]",
                self.r.xrange(f"{self.p}:stream", start, end, count=max(limit, 500)),
            )
            for eid, fields in page:
                if (
                    (job_id is None or fields.get("job") == job_id)
                    and (job_type is None or fields.get("type") == job_type)
                    and (status is None or fields.get("status") == status)
                ):
                    found.append(_entry(eid, fields))
                    if len(found) == limit:
                        break
            if len(page) < max(limit, 500):
                break
            start = f"({page[-1][0]}"
        return found

    def event_bounds(self) -> tuple[str | None, str | None]:
        pipe = self.r.pipeline(transaction=False)
        pipe.xrange(f"{self.p}:stream", "-", "+", count=1)
        pipe.xrevrange(f"{self.p}:stream", "+", "-", count=1)
        first, last = pipe.execute()
        return (first[0][0] if first else None, last[0][0] if last else None)

    def last_event_id(self, job_id: str) -> str | None:
        eid = self.r.hget(self._key(job_id), "eid")
        return str(eid) if eid else None

    # -- distributed extras --------------------------------------------------------------------
    def claim(
        self, job_id: str, worker: str, lease_s: float, max_attempts: int, exact: bool = False
    ) -> tuple[str, JobRecord | None]:
        """Take ``job_id`` for ``worker``: ("claimed", job) when it is this worker's to run.

        Otherwise ("busy", None): another worker holds a live lease (a redelivered message;
        drop it); ("done"|"missing", None): nothing to run; ("failed"|"canceled", None): its
        previous worker was lost and the job ended here (cancel asked for, or out of attempts).
        The owner recorded is ``worker#attempt``, unique to this run. ``exact``: the message
        came from this worker's own queue; a job still routed there runs itself, not the head
        of its type's queue.
        """
        reply = self.scripts.claim(
            args=[self.p, job_id, worker, lease_s, max_attempts, DEADLINE_ERROR, int(exact)]
        )
        if reply[0] != "claimed":
            return str(reply[0]), None
        return "claimed", job_from_hash(_pairs(reply[1]))

    def route(self, job_id: str, node: str) -> bool:
        """Route a queued job to ``node``'s own queue (out of its type's turns); False when
        it is no longer queued (send it to the shared queue then)."""
        return bool(self.scripts.route(args=[self.p, job_id, node]))

    def unroute(self, job_id: str) -> bool:
        """Make a routed, queued job a turn of its shared queue again; True if it was one."""
        return bool(self.scripts.unroute(args=[self.p, job_id]))

    def backlog(self) -> dict[str, int]:
        """Per worker node: jobs routed to its own queue and not started yet."""
        return {str(k): int(v) for k, v in self.r.hgetall(f"{self.p}:backlog").items()}

    def routed(self) -> dict[str, str]:
        """Queued jobs routed to a worker's own queue: {job id: node} (maybe stale entries)."""
        return {str(k): str(v) for k, v in self.r.hgetall(f"{self.p}:routed").items()}

    def renew(self, leases: dict[str, str], lease_s: float) -> set[str]:
        """Extend the leases of running jobs {id: owner}; returns the ids no longer ours."""
        if not leases:
            return set()
        pipe = self.r.pipeline(transaction=False)
        items = builtins.list(leases.items())
        for job_id, owner in items:
            self.scripts.renew(args=[self.p, job_id, owner, lease_s], client=pipe)
        replies = pipe.execute()
        return {job_id for (job_id, _), ok in zip(items, replies, strict=True) if not ok}

    def requeue_lapsed(
        self, max_attempts: int, limit: int = 100
    ) -> builtins.list[tuple[str, str, str]]:
        """Running jobs whose lease lapsed: re-queued, or ended. [(id, type, new status)]."""
        reply = self.scripts.lapsed(args=[self.p, max_attempts, limit])
        return [(str(i), str(t), str(s)) for i, t, s in reply]

    def release(self, job_id: str, owner: str) -> str | None:
        """Hand a running job back to the queue (its worker is stopping); its type, or None
        when it was not ``owner``'s to hand back (or it ended canceled instead)."""
        job_type = self.scripts.release(args=[self.p, job_id, owner])
        return str(job_type) if job_type else None

    def mark_dispatched(self, job_id: str) -> None:
        self.r.zrem(f"{self.p}:undispatched", job_id)

    def undispatched(self, older_than_s: float) -> builtins.list[JobRecord]:
        """Queued jobs whose message was never confirmed sent (e.g. the API node died)."""
        (server_now, micros) = self.r.time()
        cutoff = server_now + micros / 1e6 - older_than_s
        ids = _strs(
            self.r.zrangebyscore(f"{self.p}:undispatched", "-inf", cutoff, start=0, num=100)
        )
        jobs = self._load(ids)
        stale = {j.id for j in jobs if j.status != "queued"} | (set(ids) - {j.id for j in jobs})
        if stale:
            self.r.zrem(f"{self.p}:undispatched", *stale)
        return [j for j in jobs if j.status == "queued"]


def _number(value: str | None) -> float | None:
    try:
        return float(value) if value else None
    except ValueError:
        return None


class RedisOutbox:
    """The webhook outbox over Redis (webhooks/outbox.py): shared by every API node and worker,
    each claiming deliveries under a lease so one sends each at a time."""

    def __init__(self, client: redis.Redis, prefix: str) -> None:
        self.r = client
        self.p = prefix
        self.scripts = _Scripts(client)

    def claim(self, owner: str, limit: int, lease_s: float) -> builtins.list[Delivery]:
        out = []
        for flat in self.scripts.wh_claim(args=[self.p, owner, limit, lease_s]):
            h = _pairs(flat)
            job = job_from_hash(_pairs(json.loads(h["snap"])))
            body = json.dumps(job.event_payload(h["event"]), ensure_ascii=False)
            out.append(
                Delivery(
                    h["id"], h["job"], h["event"], h["url"], body.encode(), _int(h["attempts"])
                )
            )
        return out

    def record(
        self,
        delivery: Delivery,
        owner: str,
        *,
        outcome: str,
        retry_in_s: float = 0.0,
        status_code: int | None = None,
        error: str | None = None,
    ) -> None:
        self.scripts.wh_record(
            args=[
                self.p,
                delivery.id,
                owner,
                outcome,
                repr(float(retry_in_s)),
                "" if status_code is None else str(status_code),
                error or "",
            ]
        )

    def release_leases(self) -> None:
        # Shared by live nodes: a lease ends on its own.
        return None

    def shown(self, job_ids: builtins.list[str]) -> builtins.list[builtins.list[dict[str, Any]]]:
        """Each job's most recent deliveries, oldest first, as the Job JSON shows them."""
        pipe = self.r.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.lrange(f"{self.p}:wh:job:{job_id}", -SHOWN_DELIVERIES, -1)
        id_lists = [_strs(ids) for ids in pipe.execute()]
        for ids in id_lists:
            for did in ids:
                pipe.hmget(
                    f"{self.p}:wh:{did}",
                    [
                        "id",
                        "event",
                        "status",
                        "attempts",
                        "code",
                        "error",
                        "next_at",
                        "delivered_at",
                    ],
                )
        rows = iter(pipe.execute())
        out = []
        for ids in id_lists:
            shown = []
            for _ in ids:
                did, event, status, attempts, code, error, next_at, done_at = next(rows)
                if did is None:
                    continue
                shown.append(
                    {
                        "id": did,
                        "event": event,
                        "status": status,
                        "attempts": _int(attempts),
                        "last_status_code": _int(code) or None,
                        "last_error": error or None,
                        "next_attempt_at": _number(next_at) if status == "pending" else None,
                        "delivered_at": _number(done_at),
                    }
                )
            out.append(shown)
        return out


class RedisFileMeta:
    """The ``FileMeta`` seam over Redis: file records every node can read."""

    def __init__(self, client: redis.Redis, prefix: str) -> None:
        self.r = client
        self.p = prefix
        self.scripts = _Scripts(client)

    def put(self, info: FileInfo) -> None:
        self.scripts.file_put(
            args=[
                self.p,
                info.id,
                info.filename,
                info.content_type,
                info.bytes,
                info.sha256,
                repr(info.created_at),
                info.job_id or "",
            ]
        )

    @staticmethod
    def _info(h: dict[str, str]) -> FileInfo:
        return FileInfo(
            id=h["id"],
            filename=h["filename"],
            content_type=h["content_type"],
            bytes=int(h["bytes"]),
            sha256=h["sha256"],
            created_at=float(h["created_at"]),
            job_id=h.get("job_id") or None,
        )

    def get(self, file_id: str) -> FileInfo | None:
        h = _hash(self.r.hgetall(f"{self.p}:file:{file_id}"))
        return self._info(h) if h else None

    def list(
        self, *, limit: int, cursor: int | None, job_id: str | None
    ) -> tuple[builtins.list[FileInfo], int | None]:
        key = f"{self.p}:files:job:{job_id}" if job_id else f"{self.p}:files"
        ids = _strs(
            self.r.zrange(
                key, _span(cursor), "-inf", desc=True, byscore=True, offset=0, num=limit + 1
            )
        )
        more = len(ids) > limit
        pipe = self.r.pipeline(transaction=False)
        for file_id in ids[:limit]:
            pipe.hgetall(f"{self.p}:file:{file_id}")
        rows = [h for h in pipe.execute() if h]
        return [self._info(h) for h in rows], (int(rows[-1]["seq"]) if more and rows else None)

    def delete(self, file_id: str) -> bool:
        return bool(self.scripts.file_delete(args=[self.p, file_id]))

    def created_before(self, cutoff: float) -> builtins.list[str]:
        return _strs(self.r.zrangebyscore(f"{self.p}:files:created", "-inf", f"({cutoff!r}"))

    def all_ids(self) -> set[str]:
        return set(_strs(self.r.zrange(f"{self.p}:files", 0, -1)))


_READ_DIRECTORY = """
local nodes = redis.call('SMEMBERS', KEYS[1])
table.sort(nodes)
local live = {}
for _, node in ipairs(nodes) do
  local entry = redis.call('GET', ARGV[1] .. ':worker:' .. node)
  if entry then table.insert(live, entry) else redis.call('SREM', KEYS[1], node) end
end
local extra = {}
if ARGV[2] ~= '' then extra = redis.call('HGETALL', ARGV[2]) end
return {live, extra}
"""


class WorkerDirectory:
    """The live ``kiapi worker`` nodes: what each serves, refreshed while it runs."""

    def __init__(self, client: redis.Redis, prefix: str) -> None:
        self.r = client
        self.p = prefix
        self._read = client.register_script(_READ_DIRECTORY)

    def announce(self, node: str, info: dict[str, Any], ttl_s: float) -> None:
        key = f"{self.p}:worker:{node}"
        pipe = self.r.pipeline()
        pipe.set(key, json.dumps(info), px=max(1000, int(ttl_s * 1000)))
        pipe.sadd(f"{self.p}:workers", node)
        pipe.execute()

    def withdraw(self, node: str) -> None:
        pipe = self.r.pipeline()
        pipe.delete(f"{self.p}:worker:{node}")
        pipe.srem(f"{self.p}:workers", node)
        pipe.execute()

    def live(self) -> builtins.list[dict[str, Any]]:
        return self.live_with()[0]

    def live_with(
        self, hash_key: str | None = None
    ) -> tuple[builtins.list[dict[str, Any]], dict[str, str]]:
        """The live workers (sorted by node; expired entries dropped from the set) and the
        hash at ``hash_key``, in one round trip: an API node reads them on every ``/health``,
        and each trip off a busy event loop waits for the interpreter lock again."""
        values, flat = self._read(keys=[f"{self.p}:workers"], args=[self.p, hash_key or ""])
        pairs = _strs(flat)
        return [json.loads(v) for v in values], dict(zip(pairs[::2], pairs[1::2], strict=True))


class ClusterWeights(WeightsRegistry):
    """Weights as an API node sees them: its own, or those of any live worker.

    A route that checks "are this model's weights activated?" before queueing a job gets
    yes when some worker serves the model, so a job is never queued for nobody (503 instead).
    """

    CACHE_S = 2.0

    def __init__(self, home: Path, directory: WorkerDirectory) -> None:
        super().__init__(home)
        self.directory = directory
        self._lock = threading.Lock()
        self._cached: tuple[float, dict[str, str]] = (0.0, {})

    def _cluster(self) -> dict[str, str]:
        with self._lock:
            at, models = self._cached
            if time.monotonic() - at < self.CACHE_S:
                return models
        models = {}
        try:
            for worker in self.directory.live():
                models.update(worker.get("models") or {})
        except redis.RedisError:
            log.exception("reading the worker directory failed")
        with self._lock:
            self._cached = (time.monotonic(), models)
        return models

    def path_for(self, spec: ModelSpec) -> Path | None:
        local = super().path_for(spec)
        if local is not None:
            return local
        found = self._cluster().get(spec.key)
        # A path on the worker's machine: it says where, not that this node can read it.
        return Path(found) if found else None


class Guarded:
    """Wraps a store for API nodes: Redis unreachable answers 503 + Retry-After, not a 500.

    ``target`` is the store itself, for code that needs its Redis-specific methods.
    """

    def __init__(self, target: Any) -> None:
        self.target = target

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.target, name)
        if not callable(attr):
            return attr

        @functools.wraps(attr)
        def call(*args: Any, **kwargs: Any) -> Any:
            try:
                return attr(*args, **kwargs)
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                log.error("Redis unreachable: %s", exc)
                raise ApiError(
                    503,
                    f"the shared job store (Redis, KIAPI_REDIS_URL) is unreachable: {exc};"
                    " retry shortly",
                    headers={"Retry-After": "5"},
                ) from None

        return call


def redis_files(settings: Settings, client: redis.Redis, *, guarded: bool = False) -> FileStore:
    meta = RedisFileMeta(client, settings.redis_prefix)
    return FileStore(
        settings.files_dir,
        cast(FileMeta, Guarded(meta)) if guarded else meta,
        orphan_grace_s=SHARED_ORPHAN_GRACE_S,
    )
