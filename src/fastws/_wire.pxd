from libc.stdint cimport uint8_t

# The fields the fan-out (_fanout.pyx) reads from a connection's Wire.

cdef enum WireState:
    HANDSHAKE = 0
    OPEN = 1
    CLOSING = 2  # our close frame is out, waiting for the peer's
    FAILED = 3   # a protocol error: input is ignored until the socket is dropped
    CLOSED = 4


cdef Py_ssize_t frame_header(uint8_t* p, Py_ssize_t size, int opcode) noexcept
cpdef bytes frame(bytes payload, int opcode=*)


cdef class Wire
cdef class Acceptor


cdef class MessageListener:
    # A listener whose whole messages the Wire hands over with a C call (``on_message``
    # for any other listener).
    cdef int message(self, object msg) except -1
    cdef int ascii_text(self, const char* data, Py_ssize_t n) except -1  # valid ASCII


cdef class WireServer:
    cdef object route
    cdef object call_later
    cdef object call_soon
    cdef object add_reader             # the loop's, for the listening sockets and the epoll set
    cdef object remove_reader
    cdef int epfd                      # the connections' own epoll set (see _wire.pyx)
    cdef void* events                  # epoll_wait's array
    cdef double handshake_timeout
    cdef Py_ssize_t max_message
    cdef char* shared
    cdef readonly unsigned long long failures
    cdef readonly unsigned long long accept_errors   # accept() refused for want of resources
    cdef readonly Py_ssize_t open      # sockets connected and not yet lost
    cdef list upgraded                 # the open upgraded Wires (each knows its slot)
    cdef set handshaking               # the open Wires not upgraded yet
    cdef list acceptors                # one per listening socket
    cdef int _enlist(self, Wire w) except -1
    cdef int _unlist(self, Wire w) except -1
    cdef int _accept(self, Acceptor a) except -1
    cdef int _ready(self) except -1


cdef class Acceptor:
    cdef WireServer server
    cdef readonly object sock
    cdef int fd
    cdef bint active
    cdef object resume_handle


cdef class Wire:
    cdef WireServer server
    cdef readonly object listener
    cdef readonly int fd               # the socket, -1 once closed
    cdef readonly bint is_disconnected
    cdef readonly bint last_in_batch   # the message being handled ends its read batch
    # Output the socket did not take at once, sent when it is writable again.
    cdef char* out
    cdef readonly Py_ssize_t out_size
    cdef Py_ssize_t out_capacity
    cdef Py_ssize_t high_water         # past it the listener is told pause_writing
    cdef Py_ssize_t low_water          # at or under it, resume_writing
    cdef bint writing_paused
    cdef bint watching_read            # in the server's epoll set for reads
    cdef bint watching_write           # and for writes (output is waiting)
    cdef unsigned int watched          # the events it is registered for now
    cdef bint read_paused              # pause_reading() asked for it
    cdef bint closing                  # close() or abort() called: no more reads
    cdef bint eof_after_output         # shut our side down once the output is out
    cdef readonly double last_rx       # monotonic time of the last read
    cdef public double ping_sent_at    # the heartbeat's unanswered ping, or 0
    cdef Py_ssize_t slot               # in server.upgraded, or -1
    cdef int close_sent_code
    cdef int close_recv_code
    cdef WireState state
    cdef bint reading_shared
    cdef bint frag_text
    cdef char* buf
    cdef Py_ssize_t size
    cdef Py_ssize_t capacity
    cdef Py_ssize_t need
    cdef object frags                  # bytearray, only while a fragmented message is open
    cdef object utf8                   # incremental decoder, only while a fragmented text is
    cdef object timer                  # the handshake deadline

    cpdef send_close(self, int code, bytes reason=*)
    cpdef send_ping(self, bytes payload=*)
    cpdef send_pong(self, bytes payload=*)
    cpdef disconnect(self, bint graceful=*)
    cdef int _write(self, bytes data) except -1
    cdef int _send(self, const char* data, Py_ssize_t n) except -1
    cdef int _keep(self, const char* data, Py_ssize_t n) except -1
    cdef int _open(self, int fd) except -1
    cdef int _readable(self) except -1
    cdef int _received(self, Py_ssize_t nbytes) except -1
    cdef int _close(self) except -1
    cdef int _abort(self) except -1
    cdef int _finish(self, object exc) except -1
    cdef int _lost_by(self, int err) except -1
    cdef int _write_eof(self) except -1
    cdef int _watch(self) except -1
    cdef int _writable(self) except -1
    cdef int _event(self, unsigned int events) except -1
    cdef void _drop_buffer(self) noexcept
    cdef int _grow(self, Py_ssize_t want) except -1
    cdef Py_ssize_t _process(self, char* data, Py_ssize_t end) except -1
    cdef Py_ssize_t _handshake(self, char* data, Py_ssize_t end) except -1
    cdef Py_ssize_t _frame(self, char* data, Py_ssize_t pos, Py_ssize_t end) except -1
    cdef bint _complete_at(self, char* data, Py_ssize_t pos, Py_ssize_t end) noexcept
    cdef int _dispatch(self, uint8_t opcode, bint fin, char* payload, Py_ssize_t n) except -1
    cdef bint _append(self, char* payload, Py_ssize_t n, bint fin) except -1
    cdef int _deliver(self, msg) except -1
    cdef int _deliver_ascii(self, char* data, Py_ssize_t n) except -1
    cdef int _handler_failed(self) except -1
    cdef int _end_listener(self) except -1
    cdef int _before_close(self) except -1
    cdef Py_ssize_t _fail(self, int code, bytes reason) except -1
