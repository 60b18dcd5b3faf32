// Sockets for the protocol: a listening socket for the stage, and a blocking client with
// timeouts (every wait is bounded: a dead peer gives an error, never a hang).
#pragma once

#include "auth.h"
#include "protocol.h"

#include <cstdint>
#include <string>

// listen on host:port (port 0: any free port); returns the fd or -1 with err set
int nak_listen(const std::string & host, int port, int backlog, std::string & err);
// the port a socket is bound to
int nak_bound_port(int fd);
// connect with a timeout; returns the fd (blocking, TCP_NODELAY) or -1 with err set
int nak_connect(const std::string & host, int port, int timeout_ms, std::string & err);
// start a connect without waiting for it (a stage's event loop must never block on a slow or
// unreachable next stage): returns a non-blocking TCP_NODELAY fd whose connection is in progress
// or made, or -1 with err set. Poll it for POLLOUT, then nak_connect_finish. Host names are
// resolved here (getaddrinfo blocks for a name that needs DNS: give stages addresses).
int nak_connect_start(const std::string & host, int port, std::string & err);
// after POLLOUT (or POLLERR/POLLHUP) on a socket from nak_connect_start: true once connected,
// false with err set when the connection failed
bool nak_connect_finish(int fd, std::string & err);
bool nak_set_nonblocking(int fd);
void nak_set_nodelay(int fd);
// is host a loopback name or address (127.0.0.0/8, ::1, localhost)?
bool nak_is_loopback(const std::string & host);

// blocking I/O bounded by timeout_ms (per call); false with err set on timeout, EOF or error
bool nak_send_all(int fd, const uint8_t * data, size_t n, int timeout_ms, std::string & err);
bool nak_recv_exact(int fd, uint8_t * data, size_t n, int timeout_ms, std::string & err);

// One connection from a client to a stage. Requests are answered in order; call() sends one
// frame and waits for its reply (matched by request id).
struct nak_client {
    int         fd          = -1;
    int         timeout_ms  = 30000;
    uint32_t    max_payload = NAK_MAX_PAYLOAD_DEFAULT;
    // request ids come from one counter for the whole process: a forwarded step's reply (or
    // error) reaches the client on another stage's connection, and must not be taken for the
    // reply to a request on that connection
    static uint64_t new_request_id();
    std::string peer;
    nak_auth    auth;      // set_key() before hello() to authenticate (auth.h)

    ~nak_client() { close(); }

    bool connect(const std::string & host, int port, int connect_timeout_ms, std::string & err);
    void close();
    bool connected() const { return fd >= 0; }
    // send (type, session, dtype, payload) and read the reply frame; false on transport failure.
    // Waits until timeout_ms pass without the reply or a PROGRESS frame for this request: a stage
    // that is computing it (or holds it behind a computation that advances) sends PROGRESS, so a
    // long prefill on a slow host is waited for and a hung one gives up after timeout_ms.
    bool call(uint8_t type, uint64_t session_id, uint8_t dtype, const std::vector<uint8_t> & payload,
              nak_frame & reply, std::string & err);
    // HELLO, and with a key the AUTH / AUTH_OK exchange (auth.h). reply: HELLO_OK, or the stage's
    // ERROR. false on transport failure, or with unauthorized set when the stage has no key or
    // another key (err says which)
    bool hello(nak_hello & m, nak_frame & reply, bool & unauthorized, std::string & err);
    // one frame out (MACed once authenticated) / one frame in (MAC checked and stripped); on
    // failure the connection is closed
    bool send_frame(const nak_header & h, const std::vector<uint8_t> & payload, std::string & err);
    // wait_ms: how long to wait for the frame (< 0: timeout_ms)
    bool recv_frame(nak_frame & reply, std::string & err, int wait_ms = -1);
};
