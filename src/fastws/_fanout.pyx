# cython: language_level=3
"""The hot path: write already-encoded WebSocket frames to many sockets, corked per loop turn.

A ``Sink`` is one connection's outgoing side. ``Outbox.broadcast`` appends one frame to many
sinks (a memcpy each, no Python object per recipient); the first append to a sink in an
event-loop turn queues it, and ``Outbox.flush`` -- scheduled once per turn with ``call_soon``,
so it runs before the loop sleeps -- writes each queued sink's bytes with one ``send()``.
Many messages to one socket in one turn thus cost one system call (corking).

Nothing here decides policy (no logging, config or asyncio beyond ``call_soon``): a sink whose
unsent output passes ``max_buffered`` is handed to ``on_slow`` and written to no more.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.list cimport PyList_GET_ITEM, PyList_GET_SIZE
from cpython.unicode cimport Py_UNICODE_ISSPACE, PyUnicode_DecodeASCII, PyUnicode_DecodeUTF8
from cpython.set cimport PySet_GET_SIZE


cdef extern from "Python.h":
    bint PyUnicode_IS_ASCII(object s)
    void* PyUnicode_DATA(object s)
    Py_ssize_t PyUnicode_GET_LENGTH(object s)
    const char* PyUnicode_AsUTF8AndSize(object s, Py_ssize_t* size) except NULL
from libc.stdlib cimport free, realloc
from libc.string cimport memcmp, memcpy
from libc.stdint cimport uint8_t
from fastws._wire cimport MessageListener, Wire, frame_header

import time

import fastws._wire as _wire
import fastws.broker.types as _types


cdef extern from "<time.h>" nogil:
    ctypedef long time_t
    cdef struct timespec:
        time_t tv_sec
        long tv_nsec
    int clock_gettime(int clk_id, timespec* tp)
    int CLOCK_MONOTONIC
    int CLOCK_REALTIME


cdef inline double _clock(int which) noexcept nogil:
    cdef timespec ts
    clock_gettime(which, &ts)
    return ts.tv_sec + ts.tv_nsec * 1e-9


cdef extern from "<sys/socket.h>" nogil:
    ssize_t send(int fd, const void* buf, size_t n, int flags)
    int MSG_NOSIGNAL

# The frame builder is the WebSocket layer's (it frames its control frames with it too).
frame = _wire.frame


# Sink buffers freed at the end of a turn, kept for the next turn's sinks: a turn that fills
# many sinks and frees them all would otherwise have malloc give the heap's top back to the
# kernel (brk) and fault it in again on the next turn, in system time. At most 4 MiB kept.
cdef enum:
    _SPARES_MAX = 1024
    _SPARE_SIZE_MAX = 1 << 16
    _SPARE_BYTES_MAX = 1 << 22
cdef char* _spare_buf[_SPARES_MAX]
cdef Py_ssize_t _spare_capacity[_SPARES_MAX]
cdef Py_ssize_t _spares = 0
cdef Py_ssize_t _spare_bytes = 0


cdef inline Py_ssize_t _transport_holds(Wire w) noexcept:
    """The bytes ``w``'s socket did not take yet (its output buffer)."""
    return w.out_size


cdef class Sink:
    """One connection's outgoing bytes, gathered during a loop turn and sent in one write.

    ``owner`` is free for the caller (the session). A sink is written to only through its
    ``Outbox``; ``closed`` sinks (slow, or the transport closing) drop what they are given.
    """

    cdef Wire transport
    cdef char* buf
    cdef Py_ssize_t size
    cdef Py_ssize_t capacity
    cdef bint queued
    cdef bint skip  # set only for the duration of one broadcast(..., skip=...)
    cdef readonly bint closed
    cdef public object owner
    # The transport asked us to stop writing (its buffer is past its high-water mark).
    cdef public bint congested
    cdef dict held  # ephemeral frames held while congested: key -> latest frame; None if none

    def __cinit__(self, Wire transport, object owner=None):
        self.transport = transport
        self.owner = owner
        self.buf = NULL
        self.size = 0
        self.capacity = 0
        self.queued = False
        self.skip = False
        self.closed = False
        self.congested = False
        self.held = None

    def __dealloc__(self):
        free(self.buf)

    @property
    def pending(self):
        """Bytes appended this turn and not yet written."""
        return self.size

    cdef inline int _append(self, const char* data, Py_ssize_t n) except -1:
        cdef Py_ssize_t want = self.size + n
        cdef Py_ssize_t cap
        cdef char* grown
        global _spares, _spare_bytes
        if want > self.capacity and self.buf == NULL and _spares:
            _spares -= 1
            self.buf = _spare_buf[_spares]
            self.capacity = _spare_capacity[_spares]
            _spare_bytes -= self.capacity
        if want > self.capacity:
            cap = self.capacity * 2 if self.capacity else 1024
            while cap < want:
                cap *= 2
            grown = <char*>realloc(self.buf, cap)
            if grown == NULL:
                raise MemoryError()
            self.buf = grown
            self.capacity = cap
        memcpy(self.buf + self.size, data, n)
        self.size = want
        return 0

    cdef inline void _reset(self):
        # Not kept by the sink: an idle connection holds no buffer (a spare, or freed).
        global _spares, _spare_bytes
        self.size = 0
        if self.buf != NULL:
            if (self.capacity <= _SPARE_SIZE_MAX and _spares < _SPARES_MAX
                    and _spare_bytes + self.capacity <= _SPARE_BYTES_MAX):
                _spare_buf[_spares] = self.buf
                _spare_capacity[_spares] = self.capacity
                _spares += 1
                _spare_bytes += self.capacity
            else:
                free(self.buf)
        self.buf = NULL
        self.capacity = 0

    cdef inline bint _dead(self):
        return (self.closed or self.transport.close_sent_code != 0
                or self.transport.is_disconnected)


cdef class Outbox:
    """Corks writes to many sinks within one event-loop turn; one per event loop.

    ``on_slow(sink)`` is called (at most once per sink) when a sink's unsent output -- this
    turn's bytes plus what its transport still holds -- would pass ``max_buffered`` bytes.
    """

    cdef list _queued
    cdef object _call_soon
    cdef object _flush_cb
    cdef bint _scheduled
    cdef bint _in_message  # a Listener handles a message: it schedules the flush after
    cdef readonly Py_ssize_t max_buffered
    cdef object _on_slow
    cdef readonly unsigned long long deliveries
    cdef readonly unsigned long long writes
    cdef readonly unsigned long long conflated

    def __init__(self, loop, Py_ssize_t max_buffered, on_slow):
        self._queued = []
        self._call_soon = loop.call_soon
        self._flush_cb = self.flush
        self._scheduled = False
        self._in_message = False
        self.max_buffered = max_buffered
        self._on_slow = on_slow
        self.deliveries = 0
        self.writes = 0
        self.conflated = 0

    cdef inline int _put(self, Sink s, const char* data, Py_ssize_t n) except -1:
        if s.size + n > self.max_buffered:
            self._slow(s)
            return 0
        s._append(data, n)
        if not s.queued:
            s.queued = True
            self._queued.append(s)
            if not self._scheduled and not self._in_message:
                self._schedule()
        return 1

    cdef inline int _schedule(self) except -1:
        self._scheduled = True
        self._call_soon(self._flush_cb)
        return 0

    cdef inline int _message_done(self, Sink sink, bint was_in_message) except -1:
        """After a Listener's message: ``flush_if_last(sink)``, then the turn's flush
        scheduled only if a sink still holds bytes -- a round trip whose reply left at once
        costs no callback."""
        self._in_message = was_in_message
        if sink is not None and sink.transport.last_in_batch and sink.size:
            self._flush_sink(sink)
        if PyList_GET_SIZE(self._queued) and not self._scheduled and not was_in_message:
            self._schedule()
        return 0

    cdef inline int _put_framed(self, Sink s, const char* head, Py_ssize_t nh,
                                const char* data, Py_ssize_t n) except -1:
        """``_put`` of one frame given as its header and its payload."""
        if s.size + nh + n > self.max_buffered:
            self._slow(s)
            return 0
        s._append(head, nh)
        return self._put(s, data, n)

    cdef Py_ssize_t _broadcast_text(self, list sinks, bytes payload) except -1:
        """``broadcast(sinks, frame(payload))`` with the header written into each sink: no
        frame object."""
        cdef char head[10]
        cdef Py_ssize_t n = PyBytes_GET_SIZE(payload)
        cdef Py_ssize_t nh = frame_header(<uint8_t*>head, n, 1)
        cdef const char* data = PyBytes_AS_STRING(payload)
        cdef Py_ssize_t i, taken = 0
        cdef Sink s
        for i in range(PyList_GET_SIZE(sinks)):
            s = <Sink>PyList_GET_ITEM(sinks, i)
            if s.skip or s._dead():
                continue
            taken += self._put_framed(s, head, nh, data, n)
        self.deliveries += taken
        return taken

    cdef void _slow(self, Sink s) except *:
        if s.closed:
            return
        s.closed = True
        s._reset()
        self._on_slow(s)

    cpdef send(self, Sink sink, bytes data):
        """Queue the frame ``data`` for one sink; False if the sink is closed or became slow."""
        if sink._dead():
            return False
        return self._put(sink, PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data)) == 1

    cpdef broadcast(self, list sinks, bytes data, Sink exclude=None, list skip=None):
        """Queue the frame ``data`` for every sink in ``sinks`` but ``exclude`` and ``skip``.

        Returns how many sinks took it. Skipped: ``exclude`` (by identity), the sinks listed
        in ``skip`` (flagged for this call, so the loop stays a C field test per sink) and
        closed sinks. A sink that would pass ``max_buffered`` is reported to ``on_slow`` and
        skipped. Never raises for one recipient's sake; bytes leave at the next ``flush``.
        """
        cdef Py_ssize_t n = PyList_GET_SIZE(sinks)
        cdef Py_ssize_t i
        cdef Py_ssize_t taken = 0
        cdef const char* ptr = PyBytes_AS_STRING(data)
        cdef Py_ssize_t size = PyBytes_GET_SIZE(data)
        cdef Sink s
        if skip:
            for s in skip:
                s.skip = True
        try:
            for i in range(n):
                s = <Sink>PyList_GET_ITEM(sinks, i)
                if s is exclude or s.skip or s._dead():
                    continue
                taken += self._put(s, ptr, size)
        finally:
            if skip:
                for s in skip:
                    s.skip = False
        self.deliveries += taken
        return taken

    def broadcast_ephemeral(self, list sinks, bytes data, Sink exclude, object key):
        """``broadcast`` for a frame that only its latest of ``key`` matters (typing): a
        sink that is congested, or that it would put past half of ``max_buffered`` (the other
        half stays for what must be delivered), holds it instead (replacing the one it held
        for ``key``) until ``release``; it never makes a sink slow. Returns how many sinks
        took it now."""
        cdef Py_ssize_t n = PyList_GET_SIZE(sinks)
        cdef Py_ssize_t i
        cdef Py_ssize_t taken = 0
        cdef Py_ssize_t size = PyBytes_GET_SIZE(data)
        cdef Sink s
        for i in range(n):
            s = <Sink>PyList_GET_ITEM(sinks, i)
            if s is exclude or s._dead():
                continue
            if self._ephemeral(s, data, size, key):
                taken += 1
        self.deliveries += taken
        return taken

    cdef inline bint _ephemeral(self, Sink s, bytes data, Py_ssize_t size, object key) except -1:
        if s.congested or (_transport_holds(s.transport) + s.size + size
                           > self.max_buffered // 2):
            if s.held is None:
                s.held = {}
            elif key in s.held:
                self.conflated += 1
            s.held[key] = data
            return False
        if s.held is not None:
            s.held.pop(key, None)  # this one is newer
        return self._put(s, PyBytes_AS_STRING(data), size) == 1

    def release(self, Sink sink):
        """The sink's transport takes writes again: the ephemeral frames it held go out
        (or stay held, if it is past ``max_buffered`` still)."""
        cdef dict held = sink.held
        if held is None:
            return
        sink.held = None
        if sink._dead():
            return
        for key, data in held.items():
            self._ephemeral(sink, data, PyBytes_GET_SIZE(data), key)

    def flush(self):
        """Write every queued sink: one ``send()`` each, the rest handed to its transport."""
        cdef list queued = self._queued
        cdef Py_ssize_t i, n = PyList_GET_SIZE(queued)
        cdef Sink s
        self._queued = []
        self._scheduled = False
        for i in range(n):
            s = <Sink>PyList_GET_ITEM(queued, i)
            s.queued = False
            if s.size == 0:
                continue
            if s._dead():
                s._reset()
                continue
            try:
                self._write(s)
            except Exception:
                # A transport that refuses writes is closing; its listener reports it.
                pass
            s._reset()
            if s.held is not None and not s.congested:
                self.release(s)  # the socket took it all: what waited may go next turn

    cpdef flush_if_last(self, Sink sink):
        """``flush_sink(sink)`` if the message its connection is handling ends its read batch
        and ``sink`` holds bytes: the peer has nothing more to read this turn, so its own
        replies need not wait for it."""
        if sink.transport.last_in_batch and sink.size:
            self.flush_sink(sink)

    def flush_sink(self, Sink sink):
        """Write one sink's queued bytes now (before a close frame, so nothing overtakes it)."""
        self._flush_sink(sink)

    cdef int _flush_sink(self, Sink sink) except -1:
        cdef list queued = self._queued
        cdef Py_ssize_t n = PyList_GET_SIZE(queued)
        if sink.size and not sink._dead():
            self._write(sink)
        sink._reset()
        if n and sink.queued and <object>PyList_GET_ITEM(queued, n - 1) is sink:
            del queued[n - 1]  # the common case: the turn's flush has nothing left for it
            sink.queued = False
        return 0

    cdef int _write(self, Sink s) except -1:
        cdef Wire w = s.transport
        cdef Py_ssize_t buffered = _transport_holds(w)
        if buffered + s.size > self.max_buffered:
            self._slow(s)
            return 0
        self.writes += 1
        # Straight from the sink's buffer to the socket; what it does not take, the Wire keeps.
        w._send(s.buf, s.size)
        return 0


# ---- the state the chat path reads: C fields, not attribute lookups ----------------------
# Each is the base of the Python class that owns the rest (session.Session, hub.Room,
# broker.ledger.Ledger); the pure-Python twin has the same names as __slots__.


cdef class Clocked:
    """A monotonic clock tests may replace: time.monotonic is read in C, any other called."""

    cdef object _clock
    cdef bint _monotonic

    @property
    def clock(self):
        return self._clock

    @clock.setter
    def clock(self, clock):
        self._clock = clock
        self._monotonic = clock is time.monotonic

    cdef inline double _now(self) except? -1.0:
        return _clock(CLOCK_MONOTONIC) if self._monotonic else self._clock()


cdef class TokenBucket(Clocked):
    """``rate`` tokens per second up to ``burst``; ``clock`` is injected so tests need no
    sleep."""

    cdef readonly double rate
    cdef readonly double burst
    cdef readonly double tokens
    cdef public double stamp

    def __init__(self, double rate, burst, clock=time.monotonic):
        self.rate = rate
        self.burst = float(burst)
        self.tokens = self.burst
        self.clock = clock
        self.stamp = self._now()

    cpdef bint take(self) except -1:
        cdef double now = self._now()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


cdef inline bint _take(object bucket) except -1:
    if type(bucket) is TokenBucket:
        return (<TokenBucket>bucket).take()
    return bucket.take()


cdef class SessionCore:
    """The fields of ``session.Session`` a chat message touches (the session owns them)."""

    cdef public object bucket        # its TokenBucket, made by its first message
    cdef public long rejected_in_row
    cdef public object _task         # the action awaiting a remote broker, or None
    cdef public object rooms         # set (or the shared empty frozenset) of room names
    cdef public long in_flight       # chats handed to a remote broker, not yet answered
    cdef object _principal
    cdef str username                # the principal's, read in C (a refresh keeps both)
    cdef str user_id
    cdef public object sink

    @property
    def principal(self):
        return self._principal

    @principal.setter
    def principal(self, principal):
        self._principal = principal
        self.username = principal.username
        self.user_id = principal.user_id


cdef class RoomCore:
    """The fields of ``hub.Room`` the fan-out reads."""

    cdef public list sinks
    cdef public dict pending
    cdef public dict fresh


cdef class LedgerRoom:
    """One room of a ``broker.ledger.Ledger``: its seq, epoch, history and members."""

    cdef public long long seq
    cdef public str epoch
    cdef public bytes epoch_bytes    # spliced into every chat payload
    cdef readonly object history     # deque(maxlen=size) of (seq, time, payload), or None
    cdef object _append              # history.append, looked up once
    cdef readonly Py_ssize_t history_size  # its maxlen (0 without history)
    cdef public dict members
    cdef public object lingering     # userId -> its dropped connection's id, or None
    cdef public double stamp         # time of the newest message
    cdef public bint leased
    cdef public Py_ssize_t bytes     # what its history costs (see ENTRY_COST)

    def __init__(self, object history, str epoch):
        self.seq = 0
        self.epoch = epoch
        self.epoch_bytes = epoch.encode()
        self.history = history
        self._append = history.append if history is not None else None
        self.history_size = history.maxlen if history is not None else 0
        self.members = {}
        self.lingering = None
        self.stamp = 0.0
        self.leased = False
        self.bytes = 0

    def restart(self, str epoch):
        """A new epoch from seq 0, with no history (the ledger takes ``bytes`` off first)."""
        self.seq = 0
        self.epoch = epoch
        self.epoch_bytes = epoch.encode()
        if self.history is not None:
            self.history.clear()
        self.bytes = 0


cdef class LedgerCore(Clocked):
    """Sequencing and keeping of ``broker.ledger.Ledger`` (which owns the rest: joins,
    eviction, expiry). ``_kept(name, room)`` is the subclass's, called after a keep only when
    the room is empty or the ledger is past ``max_bytes``."""

    cdef public dict rooms
    cdef public Py_ssize_t bytes     # history kept, all rooms (see ENTRY_COST)
    cdef public double max_bytes
    cdef public Py_ssize_t entry_cost

    def keep(self, str name, LedgerRoom room, tuple entry):
        """Append ``entry`` (seq, time, payload) to the room's history, within the size per
        room and the bytes in all."""
        self._keep(name, room, entry)

    cdef int _keep(self, str name, LedgerRoom room, tuple entry) except -1:
        history = room.history
        cdef Py_ssize_t cost = PyBytes_GET_SIZE(entry[2]) + self.entry_cost
        if len(history) == room.history_size:  # the append pushes the oldest out
            cost -= PyBytes_GET_SIZE(history[0][2]) + self.entry_cost
        room._append(entry)
        room.bytes += cost
        self.bytes += cost
        if not room.members or self.bytes > self.max_bytes:
            self._kept(name, room)
        return 0

    cdef bytes _publish(self, str name, LedgerRoom room, bytes body):
        """The next seq of ``room`` for the encoded head ``body`` (its closing brace is
        dropped): the published payload, kept in history."""
        cdef bytes payload = _sequenced(body, room.seq + 1, room.epoch_bytes)
        self._commit(name, room, room.seq + 1, payload)
        return payload

    cdef int _commit(self, str name, LedgerRoom room, long long seq, bytes payload) except -1:
        """``payload`` was published as the room's ``seq``: note it and keep it."""
        room.seq = seq
        cdef double now = self._now()
        room.stamp = now
        if room.history is not None:
            self._keep(name, room, (seq, now, payload))
        return 0


# ---- the compiled chat path ---------------------------------------------------------------

# broker.types: a chat payload is the encoded head without its closing brace, then these.
cdef bytes _SEQ = _types.CHAT_SEQ
cdef bytes _EPOCH = _types.CHAT_EPOCH
cdef bytes _END = _types.CHAT_END


# ---- JSON strings without msgspec: the chat and its ack, byte for byte as protocol.encode --

cdef bytes _CHAT_ROOM = b'{"type":"chat_message","room":"'
cdef bytes _CHAT_USERNAME = b'","username":"'
cdef bytes _CHAT_MESSAGE = b'","message":"'
cdef bytes _CHAT_TIMESTAMP = b'","timestamp":'
cdef bytes _CHAT_USER_ID = b',"userId":"'
cdef bytes _ACK_ID = b'{"type":"ack","id":'
cdef bytes _ACK_SEQ = b',"seq":'


# What a byte of UTF-8 needs in a JSON string: nothing, a backslash before it, or msgspec.
cdef enum:
    _PLAIN = 0
    _BACKSLASHED = 1
    _CONTROL = 2
cdef unsigned char _ESCAPE[256]
for _c in range(256):
    _ESCAPE[_c] = _CONTROL if _c < 0x20 else (_BACKSLASHED if _c in (0x22, 0x5C) else _PLAIN)


cdef struct Utf8:
    const char* data
    Py_ssize_t size      # bytes of UTF-8
    Py_ssize_t escaped   # bytes once '"' and '\\' are escaped


cdef inline bint _utf8(str s, Utf8* out) except -1:
    """``s`` as UTF-8 (the str's own buffer: no copy) and its escaped size; False if it
    holds a control character (msgspec's \\uXXXX escapes stay msgspec's) or a lone
    surrogate."""
    cdef Py_ssize_t n
    cdef const char* data
    if PyUnicode_IS_ASCII(s):
        data = <const char*>PyUnicode_DATA(s)
        n = PyUnicode_GET_LENGTH(s)
    else:
        try:
            data = PyUnicode_AsUTF8AndSize(s, &n)
        except UnicodeEncodeError:
            return False
    cdef Py_ssize_t i, extra = 0
    cdef unsigned char kind
    for i in range(n):
        kind = _ESCAPE[<unsigned char>data[i]]
        if kind:
            if kind == _CONTROL:
                return False
            extra += 1
    out.data = data
    out.size = n
    out.escaped = n + extra
    return True


cdef inline char* _put_escaped(char* p, Utf8* s):
    cdef Py_ssize_t i
    cdef char c
    if s.escaped == s.size:
        memcpy(p, s.data, s.size)
        return p + s.size
    for i in range(s.size):
        c = s.data[i]
        if c == 0x22 or c == 0x5C:
            p[0] = 0x5C
            p += 1
        p[0] = c
        p += 1
    return p


cdef inline char* _put(char* p, bytes b):
    cdef Py_ssize_t n = PyBytes_GET_SIZE(b)
    memcpy(p, PyBytes_AS_STRING(b), n)
    return p + n


cdef struct Digits:
    char buf[24]
    Py_ssize_t size


cdef inline void _digits(long long v, Digits* d):
    """``v`` in decimal, as ``str(v)``: into ``d.buf``, no Python object."""
    cdef char tmp[24]
    cdef Py_ssize_t n = 0, i
    cdef unsigned long long u = <unsigned long long>(-v) if v < 0 else <unsigned long long>v
    while True:
        tmp[n] = <char>(48 + u % 10)
        n += 1
        u //= 10
        if u == 0:
            break
    i = 0
    if v < 0:
        d.buf[0] = 45
        i = 1
    d.size = n + i
    while n:
        n -= 1
        d.buf[i] = tmp[n]
        i += 1


cdef inline char* _put_digits(char* p, Digits* d):
    memcpy(p, d.buf, d.size)
    return p + d.size


cdef object _chat_payload(str room, str username, Utf8* text, long long timestamp,
                          str user_id, long long seq, bytes epoch):
    """``chat_payload(chat_head(...), seq, epoch)`` in one buffer; None if a field needs
    an escape only msgspec writes."""
    cdef Utf8 r, u, i
    cdef Utf8 m = text[0]
    if not (_utf8(room, &r) and _utf8(username, &u) and _utf8(user_id, &i)):
        return None
    cdef Digits ts, digits
    _digits(timestamp, &ts)
    _digits(seq, &digits)
    cdef Py_ssize_t size = (
        PyBytes_GET_SIZE(_CHAT_ROOM) + r.escaped + PyBytes_GET_SIZE(_CHAT_USERNAME) + u.escaped
        + PyBytes_GET_SIZE(_CHAT_MESSAGE) + m.escaped + PyBytes_GET_SIZE(_CHAT_TIMESTAMP)
        + ts.size + PyBytes_GET_SIZE(_CHAT_USER_ID) + i.escaped + 1
        + PyBytes_GET_SIZE(_SEQ) + digits.size + PyBytes_GET_SIZE(_EPOCH)
        + PyBytes_GET_SIZE(epoch) + PyBytes_GET_SIZE(_END)
    )
    cdef bytes out = PyBytes_FromStringAndSize(NULL, size)
    cdef char* p = PyBytes_AS_STRING(out)
    p = _put(p, _CHAT_ROOM)
    p = _put_escaped(p, &r)
    p = _put(p, _CHAT_USERNAME)
    p = _put_escaped(p, &u)
    p = _put(p, _CHAT_MESSAGE)
    p = _put_escaped(p, &m)
    p = _put(p, _CHAT_TIMESTAMP)
    p = _put_digits(p, &ts)
    p = _put(p, _CHAT_USER_ID)
    p = _put_escaped(p, &i)
    p[0] = 0x22
    p += 1
    p = _put(p, _SEQ)
    p = _put_digits(p, &digits)
    p = _put(p, _EPOCH)
    p = _put(p, epoch)
    _put(p, _END)
    return out


cdef object _ack_frame(object msg_id, long long seq):
    """``frame(encode(Ack(msg_id, seq)))`` for a str or int id and seq > 0; None if the
    id needs msgspec."""
    cdef Utf8 s
    cdef Digits digits, id_digits
    cdef bint id_is_str = type(msg_id) is str
    cdef Py_ssize_t id_size
    _digits(seq, &digits)
    if id_is_str:
        if not _utf8(<str>msg_id, &s):
            return None
        id_size = s.escaped + 2
    elif type(msg_id) is int and -(1 << 62) < msg_id < (1 << 62):
        _digits(<long long>msg_id, &id_digits)
        id_size = id_digits.size
    else:
        return None
    cdef Py_ssize_t size = (PyBytes_GET_SIZE(_ACK_ID) + id_size + PyBytes_GET_SIZE(_ACK_SEQ)
                            + digits.size + 1)
    if size >= 126:
        return None  # a long id: the two-byte length header is frame()'s
    cdef bytes out = PyBytes_FromStringAndSize(NULL, size + 2)
    cdef char* p = PyBytes_AS_STRING(out)
    p[0] = <char>0x81  # FIN, text
    p[1] = <char>size
    p = _put(p + 2, _ACK_ID)
    if id_is_str:
        p[0] = 0x22
        p = _put_escaped(p + 1, &s)
        p[0] = 0x22
        p += 1
    else:
        p = _put_digits(p, &id_digits)
    p = _put(p, _ACK_SEQ)
    p = _put_digits(p, &digits)
    p[0] = 0x7D
    return out


cdef inline bint _plain_edges(str text):
    """Whether ``text`` starts and ends with a non-space: then ``text.strip()`` is not empty
    (what else it holds the Python check need not see)."""
    cdef Py_ssize_t n = len(text)
    if n == 0:
        return False
    return not Py_UNICODE_ISSPACE(text[0]) and not Py_UNICODE_ISSPACE(text[n - 1])


# ---- the common chat_message read without msgspec ---------------------------------------
# What JavaScript's JSON.stringify sends: no whitespace, strings without escapes. Anything
# else (spaces, an escape, another key, a repeated key, a float id) is msgspec's to read.

cdef struct ChatScan:
    const char* room
    Py_ssize_t room_size
    const char* text
    Py_ssize_t text_size
    int id_kind          # 0: no id (or null), 1: an integer (id_value), 2: a string (id)
    long long id_value
    const char* id
    Py_ssize_t id_size


cdef inline bint _starts(const char* p, const char* end, const char* lit,
                         Py_ssize_t n) noexcept nogil:
    return end - p >= n and memcmp(p, lit, n) == 0


cdef inline const char* _plain_string(const char* p, const char* end, const char** start,
                                      Py_ssize_t* size) noexcept nogil:
    """``p`` at a string's opening quote: past its closing one if it holds no escape and no
    control character (its bytes are then its value), else NULL."""
    cdef unsigned char c
    if p >= end or p[0] != 0x22:
        return NULL
    p += 1
    start[0] = p
    while p < end:
        c = <unsigned char>p[0]
        if c == 0x22:
            size[0] = p - start[0]
            return p + 1
        if c == 0x5C or c < 0x20:
            return NULL
        p += 1
    return NULL


cdef inline const char* _scan_id(const char* p, const char* end,
                                 ChatScan* out) noexcept nogil:
    """The id's value: a plain string, null, or an integer of at most 18 digits (so within
    the ack's ±2^62) in JSON's form (no leading zero, no fraction, no exponent)."""
    cdef bint negative = False
    cdef long long v = 0
    cdef Py_ssize_t digits = 0
    if p < end and p[0] == 0x22:
        out.id_kind = 2
        return _plain_string(p, end, &out.id, &out.id_size)
    if _starts(p, end, "null", 4):
        out.id_kind = 0
        return p + 4
    if p < end and p[0] == 0x2D:
        negative = True
        p += 1
    while p < end and 0x30 <= p[0] <= 0x39:
        if digits == 18 or (digits == 1 and v == 0):
            return NULL
        v = v * 10 + (p[0] - 0x30)
        digits += 1
        p += 1
    if digits == 0:
        return NULL
    out.id_kind = 1
    out.id_value = -v if negative else v
    return p


cdef inline const char* _scan_payload(const char* p, const char* end,
                                      ChatScan* out) noexcept nogil:
    """``{"room":...,"message":...}`` (either order) with plain strings: past its brace."""
    cdef bint room = False, text = False
    while True:
        if not room and _starts(p, end, '"room":', 7):
            room = True
            p = _plain_string(p + 7, end, &out.room, &out.room_size)
        elif not text and _starts(p, end, '"message":', 10):
            text = True
            p = _plain_string(p + 10, end, &out.text, &out.text_size)
        else:
            return NULL
        if p == NULL or p >= end:
            return NULL
        if p[0] == 0x7D:
            return p + 1 if room and text else NULL
        if p[0] != 0x2C:
            return NULL
        p += 1


cdef bint _scan_chat(const char* p, Py_ssize_t n, ChatScan* out) noexcept nogil:
    """Whether ``p[:n]`` is a compact chat_message: ``type``, ``payload`` and an optional
    ``id``, in any order, each once. Its fields are then in ``out``."""
    cdef const char* end = p + n
    cdef bint kind = False, payload = False, msg_id = False
    out.id_kind = 0
    if n < 2 or p[0] != 0x7B:
        return False
    p += 1
    while True:
        if not kind and _starts(p, end, '"type":"chat_message"', 21):
            kind = True
            p += 21
        elif not payload and _starts(p, end, '"payload":{', 11):
            payload = True
            p = _scan_payload(p + 11, end, out)
        elif not msg_id and _starts(p, end, '"id":', 5):
            msg_id = True
            p = _scan_id(p + 5, end, out)
        else:
            return False
        if p == NULL or p >= end:
            return False
        if p[0] == 0x7D:
            return kind and payload and p + 1 == end
        if p[0] != 0x2C:
            return False
        p += 1


cdef inline Py_ssize_t _chars(const char* p, Py_ssize_t n) noexcept nogil:
    """Code points in ``n`` bytes of valid UTF-8 (those that do not continue one)."""
    cdef Py_ssize_t i, count = 0
    for i in range(n):
        if (<unsigned char>p[i] & 0xC0) != 0x80:
            count += 1
    return count


cdef inline Py_UCS4 _code_point(const char* p) noexcept nogil:
    """The code point whose valid UTF-8 starts at ``p``."""
    cdef unsigned char b = <unsigned char>p[0]
    if b < 0x80:
        return b
    if b < 0xE0:
        return ((b & 0x1F) << 6) | (p[1] & 0x3F)
    if b < 0xF0:
        return ((b & 0x0F) << 12) | ((p[1] & 0x3F) << 6) | (p[2] & 0x3F)
    return ((b & 0x07) << 18) | ((p[1] & 0x3F) << 12) | ((p[2] & 0x3F) << 6) | (p[3] & 0x3F)


cdef inline bint _plain_edges_utf8(const char* p, Py_ssize_t n):
    """``_plain_edges`` of ``n`` bytes of valid UTF-8."""
    if n == 0:
        return False
    cdef Py_ssize_t last = n - 1
    while last and (<unsigned char>p[last] & 0xC0) == 0x80:
        last -= 1
    return not Py_UNICODE_ISSPACE(_code_point(p)) and not Py_UNICODE_ISSPACE(_code_point(p + last))


cdef object _room_named(object rooms, const char* name, Py_ssize_t n):
    """The room of ``rooms`` (a session's) named by the UTF-8 ``name[:n]``, or None if it is
    not one. Among a few ASCII names it is found by comparing bytes: no str made, no hash."""
    cdef Py_ssize_t i
    if type(rooms) is not set:
        return None  # the shared empty frozenset: in no room
    if PySet_GET_SIZE(rooms) <= 8:
        for i in range(n):
            if <unsigned char>name[i] >= 0x80:
                break
        else:
            for room in <set>rooms:
                if (PyUnicode_IS_ASCII(room) and PyUnicode_GET_LENGTH(room) == n
                        and memcmp(PyUnicode_DATA(room), name, n) == 0):
                    return room
            return None
    room = PyUnicode_DecodeUTF8(<char*>name, n, NULL)
    return room if room in <set>rooms else None


cdef class ChatPath:
    """The common chat_message without a Python call per step: a whole text frame holding a
    valid chat from a member of its room is rate-checked, decoded, validated, given its seq,
    kept in history (the in-process broker's ledger), encoded once and handed to the
    fan-out; the answer (ack) follows. Anything else -- another type, a refusal, a pending
    action, a room with joiners waiting or fresh members -- goes to the Python path
    (``Session.handle`` and its steps, ``Node.deliver_slow``), which is the reference: the
    tests run the same cases over this and over ``_fanout_py.ChatPath``.

    With a remote broker the node side is compiled the same way: validation up to
    ``node.chat_now`` (which sends to the broker), and ``deliver`` for what comes back.
    """

    cdef object node
    cdef dict hub_rooms
    cdef readonly Outbox outbox
    cdef LedgerCore ledger      # the in-process broker's ledger, or None
    cdef dict ledger_rooms
    cdef bint post_rules
    cdef object decode
    cdef object chat_type
    cdef object head_type
    cdef object ack_type
    cdef object encode
    cdef object now
    cdef bint wall_clock             # now is time.time: read in C
    cdef object chat_now
    cdef Py_ssize_t max_chars
    cdef Py_ssize_t burst
    cdef bint rate_limited
    cdef public unsigned long long accepted   # chat messages taken from WebSockets
    cdef public unsigned long long published  # publications delivered to this node
    cdef public unsigned long long scanned    # of accepted, those read without msgspec

    def __init__(self, node, hub, LedgerCore ledger, protocol, clock_now):
        """``ledger``: the in-process broker's, whose rooms this path sequences itself (None
        for any other broker); ``protocol``: fastws.protocol; ``clock_now``: time.time."""
        settings = node.settings
        self.node = node
        self.hub_rooms = hub.rooms
        self.outbox = None
        self.ledger = ledger
        self.ledger_rooms = ledger.rooms if ledger is not None else None
        self.post_rules = bool(node.policy.post_rules)  # fixed by the settings
        self.decode = protocol.decode_valid
        self.chat_type = protocol.ChatMessage
        self.head_type = protocol._ChatWithoutSeq
        self.ack_type = protocol.Ack
        self.encode = protocol.encode
        self.now = clock_now
        self.wall_clock = clock_now is time.time
        self.chat_now = node.chat_now
        self.max_chars = settings.max_message_chars
        self.burst = settings.rate_burst
        self.rate_limited = settings.rate_limit > 0
        self.accepted = 0
        self.published = 0
        self.scanned = 0

    def start(self, Outbox outbox):
        """The loop's outbox, once it runs."""
        self.outbox = outbox

    def handle(self, SessionCore session, msg):
        """One whole client message of ``session``."""
        self._handle(session, msg)

    cdef int _handle_ascii(self, SessionCore session, const char* data,
                           Py_ssize_t n) except -1:
        """A whole text frame of ASCII, still in the Wire's buffer: a compact chat_message
        is read from it as is; anything else is made a str for ``_handle``."""
        cdef ChatScan scan
        bucket = session.bucket
        if (bucket is None and self.rate_limited) or session._task is not None:
            return self._handle(session, PyUnicode_DecodeASCII(data, n, NULL))
        if not _scan_chat(data, n, &scan):  # msgspec's to read: not scanned again
            return self._handle(session, PyUnicode_DecodeASCII(data, n, NULL), False)
        if bucket is not None and not _take(bucket):
            session.refuse()
            return 0
        session.rejected_in_row = 0
        return self._scanned(session, None, data, n, &scan)

    cdef int _handle(self, SessionCore session, msg, bint scan_it=True) except -1:
        """One whole message (str or bytes); ``scan_it`` False: ``_scan_chat`` already said
        it is not a compact chat_message."""
        bucket = session.bucket
        if bucket is None:
            if self.rate_limited:  # its first message makes the bucket
                session.handle(msg)
                return 0
        elif not _take(bucket):
            session.refuse()
            return 0
        session.rejected_in_row = 0
        if type(msg) is not str or session._task is not None:
            session.handle_admitted(msg)
            return 0
        cdef ChatScan scan
        cdef Py_ssize_t n
        cdef const char* data
        if PyUnicode_IS_ASCII(msg):
            data = <const char*>PyUnicode_DATA(msg)
            n = PyUnicode_GET_LENGTH(msg)
        else:
            data = PyUnicode_AsUTF8AndSize(msg, &n)  # kept by msg, as msgspec would make it
        if scan_it and _scan_chat(data, n, &scan):
            return self._scanned(session, msg, data, n, &scan)
        try:
            m = self.decode(msg)
        except Exception:  # its error reply is the Python path's to word
            session.handle_admitted(msg)
            return 0
        if type(m) is not self.chat_type:
            session.act(m)
            return 0
        payload = m.payload
        cdef str room = payload.room
        cdef str text = payload.message
        if (
            room not in session.rooms
            or self.post_rules
            or len(text) > self.max_chars
            or not _plain_edges(text)
        ):
            session.act(m)  # the refusal, or the full check of the text
            return 0
        if self.ledger is None:
            if self.chat_now is None or session.in_flight >= self.burst:
                session.act(m)
            else:
                self.chat_now(session, room, text, m.id)
            return 0
        cdef Utf8 utf8
        if not _utf8(text, &utf8):
            utf8.data = NULL  # a control character: msgspec writes its escape
        self._chat(session, room, &utf8, text, m.id)
        return 0

    cdef int _full(self, SessionCore session, object msg, const char* data,
                   Py_ssize_t n) except -1:
        """A scanned chat_message the Python path decides on, decoded by msgspec (``msg``
        None: made from the ASCII ``data[:n]`` first)."""
        if msg is None:
            msg = PyUnicode_DecodeASCII(data, n, NULL)
        try:
            m = self.decode(msg)
        except Exception:
            session.handle_admitted(msg)
            return 0
        session.act(m)
        return 0

    cdef int _scanned(self, SessionCore session, object msg, const char* data, Py_ssize_t n,
                      ChatScan* scan) except -1:
        """``_handle``'s checks on a chat_message read by ``_scan_chat`` from ``data[:n]``
        (``msg``: the same as a str, or None if it came as ASCII bytes): the text is still
        the message's UTF-8, with nothing to escape."""
        cdef object room = _room_named(session.rooms, scan.room, scan.room_size)
        if room is None or self.post_rules or (
            _chars(scan.text, scan.text_size) > self.max_chars
            or not _plain_edges_utf8(scan.text, scan.text_size)
        ):
            return self._full(session, msg, data, n)  # the refusal, or the full check
        cdef object msg_id = None
        if scan.id_kind == 1:
            msg_id = scan.id_value
        elif scan.id_kind == 2:
            msg_id = PyUnicode_DecodeUTF8(<char*>scan.id, scan.id_size, NULL)
        if self.ledger is None:
            if self.chat_now is None or session.in_flight >= self.burst:
                return self._full(session, msg, data, n)
            text = PyUnicode_DecodeUTF8(<char*>scan.text, scan.text_size, NULL)
            self.scanned += 1
            self.chat_now(session, <str>room, text, msg_id)
            return 0
        cdef Utf8 utf8
        utf8.data = scan.text
        utf8.size = scan.text_size
        utf8.escaped = scan.text_size
        self.scanned += 1
        self._chat(session, <str>room, &utf8, None, msg_id)
        return 0

    cdef int _chat(self, SessionCore session, str room, Utf8* text, object text_str,
                   msg_id) except -1:
        """``Node._chat_now`` and ``MemoryBroker.publish_seq_nowait`` on the ledger's
        common case: sequenced, kept, delivered, then acked. ``text``: the text as UTF-8
        (``data`` NULL if only msgspec may write it), ``text_str`` the same as a str or None."""
        cdef double now = _clock(CLOCK_REALTIME) if self.wall_clock else self.now()
        cdef long long timestamp = <long long>(now * 1000)
        cdef object lroom = self.ledger_rooms.get(room)
        cdef long long seq
        cdef object published = None
        self.accepted += 1
        if lroom is not None and text.data != NULL:
            seq = (<LedgerRoom>lroom).seq + 1
            published = _chat_payload(room, session.username, text, timestamp, session.user_id, seq,
                                      (<LedgerRoom>lroom).epoch_bytes)
        if published is not None:
            self.ledger._commit(room, <LedgerRoom>lroom, seq, <bytes>published)
        else:  # a new room, or a text msgspec escapes
            if text_str is None:
                text_str = PyUnicode_DecodeUTF8(<char*>text.data, text.size, NULL)
            body = self.encode(
                self.head_type(room, session.username, text_str, timestamp, session.user_id)
            )
            if lroom is None:  # the ledger makes the room
                seq, published = self.ledger.publish_seq(
                    room, body[:PyBytes_GET_SIZE(body) - 1] + _SEQ
                )
            else:
                published = self.ledger._publish(room, <LedgerRoom>lroom, body)
                seq = (<LedgerRoom>lroom).seq
        self._deliver(room, "", <bytes>published, seq)
        if msg_id is not None:
            ack = _ack_frame(msg_id, seq)
            if ack is None:
                ack = frame(self.encode(self.ack_type(msg_id, seq)))
            self.outbox.send(<Sink>session.sink, <bytes>ack)
        return 0

    def deliver(self, str room, str exclude, bytes payload, long long seq=0):
        """Broker callback: one publication for ``room``, framed once for its local members."""
        return self._deliver(room, exclude, payload, seq)

    cdef Py_ssize_t _deliver(self, str room, str exclude, bytes payload,
                             long long seq) except -1:
        self.published += 1
        cdef RoomCore hroom = self.hub_rooms.get(room)
        if (hroom is None or seq <= 0 or exclude or hroom.pending or hroom.fresh
                or self.outbox is None):
            return self.node.deliver_slow(room, exclude, payload, seq)
        return self.outbox._broadcast_text(hroom.sinks, payload)


cdef bytes _sequenced(bytes body, long long seq, bytes epoch):
    """``broker.types.chat_payload`` from the encoded body (its closing brace dropped)."""
    cdef bytes digits = str(seq).encode()
    cdef Py_ssize_t nb = PyBytes_GET_SIZE(body) - 1
    cdef Py_ssize_t nd = PyBytes_GET_SIZE(digits)
    cdef Py_ssize_t ne = PyBytes_GET_SIZE(epoch)
    cdef Py_ssize_t ns = PyBytes_GET_SIZE(_SEQ)
    cdef Py_ssize_t np = PyBytes_GET_SIZE(_EPOCH)
    cdef Py_ssize_t nz = PyBytes_GET_SIZE(_END)
    cdef bytes out = PyBytes_FromStringAndSize(NULL, nb + ns + nd + np + ne + nz)
    cdef char* p = PyBytes_AS_STRING(out)
    memcpy(p, PyBytes_AS_STRING(body), nb)
    p += nb
    memcpy(p, PyBytes_AS_STRING(_SEQ), ns)
    p += ns
    memcpy(p, PyBytes_AS_STRING(digits), nd)
    p += nd
    memcpy(p, PyBytes_AS_STRING(_EPOCH), np)
    p += np
    memcpy(p, PyBytes_AS_STRING(epoch), ne)
    p += ne
    memcpy(p, PyBytes_AS_STRING(_END), nz)
    return out


cdef class Listener(MessageListener):
    """The message side of a connection's Wire listener (``transport.Connection`` adds the
    rest): each whole message goes to the node's ``ChatPath``, then the peer's own replies
    leave if its read batch is over. The Wire calls ``message`` in C."""

    cdef public SessionCore session
    cdef public ChatPath chat

    def on_message(self, msg):
        self.message(msg)

    cdef int message(self, object msg) except -1:
        return self._pass_on(msg, NULL, 0)

    cdef int ascii_text(self, const char* data, Py_ssize_t n) except -1:
        return self._pass_on(None, data, n)

    cdef int _pass_on(self, object msg, const char* data, Py_ssize_t n) except -1:
        """``msg`` (or, if None, the ASCII ``data[:n]``) to the chat path; the turn's flush
        is the outbox's to schedule after it."""
        cdef SessionCore session = self.session
        if session is None:
            return 0
        cdef Outbox outbox = self.chat.outbox
        cdef bint was_in_message = outbox._in_message
        outbox._in_message = True
        try:
            if msg is None:
                self.chat._handle_ascii(session, data, n)
            else:
                self.chat._handle(session, msg)
        finally:
            outbox._message_done(session.sink, was_in_message)
        return 0
