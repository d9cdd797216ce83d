"""Where state lives: SQLite (the embedded default) and Redis (the celery backend) stores,
the home directory's lock, and what a full disk looks like. ``kiapi_core.node`` picks one."""
