"""Durable jobs: records and their store, status and failure kinds, the service routes use,
progress events, the context a handler gets, and the default plugin serving /v1/jobs."""
