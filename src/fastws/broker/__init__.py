"""Brokers carry room traffic and room-wide facts between nodes.

A node asks its broker to publish, to allocate per-room ``seq`` and to keep presence; the
broker calls ``deliver(room, exclude_client_id, payload, seq)`` for every publication in a room
this node subscribed to. The contract is ``types.Broker``; every broker passes one conformance
suite (tests/test_broker_conformance.py).

    MemoryBroker    one process, no hop at all (memory.py)
    LocalBusBroker  workers of one host, via the supervisor (localbus.py)
    RedisBroker     several hosts, via Redis pub/sub and Lua (redis.py)
"""

from __future__ import annotations

from .types import Broker, Deliver, JoinResult, LeaveResult, MemberInfo, Pressure, SeqDone

__all__ = ["Broker", "Deliver", "JoinResult", "LeaveResult", "MemberInfo", "Pressure", "SeqDone"]
