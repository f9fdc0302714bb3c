"""Tandem's ML core: encoder, intent classifier, knowledge index, responder and the chain.

Imports no Celery and no Redis: the same objects run in one process or inside workers.
"""
