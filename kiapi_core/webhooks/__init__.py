"""Webhooks (docs/jobs.md#webhooks): what a submit asks for (spec.py), which targets are allowed
(targets.py), how a delivery is signed (signing.py), the durable outbox (outbox.py) and the
threads that deliver it (delivery.py)."""
