"""Where jobs run: threads of the server (``threads``), the worker process (``process`` is the
server's side, ``child`` the process itself) or ``kiapi worker`` nodes (``celery``); all of them
run a handler through the one ``execute.perform``."""
