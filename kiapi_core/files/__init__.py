"""Stored files: atomic blobs on disk, metadata in the database, and the default plugin serving
/v1/files."""
