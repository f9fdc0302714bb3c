"""Celery app and tasks that run the pipeline's stages on separate queues (issue 3)."""
