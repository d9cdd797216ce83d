"""Sending the outbox: a thread that claims due deliveries and a small pool that posts them.

Never on the event loop. At least once: a delivery stays pending until a 2xx is recorded, so a
crash between the POST and the record sends it again (receivers dedupe on ``webhook-id``).
Anything but a 2xx is a failed attempt, redirects included (they are never followed); attempts
back off exponentially with jitter up to KIAPI_WEBHOOK_MAX_ATTEMPTS, then the delivery is
``failed``.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from kiapi_core.settings import Settings
from kiapi_core.version import host_version
from kiapi_core.webhooks.outbox import Delivery, Outbox
from kiapi_core.webhooks.signing import SecretKeeper, sign
from kiapi_core.webhooks.targets import AllowList, TargetRefused, check_host, parse_target, resolve

log = logging.getLogger("kiapi.webhooks")
POLL_S = 0.2
MAX_ERROR_CHARS = 300


@dataclass(frozen=True)
class DeliveryPolicy:
    timeout_s: float
    max_attempts: int
    backoff_s: float
    backoff_max_s: float
    workers: int

    @property
    def lease_s(self) -> float:
        # Longer than any one attempt (lookup, connect, send, read), so no two deliverers
        # hold one delivery at once while the first is still trying.
        return 2 * self.timeout_s + 10.0

    def retry_in_s(self, attempts_before: int) -> float:
        delay = min(self.backoff_max_s, self.backoff_s * 2.0 ** min(attempts_before, 60))
        return delay * random.uniform(0.5, 1.0)


class Deliverer:
    def __init__(
        self,
        outbox: Outbox,
        keeper: SecretKeeper,
        allow: AllowList,
        policy: DeliveryPolicy,
        owner: str,
    ) -> None:
        self.outbox = outbox
        self.keeper = keeper
        self.allow = allow
        self.policy = policy
        self.owner = owner
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._busy = 0
        self._lock = threading.Lock()

    def start(self) -> None:
        self._pool = ThreadPoolExecutor(self.policy.workers, thread_name_prefix="kiapi-webhook")
        self._thread = threading.Thread(target=self._run, name="kiapi-webhooks", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        if self._pool is not None:
            # Attempts in flight keep their lease: unrecorded, they are sent again later.
            self._pool.shutdown(wait=False, cancel_futures=True)

    def _run(self) -> None:
        failures = 0
        while not self._stop.is_set():
            with self._lock:
                free = self.policy.workers - self._busy
            batch: list[Delivery] = []
            if free > 0:
                try:
                    batch = self.outbox.claim(self.owner, free, self.policy.lease_s)
                    failures = 0
                except Exception as exc:
                    # The store down (Redis restarting): said once, then retried more slowly.
                    if failures == 0:
                        log.exception("claiming webhook deliveries failed")
                    else:
                        log.debug("claiming webhook deliveries failed again: %s", exc)
                    failures += 1
            for delivery in batch:
                with self._lock:
                    self._busy += 1
                assert self._pool is not None
                self._pool.submit(self._attempt, delivery)
            self._stop.wait(min(10.0, POLL_S * 2.0 ** min(failures, 6)))

    def _attempt(self, delivery: Delivery) -> None:
        try:
            code, error = self.send(delivery)
            if code is not None and 200 <= code < 300:
                self.outbox.record(delivery, self.owner, outcome="delivered", status_code=code)
                return
            last = delivery.attempts + 1 >= self.policy.max_attempts
            self.outbox.record(
                delivery,
                self.owner,
                outcome="failed" if last else "retry",
                retry_in_s=self.policy.retry_in_s(delivery.attempts),
                status_code=code,
                error=error,
            )
            if last:
                log.warning(
                    "webhook %s for job %s failed for good after %d attempts: %s",
                    delivery.id,
                    delivery.job_id,
                    delivery.attempts + 1,
                    error or f"HTTP {code}",
                )
        except Exception:
            log.exception("webhook delivery %s could not be recorded", delivery.id)
        finally:
            with self._lock:
                self._busy -= 1

    def send(self, delivery: Delivery) -> tuple[int | None, str | None]:
        """One POST: (HTTP status, None) or (status or None, why it failed)."""
        try:
            target = parse_target(delivery.url)
            addresses = resolve(target)
            check_host(target, self.allow, addresses)
        except TargetRefused as exc:
            return None, f"refused: {delivery.url[:200]} {exc}"
        # At the first delivery, not at start-up: httpx was ~30 ms of a server start.
        import httpx

        url = httpx.URL(delivery.url)
        headers = {
            "content-type": "application/json",
            "user-agent": f"kiapi/{host_version()} webhooks",
        }
        if target.scheme == "http":
            # To the address just checked: a second lookup by the client could be rebound.
            headers["host"] = url.netloc.decode("ascii")
            url = url.copy_with(host=str(addresses[0]))
        timestamp = int(time.time())
        try:
            keys = self.keeper.keys()
        except Exception as exc:
            return None, f"no signing secret: {exc}"[:MAX_ERROR_CHARS]
        headers["webhook-id"] = delivery.id
        headers["webhook-timestamp"] = str(timestamp)
        headers["webhook-signature"] = sign(keys, delivery.id, timestamp, delivery.body)
        try:
            with httpx.Client(
                timeout=self.policy.timeout_s, follow_redirects=False, trust_env=False
            ) as client:
                response = client.post(url, content=delivery.body, headers=headers)
        except httpx.HTTPError as exc:
            return None, f"{type(exc).__name__}: {exc}"[:MAX_ERROR_CHARS]
        if 200 <= response.status_code < 300:
            return response.status_code, None
        if 300 <= response.status_code < 400:
            where = response.headers.get("location", "")[:200]
            return response.status_code, f"redirect to {where!r} not followed"
        return response.status_code, f"HTTP {response.status_code}"


def deliverer_for(settings: Settings, outbox: Outbox, owner: str) -> Deliverer:
    """This node's deliverer, as the KIAPI_WEBHOOK_* settings say."""
    policy = DeliveryPolicy(
        timeout_s=settings.webhook_timeout_s,
        max_attempts=settings.webhook_max_attempts,
        backoff_s=settings.webhook_backoff_s,
        backoff_max_s=settings.webhook_backoff_max_s,
        workers=settings.webhook_workers,
    )
    secret = settings.webhook_secret.get_secret_value() if settings.webhook_secret else None
    keeper = SecretKeeper(settings.home, secret)
    return Deliverer(outbox, keeper, AllowList.parse(settings.webhook_allow), policy, owner)
