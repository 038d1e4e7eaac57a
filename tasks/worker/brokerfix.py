"""A workaround for Celery 5.7 with kombu 5.7 on the Redis broker.

When the broker connection drops, the consumer collects the connection, which detaches its
transport (`transport.client = None`), and reconnects with a new one. The old channel lives on
in the messages of running tasks: closing it restores unacknowledged messages, and acking a
task's message when it ends, both go through the detached transport and raise AttributeError
("'NoneType' object has no attribute 'hostname'"), which kills the worker as an unrecoverable
error. Raising a Redis ConnectionError instead lets kombu's own handlers treat it as the lost
connection it is. Such a message stays unacknowledged and comes back after the visibility
timeout, where the runner skips a job whose log already ends.
"""
from __future__ import annotations

import redis
from kombu.transport import redis as redis_transport

_connparams = redis_transport.Channel._connparams


def _connparams_of_live_transport(self, asynchronous: bool = False):
    """The Redis connection parameters, or a ConnectionError for a detached transport."""
    if self.connection.client is None:
        raise redis.ConnectionError("this broker channel's connection was closed")
    return _connparams(self, asynchronous=asynchronous)


def tolerate_detached_channels() -> None:
    """Patch kombu's Redis channel (idempotent)."""
    redis_transport.Channel._connparams = _connparams_of_live_transport
