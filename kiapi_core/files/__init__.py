"""Stored files: atomic blobs on disk, metadata in the database, the /v1/files routes."""
