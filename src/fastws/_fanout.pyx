# cython: language_level=3
"""The hot path: write one already-encoded WebSocket frame to many transports.

Nothing here decides policy (no logging, config or asyncio): the hub calls
``frame()`` once per publication, ``broadcast()`` once per room, and acts on
the slow consumers that ``broadcast()`` reports.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.list cimport PyList_GET_ITEM, PyList_GET_SIZE
from libc.stdint cimport uint8_t
from libc.string cimport memcpy
from picows.picows cimport WSTransport


cdef extern from "<sys/socket.h>" nogil:
    ssize_t send(int fd, const void* buf, size_t n, int flags)
    int MSG_NOSIGNAL


cpdef bytes frame(bytes payload, int opcode=1):
    """Return one unmasked, final server-to-client frame holding ``payload``.

    ``opcode`` is 1 (text) by default, 2 for binary (RFC 6455 section 5.2).
    The result is immutable and can be handed to any number of transports.
    """
    cdef Py_ssize_t size = PyBytes_GET_SIZE(payload)
    cdef Py_ssize_t header = 2 if size < 126 else (4 if size < 65536 else 10)
    cdef bytes out = PyBytes_FromStringAndSize(NULL, header + size)
    cdef uint8_t* p = <uint8_t*>PyBytes_AS_STRING(out)
    cdef int i
    p[0] = 0x80 | (opcode & 0x0F)
    if size < 126:
        p[1] = <uint8_t>size
    elif size < 65536:
        p[1] = 126
        p[2] = <uint8_t>(size >> 8)
        p[3] = <uint8_t>size
    else:
        p[1] = 127
        for i in range(8):
            p[2 + i] = <uint8_t>(size >> (56 - 8 * i))
    memcpy(p + header, PyBytes_AS_STRING(payload), size)
    return out


cdef inline void _write(WSTransport t, bytes data, const char* ptr, Py_ssize_t size,
                        Py_ssize_t buffered) except *:
    """Write ``data`` to ``t``: straight to the socket when nothing is queued in front."""
    cdef ssize_t sent = 0
    if buffered == 0 and not t.is_secure:
        sent = send(t._socket, ptr, <size_t>size, MSG_NOSIGNAL)
        if sent == size:
            return
        if sent > 0:
            # Queue only the unsent tail; the transport flushes it when writable.
            t._tr_write(PyBytes_FromStringAndSize(ptr + sent, size - sent))
            return
    # EAGAIN, or an error the transport should meet itself and report as connection_lost.
    t._tr_write(data)


def broadcast(list transports, bytes data, Py_ssize_t max_buffered, object exclude=None):
    """Write the frame ``data`` to every transport in ``transports``.

    Returns ``(delivered, slow)``: how many transports were given the frame,
    and a list (usually empty) of transports whose unsent output was already
    over ``max_buffered`` bytes. Those were *not* written to; the caller must
    close them, since a slow consumer is never allowed to grow memory.

    Skipped without counting: ``exclude`` (compared by identity), transports
    that already sent a CLOSE frame or are disconnected. One bad recipient never
    raises or stops the loop: a socket error is handed to its transport, which
    reports the disconnect through its listener later.
    """
    cdef Py_ssize_t n = PyList_GET_SIZE(transports)
    cdef Py_ssize_t i, buffered
    cdef Py_ssize_t delivered = 0
    cdef const char* ptr = PyBytes_AS_STRING(data)
    cdef Py_ssize_t size = PyBytes_GET_SIZE(data)
    cdef WSTransport t
    cdef list slow = None
    for i in range(n):
        t = <WSTransport>PyList_GET_ITEM(transports, i)
        if <object>t is exclude or t.is_close_frame_sent or t.is_disconnected:
            continue
        buffered = t._tr_get_write_buffer_size()
        if buffered > max_buffered:
            if slow is None:
                slow = []
            slow.append(t)
            continue
        try:
            _write(t, data, ptr, size, buffered)
            delivered += 1
        except Exception:
            # A transport that refuses writes is closing; its listener reports it.
            pass
    return delivered, (slow if slow is not None else [])
