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


cdef class MessageListener:
    # A listener whose whole messages the Wire hands over with a C call (``on_message``
    # for any other listener).
    cdef int message(self, object msg) except -1
    cdef int ascii_text(self, const char* data, Py_ssize_t n) except -1  # valid ASCII


cdef class WireServer:
    cdef object route
    cdef object call_later
    cdef double handshake_timeout
    cdef Py_ssize_t max_message
    cdef char* shared
    cdef object shared_view
    cdef readonly unsigned long long failures
    cdef readonly Py_ssize_t open      # sockets connected and not yet lost
    cdef list upgraded                 # the open upgraded Wires (each knows its slot)
    cdef int _enlist(self, Wire w) except -1
    cdef int _unlist(self, Wire w) except -1


cdef class Wire:
    cdef WireServer server
    cdef readonly object transport     # the uvloop transport
    cdef readonly object listener
    cdef readonly int fd
    cdef readonly bint is_disconnected
    cdef readonly bint last_in_batch   # the message being handled ends its read batch
    cdef bint wrote                    # a write went through the transport since its
                                       # buffer was last seen empty
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
