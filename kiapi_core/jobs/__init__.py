"""Durable jobs: records, the store, the worker, and the helper plugin routes submit through."""
