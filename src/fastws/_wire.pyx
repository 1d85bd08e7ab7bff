# cython: language_level=3
"""The server side of RFC 6455 on a uvloop transport: the upgrade, frames in, control frames out.

A ``Wire`` is one connection's asyncio buffered protocol. An idle connection holds no buffer:
every read lands in one buffer shared by all of a server's connections (reads are handled one
at a time by the loop), and only what is left of an incomplete frame, or of a request head,
is copied to a buffer of the connection's own, freed again once it is consumed.

The request head goes to ``route`` (Python, once per connection); after that, whole messages
go to the listener's ``on_message`` (``str`` for text, ``bytes`` for binary), reassembled from
fragments and checked (masking, opcodes, lengths, UTF-8, close codes) here. Pings are answered
and closes echoed here. A protocol violation sends its close code and drops the connection.
"""

import asyncio
import codecs
import logging

from cpython.buffer cimport PyBUF_WRITE
from cpython.bytearray cimport PyByteArray_GET_SIZE
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.list cimport PyList_GET_ITEM, PyList_GET_SIZE
from cpython.memoryview cimport PyMemoryView_FromMemory
from cpython.unicode cimport PyUnicode_DecodeASCII, PyUnicode_DecodeUTF8
from libc.stdint cimport uint8_t, uint64_t
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memcpy, memmove


cdef extern from "<time.h>" nogil:
    ctypedef long time_t
    cdef struct timespec:
        time_t tv_sec
        long tv_nsec
    int clock_gettime(int clk_id, timespec* tp)
    int CLOCK_MONOTONIC


log = logging.getLogger("fastws.wire")

cdef enum:
    HEAD_LIMIT = 16384     # a request head past this is dropped (picows' cap too)
    SHARED_SIZE = 262144   # one read's worth, for all connections of a server
    MIN_OWN = 1024         # the smallest buffer an incomplete frame gets

cdef double FAIL_LINGER = 1.0  # after a protocol error, the peer has this long to close

# Close codes a peer may send (RFC 6455 section 7.4.1 and the IANA registry).
cdef inline bint _valid_close_code(int code) noexcept:
    return (1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999)


cdef inline double _monotonic() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return ts.tv_sec + ts.tv_nsec * 1e-9


cdef bytes _PING = b"\x89\x00"  # an empty protocol ping


cdef Py_ssize_t frame_header(uint8_t* p, Py_ssize_t size, int opcode) noexcept:
    """Write the header of an unmasked final frame of ``size`` payload bytes at ``p`` (room
    for 10); return its length."""
    cdef int i
    p[0] = 0x80 | (opcode & 0x0F)
    if size < 126:
        p[1] = <uint8_t>size
        return 2
    if size < 65536:
        p[1] = 126
        p[2] = <uint8_t>(size >> 8)
        p[3] = <uint8_t>size
        return 4
    p[1] = 127
    for i in range(8):
        p[2 + i] = <uint8_t>(size >> (56 - 8 * i))
    return 10


cpdef bytes frame(bytes payload, int opcode=1):
    """Return one unmasked, final server-to-client frame holding ``payload``.

    ``opcode`` is 1 (text) by default, 2 for binary (RFC 6455 section 5.2).
    The result is immutable and can be handed to any number of sinks.
    """
    cdef uint8_t head[10]
    cdef Py_ssize_t size = PyBytes_GET_SIZE(payload)
    cdef Py_ssize_t header = frame_header(head, size, opcode)
    cdef bytes out = PyBytes_FromStringAndSize(NULL, header + size)
    cdef uint8_t* p = <uint8_t*>PyBytes_AS_STRING(out)
    memcpy(p, head, header)
    memcpy(p + header, PyBytes_AS_STRING(payload), size)
    return out


cdef inline void _unmask(uint8_t* p, Py_ssize_t n, const uint8_t* key) noexcept nogil:
    cdef uint64_t k8
    cdef uint64_t w
    cdef Py_ssize_t i = 0
    cdef uint8_t* kb = <uint8_t*>&k8
    for i in range(8):
        kb[i] = key[i & 3]
    i = 0
    while i + 8 <= n:
        memcpy(&w, p + i, 8)
        w ^= k8
        memcpy(p + i, &w, 8)
        i += 8
    while i < n:
        p[i] ^= key[i & 3]
        i += 1


cdef inline bint _is_ascii(const char* p, Py_ssize_t n) noexcept nogil:
    cdef uint64_t w, seen = 0
    cdef Py_ssize_t i = 0
    while i + 8 <= n:
        memcpy(&w, p + i, 8)
        seen |= w
        i += 8
    while i < n:
        seen |= <uint8_t>p[i]
        i += 1
    return (seen & 0x8080808080808080ULL) == 0


cdef class WireServer:
    """What every ``Wire`` of one listening socket shares; it is also their protocol factory.

    ``route(head)`` gets each request head (bytes, up to the blank line) and returns either the
    bytes of a whole HTTP response (the connection is closed after it) or ``(listener,
    response)``: the 101 response to send, and the listener that gets ``on_connected(wire)``,
    ``on_message(msg)``, ``before_close()``, ``on_disconnected()``, ``pause_writing()`` and
    ``resume_writing()``.
    """

    def __cinit__(self, route, double handshake_timeout, Py_ssize_t max_message):
        self.route = route
        self.call_later = asyncio.get_running_loop().call_later
        self.handshake_timeout = handshake_timeout
        self.max_message = max_message
        self.shared = <char*>malloc(SHARED_SIZE)
        if self.shared == NULL:
            raise MemoryError()
        self.shared_view = PyMemoryView_FromMemory(self.shared, SHARED_SIZE, PyBUF_WRITE)
        self.failures = 0
        self.upgraded = []

    def __dealloc__(self):
        # Only once no Wire can read into it: each Wire holds a reference to its server.
        free(self.shared)

    def __call__(self):
        return Wire(self)

    cdef int _enlist(self, Wire w) except -1:
        w.slot = PyList_GET_SIZE(self.upgraded)
        self.upgraded.append(w)
        return 0

    cdef int _unlist(self, Wire w) except -1:
        # Swap-remove: the last Wire takes the leaving one's slot.
        cdef Py_ssize_t last = PyList_GET_SIZE(self.upgraded) - 1
        cdef Wire moved
        if w.slot < 0:
            return 0
        moved = <Wire>self.upgraded[last]
        self.upgraded[w.slot] = moved
        moved.slot = w.slot
        del self.upgraded[last]
        w.slot = -1
        return 0

    def sweep(self, double now, double interval, double timeout, bint ping):
        """The heartbeat's round over every upgraded connection, in C: a Wire whose peer sent
        nothing for ``interval`` seconds is pinged (by protocol PING here when ``ping``, else
        it is returned to be pinged by the caller, who then calls ``pinged``); one that then
        stays silent ``timeout`` seconds past its ping is returned as dead. Returns (to_ping,
        dead); ``interval`` <= 0 pings nobody."""
        cdef list wires = self.upgraded
        cdef Py_ssize_t i, n = PyList_GET_SIZE(wires)
        cdef list due = []
        cdef list dead = []
        cdef Wire w
        if interval <= 0:
            return due, dead
        for i in range(n):
            w = <Wire>PyList_GET_ITEM(wires, i)
            if w.close_sent_code or w.is_disconnected:
                continue
            if w.ping_sent_at:
                if w.last_rx >= w.ping_sent_at:
                    w.ping_sent_at = 0
                elif now - w.ping_sent_at > timeout:
                    dead.append(w)
                continue
            if now - w.last_rx >= interval:
                w.ping_sent_at = now
                if ping:
                    w._write(_PING)
                else:
                    due.append(w)
        return due, dead


def protocol_factory(WireServer server):
    """What ``loop.create_server`` takes: ``server`` itself on uvloop, which reads into a
    Wire's buffers directly; on the plain asyncio loop, which treats only Python subclasses
    of ``BufferedProtocol`` as buffered, each Wire behind an ``AsyncioWire``."""
    loop = asyncio.get_running_loop()
    if type(loop).__module__.startswith("uvloop"):
        return server
    return lambda: AsyncioWire(Wire(server))


class AsyncioWire(asyncio.BufferedProtocol):
    """A Wire as the plain asyncio loop's buffered protocol (tests run on both loops)."""

    __slots__ = ("wire",)

    def __init__(self, wire):
        self.wire = wire

    def connection_made(self, transport):
        self.wire.connection_made(transport)

    def connection_lost(self, exc):
        self.wire.connection_lost(exc)

    def eof_received(self):
        return self.wire.eof_received()

    def pause_writing(self):
        self.wire.pause_writing()

    def resume_writing(self):
        self.wire.resume_writing()

    def get_buffer(self, sizehint):
        return self.wire.get_buffer(sizehint)

    def buffer_updated(self, nbytes):
        self.wire.buffer_updated(nbytes)


cdef class MessageListener:
    """The base of a listener the Wire calls in C (``_fanout.Listener``)."""

    cdef int message(self, object msg) except -1:
        self.on_message(msg)
        return 0

    cdef int ascii_text(self, const char* data, Py_ssize_t n) except -1:
        """A whole text message that is all ASCII (so valid UTF-8), read from the Wire's
        buffer in place; valid only during the call."""
        return self.message(PyUnicode_DecodeASCII(data, n, NULL))


cdef class Wire:
    """One connection: an ``asyncio.BufferedProtocol`` that speaks the server side of RFC 6455."""

    def __cinit__(self, WireServer server):
        self.server = server
        self.buf = NULL
        self.size = 0
        self.capacity = 0
        self.need = 0
        self.state = HANDSHAKE
        self.fd = -1
        self.close_sent_code = 0
        self.close_recv_code = 0
        self.last_rx = _monotonic()
        self.ping_sent_at = 0
        self.slot = -1
        self.wrote = False

    def __dealloc__(self):
        free(self.buf)

    # ---- asyncio protocol ---------------------------------------------------------------

    def connection_made(self, transport):
        self.server.open += 1
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            self.fd = sock.fileno()
        if self.server.handshake_timeout > 0:
            self.timer = self.server.call_later(self.server.handshake_timeout,
                                                self._handshake_timed_out)

    def _handshake_timed_out(self):
        self.timer = None
        if self.state == HANDSHAKE:
            self.transport.abort()

    def connection_lost(self, exc):
        if self.state == CLOSED:
            return
        self.server.open -= 1
        self.server._unlist(self)
        self.state = CLOSED
        self.is_disconnected = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self._drop_buffer()
        self.frags = None
        self.utf8 = None
        self._end_listener()

    def eof_received(self):
        return False  # the transport closes itself

    def pause_writing(self):
        if self.listener is not None:
            self.listener.pause_writing()

    def resume_writing(self):
        if self.listener is not None:
            self.listener.resume_writing()

    def get_buffer(self, Py_ssize_t sizehint):
        cdef Py_ssize_t want
        if self.size == 0:
            self.reading_shared = True
            return self.server.shared_view
        self.reading_shared = False
        want = self.need if self.need > self.size else self.size + MIN_OWN
        if want - self.size < MIN_OWN:
            want = self.size + MIN_OWN
        if want > self.capacity:
            self._grow(want)
        return PyMemoryView_FromMemory(self.buf + self.size, self.capacity - self.size,
                                       PyBUF_WRITE)

    def buffer_updated(self, Py_ssize_t nbytes):
        cdef char* data
        cdef Py_ssize_t end, used, left
        if self.state == CLOSED or self.state == FAILED:
            self._drop_buffer()
            return
        self.last_rx = _monotonic()
        if self.reading_shared:
            data = self.server.shared
            end = nbytes
        else:
            self.size += nbytes
            data = self.buf
            end = self.size
        used = self._process(data, end)
        if self.state == CLOSED or self.state == FAILED:
            self._drop_buffer()
            return
        left = end - used
        if left == 0:
            self._drop_buffer()
        elif self.reading_shared:
            self._grow(left if left > self.need else self.need)
            memcpy(self.buf, data + used, left)
            self.size = left
        elif used:
            memmove(self.buf, self.buf + used, left)
            self.size = left

    # ---- what the server calls ----------------------------------------------------------

    cpdef send_close(self, int code, bytes reason=b""):
        """Send a close frame (once); the socket stays open for the peer's answer."""
        if self.is_disconnected or self.close_sent_code:
            return
        cdef bytes payload = bytes([code >> 8, code & 0xFF]) + reason[:123]
        self.close_sent_code = code
        self._write(frame(payload, 0x8))
        if self.state == OPEN or self.state == HANDSHAKE:
            self.state = CLOSING

    cpdef send_ping(self, bytes payload=b""):
        if not self.is_disconnected and not self.close_sent_code:
            self._write(frame(payload[:125], 0x9))

    cpdef send_pong(self, bytes payload=b""):
        if not self.is_disconnected and not self.close_sent_code:
            self._write(frame(payload[:125], 0xA))

    cdef int _write(self, bytes data) except -1:
        """Every write through the uvloop transport: only after one may it hold bytes, so
        the fan-out asks for its buffer size only then (``Wire.wrote``)."""
        self.wrote = True
        self.transport.write(data)
        return 0

    cpdef disconnect(self, bint graceful=True):
        """Close the socket: after what is buffered (``graceful``), or at once."""
        if self.is_disconnected:
            return
        if graceful:
            self.transport.close()
        else:
            self.transport.abort()

    def pause_reading(self):
        """Stop reading the socket (backpressure from a full broker); a closing one is left."""
        if not self.is_disconnected and not self.transport.is_closing():
            self.transport.pause_reading()

    def resume_reading(self):
        if not self.is_disconnected and not self.transport.is_closing():
            self.transport.resume_reading()

    @property
    def is_close_frame_sent(self):
        return self.close_sent_code != 0

    @property
    def close_code(self):
        """The close code this connection ended with (ours if we sent one), or None."""
        if self.close_sent_code:
            return self.close_sent_code
        return self.close_recv_code or None

    @property
    def pending_bytes(self):
        """Bytes of an incomplete frame (or request head) held by this connection."""
        return self.size

    @property
    def buffer_capacity(self):
        return self.capacity

    # ---- internals ----------------------------------------------------------------------

    cdef void _drop_buffer(self) noexcept:
        if self.buf != NULL:
            free(self.buf)
            self.buf = NULL
        self.size = 0
        self.capacity = 0
        self.need = 0

    cdef int _grow(self, Py_ssize_t want) except -1:
        cdef Py_ssize_t cap = self.capacity if self.capacity else MIN_OWN
        cdef char* grown
        while cap < want:
            cap *= 2
        if cap == self.capacity:
            return 0
        grown = <char*>realloc(self.buf, cap)
        if grown == NULL:
            raise MemoryError()
        self.buf = grown
        self.capacity = cap
        return 0

    cdef Py_ssize_t _process(self, char* data, Py_ssize_t end) except -1:
        """Handle what ``data[:end]`` holds; returns how many bytes were consumed."""
        cdef Py_ssize_t pos = 0
        if self.state == HANDSHAKE:
            pos = self._handshake(data, end)
            if self.state == HANDSHAKE:
                return pos
        while pos < end and (self.state == OPEN or self.state == CLOSING):
            used = self._frame(data, pos, end)
            if used == 0:
                break
            pos += used
        return pos

    cdef Py_ssize_t _handshake(self, char* data, Py_ssize_t end) except -1:
        cdef Py_ssize_t i
        cdef Py_ssize_t stop = -1
        for i in range(3, end):
            if data[i] == b'\n' and data[i - 1] == b'\r' and data[i - 2] == b'\n' \
                    and data[i - 3] == b'\r':
                stop = i + 1
                break
        if stop < 0:
            if end >= HEAD_LIMIT:
                self.state = FAILED
                self.transport.abort()
                return end
            self.need = end + MIN_OWN
            return 0
        if stop - 4 >= HEAD_LIMIT:
            self.state = FAILED
            self.transport.abort()
            return end
        head = PyBytes_FromStringAndSize(data, stop - 4)
        try:
            outcome = self.server.route(head)
        except Exception:
            log.exception("request routing failed")
            outcome = (b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n"
                       b"Connection: close\r\n\r\n")
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if isinstance(outcome, bytes):
            self.state = FAILED
            self._write(outcome)
            self.transport.close()
            return end
        listener, response = outcome
        self._write(response)
        self.listener = listener
        self.state = OPEN
        self.server._enlist(self)
        self.need = 0
        try:
            listener.on_connected(self)
        except Exception:
            self.server.failures += 1
            log.exception("connection setup failed; closing it")
            self._fail(1011, b"internal error")
            return end
        return stop

    cdef Py_ssize_t _frame(self, char* data, Py_ssize_t pos, Py_ssize_t end) except -1:
        """Handle the frame at ``data[pos:]``: its size, or 0 if it is not all here yet."""
        cdef Py_ssize_t avail = end - pos
        cdef uint8_t* p = <uint8_t*>data + pos
        cdef uint8_t b0, b1, opcode, len7
        cdef Py_ssize_t ext, head, plen, total
        cdef int i
        if avail < 2:
            self.need = 2
            return 0
        b0 = p[0]
        b1 = p[1]
        opcode = b0 & 0x0F
        len7 = b1 & 0x7F
        # Judged from the first two bytes, before any payload arrives.
        if b0 & 0x70:
            return self._fail(1002, b"reserved bits set")
        if (3 <= opcode <= 7) or opcode >= 11:
            return self._fail(1002, b"reserved opcode")
        if opcode >= 8 and (not (b0 & 0x80) or len7 > 125):
            return self._fail(1002, b"bad control frame")
        if not (b1 & 0x80):
            return self._fail(1002, b"unmasked frame")  # section 5.1
        ext = 2 if len7 == 126 else (8 if len7 == 127 else 0)
        head = 2 + ext + 4
        if avail < 2 + ext:
            self.need = head
            return 0
        if len7 == 126:
            plen = (p[2] << 8) | p[3]
            if plen < 126:
                return self._fail(1002, b"non-minimal length")
        elif len7 == 127:
            if p[2] & 0x80:
                return self._fail(1002, b"length out of range")
            plen = 0
            for i in range(8):
                plen = (plen << 8) | p[2 + i]
            if plen < 65536:
                return self._fail(1002, b"non-minimal length")
        else:
            plen = len7
        if plen > self.server.max_message or (
                opcode == 0 and self.frags is not None
                and PyByteArray_GET_SIZE(self.frags) + plen > self.server.max_message):
            return self._fail(1009, b"message too big")
        total = head + plen
        if avail < total:
            self.need = total
            return 0
        self.need = 0
        _unmask(p + head, plen, p + 2 + ext)
        self.last_in_batch = not self._complete_at(data, pos + total, end)
        self._dispatch(opcode, b0 & 0x80, <char*>p + head, plen)
        return total

    cdef bint _complete_at(self, char* data, Py_ssize_t pos, Py_ssize_t end) noexcept:
        """Whether a whole frame starts at ``pos`` (so the current one is not the batch's last)."""
        cdef Py_ssize_t avail = end - pos
        cdef uint8_t* p = <uint8_t*>data + pos
        cdef Py_ssize_t ext, plen
        cdef int i
        if avail < 2:
            return False
        ext = 2 if (p[1] & 0x7F) == 126 else (8 if (p[1] & 0x7F) == 127 else 0)
        if avail < 2 + ext:
            return False
        if ext == 2:
            plen = (p[2] << 8) | p[3]
        elif ext == 8:
            plen = 0
            for i in range(8):
                plen = (plen << 8) | p[2 + i]
        else:
            plen = p[1] & 0x7F
        return avail >= 2 + ext + 4 + plen

    cdef int _dispatch(self, uint8_t opcode, bint fin, char* payload, Py_ssize_t n) except -1:
        cdef int code
        if self.close_sent_code:
            # After our close nothing more is acted on (section 5.5.1): the peer's answering
            # close ends it; what it sent meanwhile is dropped, not half-served.
            if opcode == 0x8:
                self.close_recv_code = self.close_recv_code or 1000
                self.disconnect()
            return 0
        if opcode == 0x1 or opcode == 0x2:
            if self.frags is not None:
                self._fail(1002, b"new message inside a fragmented one")
                return 0
            if fin:
                if opcode == 0x1:
                    if isinstance(self.listener, MessageListener) and _is_ascii(payload, n):
                        return self._deliver_ascii(payload, n)
                    try:
                        msg = PyUnicode_DecodeUTF8(payload, n, NULL)
                    except UnicodeDecodeError:
                        self._fail(1007, b"invalid UTF-8")  # section 8.1
                        return 0
                else:
                    msg = PyBytes_FromStringAndSize(payload, n)
                self._deliver(msg)
                return 0
            self.frag_text = opcode == 0x1
            self.frags = bytearray()
            if self.frag_text:
                self.utf8 = codecs.getincrementaldecoder("utf-8")()
            self._append(payload, n, False)
        elif opcode == 0x0:
            if self.frags is None:
                self._fail(1002, b"continuation without a start")
                return 0
            if not self._append(payload, n, fin):
                return 0
            if fin:
                data = bytes(self.frags)
                self.frags = None
                self.utf8 = None
                self._deliver(data.decode("utf-8") if self.frag_text else data)
        elif opcode == 0x9:
            self._write(frame(PyBytes_FromStringAndSize(payload, n), 0xA))
        elif opcode == 0x8:
            if n == 1:
                self._fail(1002, b"close payload of one byte")
                return 0
            code = 1000
            if n >= 2:
                code = ((<uint8_t>payload[0]) << 8) | (<uint8_t>payload[1])
                if not _valid_close_code(code):
                    self._fail(1002, b"invalid close code")
                    return 0
                try:
                    PyUnicode_DecodeUTF8(payload + 2, n - 2, NULL)
                except UnicodeDecodeError:
                    self._fail(1007, b"invalid UTF-8 in the close reason")
                    return 0
            self.close_recv_code = code
            self._before_close()
            self.send_close(code)
            self.disconnect()
        # An unsolicited pong is ignored (section 5.5.3); the read already proved liveness.
        return 0

    cdef bint _append(self, char* payload, Py_ssize_t n, bint fin) except -1:
        chunk = PyBytes_FromStringAndSize(payload, n)
        if self.utf8 is not None:
            try:
                # Fail fast: invalid UTF-8 closes at the fragment that has it (section 8.1).
                self.utf8.decode(chunk, fin)
            except UnicodeDecodeError:
                self._fail(1007, b"invalid UTF-8")
                return False
        self.frags += chunk
        return True

    cdef int _deliver_ascii(self, char* data, Py_ssize_t n) except -1:
        try:
            (<MessageListener>self.listener).ascii_text(data, n)
        except Exception:
            self._handler_failed()
        return 0

    cdef int _handler_failed(self) except -1:
        """The listener raised (a server bug): counted, logged, the connection closed 1011."""
        self.server.failures += 1
        log.exception("message handler failed; closing the connection")
        self._fail(1011, b"internal error")
        return 0

    cdef int _deliver(self, msg) except -1:
        cdef object listener = self.listener
        try:
            if isinstance(listener, MessageListener):
                (<MessageListener>listener).message(msg)
            else:
                listener.on_message(msg)
        except Exception:
            self._handler_failed()
        return 0

    cdef int _end_listener(self) except -1:
        """The connection is over for the listener (set only once upgraded): told once."""
        cdef object listener = self.listener
        self.listener = None
        if listener is not None:
            listener.on_disconnected()
        return 0

    cdef int _before_close(self) except -1:
        if self.listener is not None:
            try:
                self.listener.before_close()  # what was queued goes before the close frame
            except Exception:
                log.exception("before_close failed")
        return 0

    cdef Py_ssize_t _fail(self, int code, bytes reason) except -1:
        """A protocol violation: its close code goes out and our side of the socket is shut.

        The listener is told at once. What the peer still sends is read and dropped until it
        closes (or ``FAIL_LINGER`` passes): closing at once would answer its next write with a
        reset, which destroys the close frame still unread in its receive buffer.
        """
        if self.state == FAILED or self.state == CLOSED:
            return 0
        if self.state != HANDSHAKE:
            self._before_close()
            self.send_close(code, reason)
        self.state = FAILED
        self.frags = None
        self.utf8 = None
        self._end_listener()  # the session ends now; only the socket lingers
        try:
            self.transport.write_eof()
        except (OSError, RuntimeError, NotImplementedError):
            self.transport.abort()
            return 0
        if self.timer is not None:
            self.timer.cancel()
        self.timer = self.server.call_later(FAIL_LINGER, self.transport.abort)
        return 0
