"""The local bus's wire format, shared by ``bus.BusServer`` and ``localbus.LocalBusBroker``.

One Unix stream socket per worker carries everything, both ways, in order. A frame is a
4-byte big-endian length, then a msgpack array of messages: everything one side issued in
one event-loop turn (one frame per turn, one ``write``). Each message is a msgspec Struct
encoded as an array whose first item is its tag.

Worker -> server (requests; the server answers each with one ``Reply``, in order, so replies
carry no id: the worker matches them to its FIFO of pending requests):

    ========= ============================== ==========================================
    tag       fields                         reply
    ========= ============================== ==========================================
    seq       room, head                     a = the seq allocated; publishes
                                             ``types.chat_payload(head, seq, epoch)``
    pub       room, payload, exclude         (ok); publishes ``payload``
    join      room, MemberInfo, since_seq,   a = connections in room, b = last seq,
              since_epoch                    epoch, recovered (-1/0/1), messages (replay)
    leave     room, client_id                a = connections left
    history   room, limit                    b = last seq, epoch, messages
    presence  room                           members = [MemberInfo, ...]
    sub       room, after                    (ok) once recorded: later publications follow;
                                             after >= 0 (a re-subscription): a = the seq of
                                             messages[0], messages = the chats after it
    unsub     room                           (ok)
    ping      (none)                         (ok): behind everything published before it
    resync    node, [[room, MemberInfo]...]  (ok): the node's presence is now exactly this
    acquire   room                           a = 1 and b = last seq, epoch: the room's seq
                                             is lent to this worker (a lease); a = 0: not
    record    room, seq, payload             none: a chat the lessee sequenced; kept in
                                             history and published to the others
    release   room                           none: the lessee gives the seq back
    ========= ============================== ==========================================

Deadlines: a frame with requests to answer starts with ``by`` (a CLOCK_MONOTONIC time,
shared by every process of the host) past which the worker will have given up on them. A
server that reads it too late answers each with ``ok`` false instead of applying it, so a chat
or join the worker reported as failed is never applied behind its back; records and releases
are applied whatever the time (their chats were delivered already).

Leases: a room whose one subscriber is this worker needs no round trip per chat. The worker
asks for the room's seq (``acquire``, sent after ``sub`` and on ``offer``), then sequences its
chats itself and streams each as a ``record`` ahead of delivering it. When another worker
subscribes, or asks to sequence a chat in the room, the server sends ``revoke``; the lessee
answers ``release`` (or ``unsub``) behind its last record, and the other worker's requests
wait until then. The lease also ends with the lessee's connection.

Server -> worker, interleaved in the one order the server made them:

    ====== ============================== ===================================================
    tag    fields                         meaning
    ====== ============================== ===================================================
    r      ok, a, b, members, epoch,      the reply to the oldest pending request (trailing
           recovered, messages            defaults omitted); ok false: the server failed on it
    p      room, exclude_client_id,       a publication in a room the worker subscribed to;
           payload, seq                   seq 0 for anything but a chat_message
    s      room, payload, seq             a chat_message publication that is also the reply
                                          (a = seq) to the worker's oldest pending request,
                                          its ``seq``: the chat hot path's one message back
    revoke room                           give the room's lease back (``release``)
    offer  room                           this worker is the room's one subscriber again:
                                          it may ``acquire`` the lease
    ====== ============================== ===================================================

Every struct is ``gc=False``: they hold no references that could form a cycle, so the
collector need not track the thousands made per second.
"""

from __future__ import annotations

import os
from typing import Any, ClassVar

import msgspec

from .types import MemberInfo

#: Longest ``sun_path`` of a Unix socket (108 bytes with its NUL on Linux).
MAX_SOCKET_PATH = 107
#: A frame longer than this is a broken stream, not a message: the connection is dropped.
MAX_FRAME = 64 * 1024 * 1024
HEADER = 4  # bytes of the big-endian frame length


def socket_path(directory: str) -> str:
    """The bus socket of a run directory; refuses a path the kernel would truncate."""
    path = os.path.join(directory, "bus.sock")
    if len(path.encode()) > MAX_SOCKET_PATH:
        raise ValueError(f"socket path too long ({len(path.encode())} > {MAX_SOCKET_PATH}): {path}")
    return path


# ---- requests ---------------------------------------------------------------------------------


class PublishSeq(msgspec.Struct, array_like=True, gc=False, tag="seq"):
    room: str
    head: bytes


class Publish(msgspec.Struct, array_like=True, gc=False, tag="pub"):
    room: str
    payload: bytes
    exclude: str = ""
    seq: int = 0  # as broker.types.Deliver has it: < 0 a presence notice at version -seq


class Join(msgspec.Struct, array_like=True, gc=False, tag="join"):
    room: str
    member: MemberInfo
    since_seq: int = -1  # -1: no recovery asked
    since_epoch: str = ""


class Leave(msgspec.Struct, array_like=True, gc=False, tag="leave"):
    room: str
    client_id: str


class Linger(msgspec.Struct, array_like=True, gc=False, tag="linger"):
    room: str
    client_id: str
    user_id: str


class History(msgspec.Struct, array_like=True, gc=False, tag="history"):
    room: str
    limit: int


class Presence(msgspec.Struct, array_like=True, gc=False, tag="presence"):
    room: str


class Subscribe(msgspec.Struct, array_like=True, gc=False, tag="sub"):
    room: str
    after: int = -1  # a worker re-subscribing: the last chat seq it delivered in the room


class Unsubscribe(msgspec.Struct, array_like=True, gc=False, tag="unsub"):
    room: str


class Ping(msgspec.Struct, array_like=True, gc=False, tag="ping"):
    pass


class Resync(msgspec.Struct, array_like=True, gc=False, tag="resync"):
    node: str
    members: list[tuple[str, MemberInfo]]


class Deadline(msgspec.Struct, array_like=True, gc=False, tag="by"):
    at: float  # time.monotonic() past which the worker has given up on this frame


class Acquire(msgspec.Struct, array_like=True, gc=False, tag="acquire"):
    room: str


class Record(msgspec.Struct, array_like=True, gc=False, tag="record"):
    room: str
    seq: int
    payload: bytes


class Release(msgspec.Struct, array_like=True, gc=False, tag="release"):
    room: str


#: Requests the server does not answer: the worker keeps no waiter for them.
ONE_WAY = (Record, Release)

Request = (
    PublishSeq
    | Publish
    | Join
    | Leave
    | Linger
    | History
    | Presence
    | Subscribe
    | Unsubscribe
    | Ping
    | Resync
    | Acquire
    | Record
    | Release
    | Deadline
)

# ---- server -> worker ---------------------------------------------------------------------------


class Reply(msgspec.Struct, array_like=True, gc=False, omit_defaults=True, tag="r"):
    ok: bool = True
    a: int = 0
    b: int = 0
    members: list[MemberInfo] = []
    epoch: str = ""
    recovered: int = -1  # -1 none, 0 false, 1 true
    messages: list[bytes] = []
    version: int = 0  # join, leave: the room's presence version after it
    c: int = 0  # join: 1 if it replaced its user's lingering connection; leave: 1 if not there


class Publication(msgspec.Struct, array_like=True, gc=False, tag="p"):
    room: str
    exclude: str
    payload: bytes
    seq: int = 0


class Sequenced(msgspec.Struct, array_like=True, gc=False, tag="s"):
    room: str
    payload: bytes
    seq: int
    exclude: ClassVar[str] = ""  # not on the wire: read like a Publication's


class Revoke(msgspec.Struct, array_like=True, gc=False, tag="revoke"):
    room: str


class Offer(msgspec.Struct, array_like=True, gc=False, tag="offer"):
    room: str


Event = Reply | Publication | Sequenced | Revoke | Offer

OK = Reply()
FAILED = Reply(ok=False)


class Framer:
    """Encodes one turn's messages into one length-prefixed frame."""

    __slots__ = ("_encode_into",)

    def __init__(self) -> None:
        self._encode_into = msgspec.msgpack.Encoder().encode_into

    def frame(self, messages: list[msgspec.Struct]) -> bytearray:
        buf = bytearray(HEADER)
        self._encode_into(messages, buf, HEADER)
        buf[:HEADER] = (len(buf) - HEADER).to_bytes(HEADER, "big")
        return buf


class Deframer:
    """Splits a byte stream into frames and decodes each into its list of messages.

    ``feed`` returns the messages of every frame completed by ``data``, oldest first. A frame
    split across reads is kept until whole; ``need`` stops a large one from being rescanned
    on every read. Raises ``ValueError`` (or ``msgspec.DecodeError``) on a broken stream.
    """

    __slots__ = ("_decode", "_need", "_partial")

    def __init__(self, kind: object) -> None:
        self._decode = msgspec.msgpack.Decoder(list[kind]).decode  # type: ignore[valid-type]
        self._partial = bytearray()
        self._need = 0  # bytes _partial must hold before it is worth parsing again

    def feed(self, data: bytes) -> list[list[Any]]:  # the messages of the ``kind`` given
        if self._partial:
            self._partial += data
            if len(self._partial) < self._need:
                return []
            data = bytes(self._partial)
            self._partial = bytearray()
        frames: list[list[Any]] = []
        view = memoryview(data)
        pos, end = 0, len(data)
        while end - pos >= HEADER:
            size = int.from_bytes(view[pos : pos + HEADER], "big")
            if size > MAX_FRAME:
                raise ValueError(f"bus frame of {size} bytes")
            stop = pos + HEADER + size
            if stop > end:
                self._need = stop - pos
                break
            frames.append(self._decode(view[pos + HEADER : stop]))
            pos = stop
        else:
            self._need = HEADER
        if pos < end:
            self._partial = bytearray(view[pos:])
        return frames
