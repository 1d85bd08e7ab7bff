# cython: language_level=3
"""The server side of RFC 6455 on a socket of its own: accept, the upgrade, frames in and out.

The connections' sockets are in an epoll set of the server's own; the loop watches that one
descriptor (``add_reader``, on uvloop or asyncio alike) and, when any socket is ready, one call
here reads, writes, accepts and closes for all of them with system calls made in C. So a
connection costs the loop nothing (no transport, no poll handle), and a socket error (a reset)
reaches the connection it belongs to, which uvloop's poll handles would swallow.

An idle connection holds no buffer: every read lands in one buffer shared by all of a server's
connections (reads are handled one at a time by the loop), and only what is left of an
incomplete frame, or of a request head, is copied to a buffer of the connection's own, freed
again once it is consumed. Output goes straight to the socket; what it does not take waits in
the connection's own output buffer until the socket is writable again (``pause_writing`` past
the high-water mark, as an asyncio transport does).

The request head goes to ``route`` (Python, once per connection); after that, whole messages
go to the listener's ``on_message`` (``str`` for text, ``bytes`` for binary), reassembled from
fragments and checked (masking, opcodes, lengths, UTF-8, close codes) here. Pings are answered
and closes echoed here. A protocol violation sends its close code and drops the connection.
"""

import asyncio
import codecs
import logging
import socket

from cpython.bytearray cimport PyByteArray_GET_SIZE
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.list cimport PyList_GET_ITEM, PyList_GET_SIZE
from cpython.ref cimport Py_DECREF, Py_INCREF
from cpython.unicode cimport PyUnicode_DecodeASCII, PyUnicode_DecodeUTF8
from libc.stdint cimport uint8_t, uint64_t
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memcpy, memmove, strerror


cdef extern from "<time.h>" nogil:
    ctypedef long time_t
    cdef struct timespec:
        time_t tv_sec
        long tv_nsec
    int clock_gettime(int clk_id, timespec* tp)
    int CLOCK_MONOTONIC


cdef extern from "<errno.h>" nogil:
    int errno
    int EAGAIN
    int EWOULDBLOCK
    int EINTR
    int ECONNABORTED
    int ECONNRESET
    int EPROTO
    int EMFILE
    int ENFILE
    int ENOBUFS
    int ENOMEM


cdef extern from "<unistd.h>" nogil:
    int fd_close "close"(int fd)


cdef extern from "<sys/socket.h>" nogil:
    ctypedef unsigned int socklen_t
    cdef struct sockaddr:
        unsigned short sa_family
    ssize_t recv(int fd, void* buf, size_t n, int flags)
    ssize_t send(int fd, const void* buf, size_t n, int flags)
    int accept4(int fd, sockaddr* addr, socklen_t* addrlen, int flags)
    int shutdown(int fd, int how)
    int setsockopt(int fd, int level, int name, const void* value, socklen_t size)
    int getsockopt(int fd, int level, int name, void* value, socklen_t* size)
    int SOL_SOCKET
    int SO_ERROR
    cdef struct sockaddr_storage:
        unsigned short ss_family
    int getpeername(int fd, sockaddr* addr, socklen_t* addrlen)
    int getsockname(int fd, sockaddr* addr, socklen_t* addrlen)
    int AF_INET
    int AF_INET6
    int SOCK_NONBLOCK
    int SOCK_CLOEXEC
    int MSG_NOSIGNAL
    int SHUT_WR


cdef extern from "<sys/epoll.h>" nogil:
    ctypedef union epoll_data_t:
        void* ptr
        int fd
    cdef struct epoll_event:
        unsigned int events
        epoll_data_t data
    int epoll_create1(int flags)
    int epoll_ctl(int epfd, int op, int fd, epoll_event* event)
    int epoll_wait(int epfd, epoll_event* events, int maxevents, int timeout)
    int EPOLL_CLOEXEC
    int EPOLL_CTL_ADD
    int EPOLL_CTL_MOD
    int EPOLL_CTL_DEL
    unsigned int EPOLLIN
    unsigned int EPOLLOUT
    unsigned int EPOLLERR
    unsigned int EPOLLHUP


cdef extern from "<netinet/in.h>" nogil:
    int IPPROTO_TCP
    cdef struct in_addr:
        pass
    cdef struct in6_addr:
        pass
    cdef struct sockaddr_in:
        unsigned short sin_port
        in_addr sin_addr
    cdef struct sockaddr_in6:
        unsigned short sin6_port
        unsigned int sin6_flowinfo
        in6_addr sin6_addr
        unsigned int sin6_scope_id
    unsigned short ntohs(unsigned short)
    unsigned int ntohl(unsigned int)


cdef extern from "<arpa/inet.h>" nogil:
    const char* inet_ntop(int af, const void* src, char* dst, socklen_t size)


cdef extern from "<netinet/tcp.h>" nogil:
    int TCP_NODELAY


log = logging.getLogger("fastws.wire")

cdef enum:
    HEAD_LIMIT = 16384     # a request head past this is dropped (picows' cap too)
    SHARED_SIZE = 262144   # one read's worth, for all connections of a server
    MIN_OWN = 1024         # the smallest buffer an incomplete frame gets
    ACCEPT_BATCH = 128     # connections taken per readable listening socket, at most
    READY_BATCH = 512      # socket events taken from the epoll set per call
    HIGH_WATER = 65536     # asyncio's default write buffer limits
    LOW_WATER = 16384

cdef double FAIL_LINGER = 1.0  # after a protocol error, the peer has this long to close
cdef double ACCEPT_PAUSE = 0.1  # out of descriptors: the backlog waits this long, no spin

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


cdef object _address(int fd, bint peer):
    """The socket's peer (or own) address as Python's socket module gives it: ``(host, port)``
    for IPv4, ``(host, port, flowinfo, scope_id)`` for IPv6; None for any other family."""
    cdef sockaddr_storage ss
    cdef socklen_t size = sizeof(ss)
    cdef char text[64]
    cdef sockaddr_in* v4
    cdef sockaddr_in6* v6
    cdef int rc = getpeername(fd, <sockaddr*>&ss, &size) if peer else \
        getsockname(fd, <sockaddr*>&ss, &size)
    if rc != 0:
        return None
    if ss.ss_family == AF_INET:
        v4 = <sockaddr_in*>&ss
        if inet_ntop(AF_INET, &v4.sin_addr, text, sizeof(text)) == NULL:
            return None
        return (text.decode(), ntohs(v4.sin_port))
    if ss.ss_family == AF_INET6:
        v6 = <sockaddr_in6*>&ss
        if inet_ntop(AF_INET6, &v6.sin6_addr, text, sizeof(text)) == NULL:
            return None
        return (text.decode(), ntohs(v6.sin6_port), ntohl(v6.sin6_flowinfo), v6.sin6_scope_id)
    return None


cdef int _socket_error(int fd) noexcept:
    """The socket's pending error (SO_ERROR), or ECONNRESET if it reports none."""
    cdef int err = 0
    cdef socklen_t size = sizeof(err)
    if getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &size) != 0 or err == 0:
        return ECONNRESET
    return err


cdef inline object _os_error(int err):
    return OSError(err, strerror(err).decode())


cdef class WireServer:
    """What every ``Wire`` of a node's listening sockets shares, and their accept loop.

    ``route(head)`` gets each request head (bytes, up to the blank line) and returns either the
    bytes of a whole HTTP response (the connection is closed after it) or ``(listener,
    response)``: the 101 response to send, and the listener that gets ``on_connected(wire)``,
    ``on_message(msg)``, ``before_close()``, ``on_disconnected()``, ``pause_writing()`` and
    ``resume_writing()``.
    """

    def __cinit__(self, route, double handshake_timeout, Py_ssize_t max_message):
        loop = asyncio.get_running_loop()
        self.route = route
        self.call_later = loop.call_later
        self.call_soon = loop.call_soon
        self.add_reader = loop.add_reader
        self.remove_reader = loop.remove_reader
        self.epfd = -1
        self.events = NULL
        self.handshake_timeout = handshake_timeout
        self.max_message = max_message
        self.shared = <char*>malloc(SHARED_SIZE)
        if self.shared == NULL:
            raise MemoryError()
        self.failures = 0
        self.accept_errors = 0
        self.upgraded = []
        self.handshaking = set()
        self.acceptors = []
        self.events = malloc(READY_BATCH * sizeof(epoll_event))
        if self.events == NULL:
            raise MemoryError()
        self.epfd = epoll_create1(EPOLL_CLOEXEC)
        if self.epfd < 0:
            raise _os_error(errno)
        self.add_reader(self.epfd, self._on_ready)

    def __dealloc__(self):
        # Only once no Wire can read into it: each Wire holds a reference to its server.
        free(self.shared)
        free(self.events)
        if self.epfd >= 0:
            fd_close(self.epfd)

    def _on_ready(self):
        """The loop: some socket in the epoll set is ready."""
        self._ready()

    cdef int _ready(self) except -1:
        cdef epoll_event* events = <epoll_event*>self.events
        cdef int i, n
        cdef Wire w
        n = epoll_wait(self.epfd, events, READY_BATCH, 0)
        for i in range(n):
            # The set holds a reference to each Wire in it; one closed earlier in this batch
            # is still alive (its connection_lost is scheduled) and has fd -1: skipped.
            w = <Wire><object>events[i].data.ptr
            if w.fd < 0:
                continue
            try:
                w._event(events[i].events)
            except Exception:
                log.exception("connection I/O failed; dropping it")
                w._abort()
        return 0

    def listen(self, sock):
        """Accept connections on ``sock`` (bound and listening; made non-blocking here)."""
        sock.setblocking(False)
        cdef Acceptor a = Acceptor(self, sock)
        self.acceptors.append(a)
        a.start()

    def stop_accepting(self):
        """Stop accepting and close the listening sockets; open connections stay."""
        cdef Acceptor a
        for a in self.acceptors:
            a.stop()
            a.sock.close()
        self.acceptors = []

    def abort_all(self):
        """Drop every open connection now (the end of a drain): none outlives its server."""
        cdef Wire w
        for w in list(self.handshaking) + list(self.upgraded):
            w._abort()

    @property
    def sockets(self):
        cdef Acceptor a
        return [a.sock for a in self.acceptors]

    cdef int _accept(self, Acceptor a) except -1:
        cdef int fd, err, one = 1
        cdef Py_ssize_t _
        cdef Wire w
        for _ in range(ACCEPT_BATCH):
            fd = accept4(a.fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC)
            if fd < 0:
                err = errno
                if err == EAGAIN or err == EWOULDBLOCK:
                    return 0
                if err == EINTR or err == ECONNABORTED or err == EPROTO:
                    continue  # that one connection is gone; the next may be there
                self.accept_errors += 1
                if err == EMFILE or err == ENFILE or err == ENOBUFS or err == ENOMEM:
                    # The socket stays readable while its backlog waits: pause, or it spins.
                    log.warning("accept failed: %s; retrying in %.1f s", strerror(err).decode(),
                                ACCEPT_PAUSE, extra={"event": "accept_failed"})
                    a.pause(ACCEPT_PAUSE)
                    return 0
                log.error("accept failed: %s", strerror(err).decode(),
                          extra={"event": "accept_failed"})
                return 0
            setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one))
            w = Wire(self)
            w._open(fd)
        return 0

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


class SocketView:
    """What ``get_extra_info("socket")`` gives: the socket's options and addresses, without
    owning its descriptor (as uvloop's pseudo-socket), so nothing needs closing."""

    __slots__ = ("_fd",)

    def __init__(self, int fd):
        self._fd = fd

    def fileno(self):
        return self._fd

    def _call(self, name, *args):
        sock = socket.socket(fileno=self._fd)
        try:
            return getattr(sock, name)(*args)
        finally:
            sock.detach()

    def setsockopt(self, *args):
        return self._call("setsockopt", *args)

    def getsockopt(self, *args):
        return self._call("getsockopt", *args)

    def getpeername(self):
        return self._call("getpeername")

    def getsockname(self):
        return self._call("getsockname")


cdef class Acceptor:
    """One listening socket of a WireServer: the loop calls it when connections wait."""

    def __cinit__(self, WireServer server, sock):
        self.server = server
        self.sock = sock
        self.fd = sock.fileno()
        self.active = False
        self.resume_handle = None

    def __call__(self):
        self.server._accept(self)

    def start(self):
        self.resume_handle = None
        if not self.active and self.fd >= 0:
            self.server.add_reader(self.fd, self)
            self.active = True

    def pause(self, double seconds):
        self.stop()
        self.resume_handle = self.server.call_later(seconds, self.start)

    def stop(self):
        if self.resume_handle is not None:
            self.resume_handle.cancel()
            self.resume_handle = None
        if self.active:
            self.server.remove_reader(self.fd)
            self.active = False


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
        self.out = NULL
        self.out_size = 0
        self.out_capacity = 0
        self.high_water = HIGH_WATER
        self.low_water = LOW_WATER
        self.state = HANDSHAKE
        self.fd = -1
        self.close_sent_code = 0
        self.close_recv_code = 0
        self.last_rx = _monotonic()
        self.ping_sent_at = 0
        self.slot = -1

    def __dealloc__(self):
        free(self.buf)
        free(self.out)
        if self.fd >= 0:  # never closed (the loop went away first): do not leak it
            fd_close(self.fd)

    # ---- the socket -----------------------------------------------------------------------

    cdef int _open(self, int fd) except -1:
        """An accepted socket: watch it, and give the client ``handshake_timeout`` to upgrade."""
        cdef epoll_event ev
        cdef int err
        ev.events = EPOLLIN
        ev.data.ptr = <void*>self
        if epoll_ctl(self.server.epfd, EPOLL_CTL_ADD, fd, &ev) != 0:
            err = errno
            fd_close(fd)
            raise _os_error(err)
        Py_INCREF(self)  # the epoll set's reference, dropped by _finish
        self.server.handshaking.add(self)
        self.fd = fd
        self.watched = EPOLLIN
        self.watching_read = True
        self.server.open += 1
        if self.server.handshake_timeout > 0:
            self.timer = self.server.call_later(self.server.handshake_timeout,
                                                self._handshake_timed_out)
        return 0

    cdef int _watch(self) except -1:
        """Register for what is wanted now: reads unless paused or closing, writes while
        output waits (errors and hang-ups are always reported)."""
        cdef epoll_event ev
        cdef unsigned int want = 0
        if self.fd < 0:
            return 0
        if self.watching_read:
            want |= EPOLLIN
        if self.watching_write:
            want |= EPOLLOUT
        if want != self.watched:
            ev.events = want
            ev.data.ptr = <void*>self
            if epoll_ctl(self.server.epfd, EPOLL_CTL_MOD, self.fd, &ev) != 0:
                return self._lost_by(errno)
            self.watched = want
        return 0

    cdef int _event(self, unsigned int events) except -1:
        if events & EPOLLOUT and self.watching_write:
            self._writable()
        if self.fd < 0:
            return 0
        if events & EPOLLIN and self.watching_read:
            return self._readable()
        if events & (EPOLLERR | EPOLLHUP):
            # Reported even while reads are paused: the error is the socket's, the connection
            # is lost (or, on a hang-up without one, over).
            if self.watching_read:
                return self._readable()
            return self._lost_by(_socket_error(self.fd))
        return 0

    cdef int _readable(self) except -1:
        cdef Py_ssize_t want
        cdef char* into
        cdef Py_ssize_t room
        cdef ssize_t n
        cdef int err
        if self.fd < 0 or not self.watching_read:
            return 0
        if self.size == 0:
            self.reading_shared = True
            into = self.server.shared
            room = SHARED_SIZE
        else:
            self.reading_shared = False
            want = self.need if self.need > self.size else self.size + MIN_OWN
            if want - self.size < MIN_OWN:
                want = self.size + MIN_OWN
            if want > self.capacity:
                self._grow(want)
            into = self.buf + self.size
            room = self.capacity - self.size
        n = recv(self.fd, into, <size_t>room, 0)
        if n > 0:
            return self._received(n)
        if n == 0:
            # The peer shut its side: what we still have to say goes out, then we close.
            self._drop_buffer()
            return self._close()
        err = errno
        if err == EAGAIN or err == EWOULDBLOCK or err == EINTR:
            return 0
        return self._lost_by(err)

    cdef int _received(self, Py_ssize_t nbytes) except -1:
        cdef char* data
        cdef Py_ssize_t end, used, left
        if self.state == CLOSED or self.state == FAILED:
            self._drop_buffer()
            return 0
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
            return 0
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
        return 0

    cdef int _send(self, const char* data, Py_ssize_t n) except -1:
        """Write ``n`` bytes: straight to the socket when nothing waits before them; what it
        does not take waits in the output buffer (and past the high-water mark the listener
        is told ``pause_writing``). Writing to a closed socket is a no-op, as in asyncio."""
        cdef ssize_t sent = 0
        cdef int err
        if self.fd < 0 or n <= 0:
            return 0
        if self.out_size == 0:
            sent = send(self.fd, data, <size_t>n, MSG_NOSIGNAL)
            if sent == n:
                return 0
            if sent < 0:
                err = errno
                if err != EAGAIN and err != EWOULDBLOCK and err != EINTR:
                    return self._lost_by(err)
                sent = 0
        return self._keep(data + sent, n - sent)

    cdef int _keep(self, const char* data, Py_ssize_t n) except -1:
        cdef Py_ssize_t cap = self.out_capacity if self.out_capacity else MIN_OWN
        cdef char* grown
        while cap < self.out_size + n:
            cap *= 2
        if cap != self.out_capacity:
            grown = <char*>realloc(self.out, cap)
            if grown == NULL:
                raise MemoryError()
            self.out = grown
            self.out_capacity = cap
        memcpy(self.out + self.out_size, data, n)
        self.out_size += n
        if not self.watching_write:
            self.watching_write = True
            self._watch()
        if not self.writing_paused and self.out_size > self.high_water:
            self.writing_paused = True
            self.pause_writing()
        return 0

    cdef int _writable(self) except -1:
        """The socket takes writes again."""
        cdef ssize_t sent
        cdef int err
        if self.fd < 0 or self.out_size == 0:
            return 0
        sent = send(self.fd, self.out, <size_t>self.out_size, MSG_NOSIGNAL)
        if sent < 0:
            err = errno
            if err != EAGAIN and err != EWOULDBLOCK and err != EINTR:
                self._lost_by(err)
            return 0
        self.out_size -= sent
        if self.out_size:
            memmove(self.out, self.out + sent, self.out_size)
        else:
            self.watching_write = False
            self._watch()
            free(self.out)  # an idle connection holds no output buffer
            self.out = NULL
            self.out_capacity = 0
        if self.writing_paused and self.out_size <= self.low_water:
            self.writing_paused = False
            self.resume_writing()
        if self.out_size == 0 and self.fd >= 0:
            if self.closing:
                self._finish(None)
            elif self.eof_after_output:
                self.eof_after_output = False
                shutdown(self.fd, SHUT_WR)
        return 0

    cdef int _close(self) except -1:
        """No more reads; close once the output is out."""
        if self.fd < 0:
            return 0
        self.closing = True
        if self.watching_read:
            self.watching_read = False
            self._watch()
        if self.out_size == 0:
            self._finish(None)
        return 0

    cdef int _abort(self) except -1:
        """Close now; output still waiting is dropped."""
        self.closing = True
        return self._finish(None)

    cdef int _lost_by(self, int err) except -1:
        """The socket failed (reset by the peer, most often): the connection is lost."""
        self.closing = True
        return self._finish(_os_error(err))

    cdef int _finish(self, object exc) except -1:
        cdef int fd = self.fd
        if fd < 0:
            return 0
        self.watching_read = False
        self.watching_write = False
        self.fd = -1
        self.server.handshaking.discard(self)
        epoll_ctl(self.server.epfd, EPOLL_CTL_DEL, fd, NULL)
        fd_close(fd)
        free(self.out)
        self.out = NULL
        self.out_size = 0
        self.out_capacity = 0
        # As an asyncio transport does: the protocol hears of it on the loop's next turn. The
        # scheduled call keeps this Wire alive past the epoll set's reference, dropped here.
        self.server.call_soon(self.connection_lost, exc)
        Py_DECREF(self)
        return 0

    cdef int _write_eof(self) except -1:
        if self.fd < 0:
            return 0
        if self.out_size:
            self.eof_after_output = True
        else:
            shutdown(self.fd, SHUT_WR)
        return 0

    def _handshake_timed_out(self):
        self.timer = None
        if self.state == HANDSHAKE:
            self._abort()

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

    def pause_writing(self):
        if self.listener is not None:
            self.listener.pause_writing()

    def resume_writing(self):
        if self.listener is not None:
            self.listener.resume_writing()

    # ---- what an asyncio transport offers, for the node and for tests ----------------------

    @property
    def transport(self):
        """The Wire is its own transport: ``get_extra_info``, the write buffer's size and
        limits, ``close``/``abort`` are here."""
        return self

    def get_extra_info(self, name, default=None):
        """``peername``/``sockname`` of the socket, or ``socket``: a ``SocketView`` of it."""
        if self.fd < 0:
            return default
        if name == "peername" or name == "sockname":
            address = _address(self.fd, name == "peername")
            return default if address is None else address
        if name == "socket":
            return SocketView(self.fd)
        return default

    def get_write_buffer_size(self):
        return self.out_size

    def set_write_buffer_limits(self, high=None, low=None):
        if high is None:
            high = HIGH_WATER if low is None else 4 * low
        if low is None:
            low = high // 4
        if not high >= low >= 0:
            raise ValueError(f"high ({high!r}) must be >= low ({low!r}) must be >= 0")
        self.high_water = high
        self.low_water = low
        if not self.writing_paused and self.out_size > self.high_water:
            self.writing_paused = True
            self.pause_writing()

    def is_closing(self):
        return self.closing or self.fd < 0

    def write(self, bytes data):
        self._write(data)

    def close(self):
        self._close()

    def abort(self):
        self._abort()

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
        return self._send(PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data))

    cpdef disconnect(self, bint graceful=True):
        """Close the socket: after what is buffered (``graceful``), or at once."""
        if self.is_disconnected:
            return
        if graceful:
            self._close()
        else:
            self._abort()

    def pause_reading(self):
        """Stop reading the socket (backpressure from a full broker); a closing one is left."""
        self.read_paused = True
        if self.fd >= 0 and not self.closing and self.watching_read:
            self.watching_read = False
            self._watch()

    def resume_reading(self):
        self.read_paused = False
        if self.fd >= 0 and not self.closing and not self.watching_read:
            self.watching_read = True
            self._watch()

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
                self._abort()
                return end
            self.need = end + MIN_OWN
            return 0
        if stop - 4 >= HEAD_LIMIT:
            self.state = FAILED
            self._abort()
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
            self._close()
            return end
        listener, response = outcome
        self._write(response)
        self.listener = listener
        self.state = OPEN
        self.server.handshaking.discard(self)
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
        self._write_eof()
        if self.timer is not None:
            self.timer.cancel()
        self.timer = self.server.call_later(FAIL_LINGER, self.abort)
        return 0
