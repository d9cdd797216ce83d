"""The distributed runtime: API nodes send job ids through Celery (``dispatcher``), ``kiapi
worker`` processes run them (``worker``)."""
