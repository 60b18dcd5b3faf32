#include "net.h"

#include "platform.h"

#include <arpa/inet.h>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

static int64_t now_ms() {
    using namespace std::chrono;
    return duration_cast<milliseconds>(steady_clock::now().time_since_epoch()).count();
}

bool nak_set_nonblocking(int fd) {
    const int fl = fcntl(fd, F_GETFL, 0);
    return fl >= 0 && fcntl(fd, F_SETFL, fl | O_NONBLOCK) == 0;
}

void nak_set_nodelay(int fd) {
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
}

bool nak_is_loopback(const std::string & host) {
    if (host == "localhost" || host == "::1" || host == "[::1]") {
        return true;
    }
    in_addr a4;
    if (inet_pton(AF_INET, host.c_str(), &a4) == 1) {
        return (ntohl(a4.s_addr) >> 24) == 127;
    }
    return false;
}

static std::string strip_brackets(const std::string & host) {
    if (host.size() >= 2 && host.front() == '[' && host.back() == ']') {
        return host.substr(1, host.size() - 2);
    }
    return host;
}

int nak_listen(const std::string & host, int port, int backlog, std::string & err) {
    addrinfo hints = {};
    hints.ai_family   = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags    = AI_PASSIVE | AI_NUMERICSERV;
    addrinfo * res = nullptr;
    const std::string h = strip_brackets(host);
    const std::string p = std::to_string(port);
    int rc = getaddrinfo(h.empty() ? nullptr : h.c_str(), p.c_str(), &hints, &res);
    if (rc != 0) {
        err = "cannot resolve " + host + ": " + gai_strerror(rc);
        return -1;
    }
    int fd = -1;
    for (addrinfo * ai = res; ai; ai = ai->ai_next) {
        fd = nak_socket(ai->ai_family, ai->ai_socktype, ai->ai_protocol);
        if (fd < 0) {
            continue;
        }
        int one = 1;
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
        if (bind(fd, ai->ai_addr, ai->ai_addrlen) == 0 && listen(fd, backlog) == 0) {
            break;
        }
        err = std::string("cannot listen on ") + host + ":" + p + ": " + strerror(errno);
        ::close(fd);
        fd = -1;
    }
    freeaddrinfo(res);
    if (fd >= 0) {
        nak_set_nonblocking(fd);
    }
    return fd;
}

int nak_bound_port(int fd) {
    sockaddr_storage ss = {};
    socklen_t len = sizeof(ss);
    if (getsockname(fd, (sockaddr *) &ss, &len) != 0) {
        return -1;
    }
    if (ss.ss_family == AF_INET) {
        return ntohs(((sockaddr_in *) &ss)->sin_port);
    }
    return ntohs(((sockaddr_in6 *) &ss)->sin6_port);
}

// the TCP addresses of host:port (freeaddrinfo the result); nullptr with err set
static addrinfo * resolve_tcp(const std::string & host, int port, std::string & err) {
    addrinfo hints = {};
    hints.ai_family   = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags    = AI_NUMERICSERV;
    addrinfo * res = nullptr;
    const std::string h = strip_brackets(host);
    const std::string p = std::to_string(port);
    const int rc = getaddrinfo(h.c_str(), p.c_str(), &hints, &res);
    if (rc != 0) {
        err = "cannot resolve " + host + ": " + gai_strerror(rc);
        return nullptr;
    }
    return res;
}

int nak_connect(const std::string & host, int port, int timeout_ms, std::string & err) {
    addrinfo * res = resolve_tcp(host, port, err);
    if (!res) {
        return -1;
    }
    const std::string p = std::to_string(port);
    int rc = 0;
    int fd = -1;
    err = "no address for " + host;
    for (addrinfo * ai = res; ai; ai = ai->ai_next) {
        fd = nak_socket(ai->ai_family, ai->ai_socktype, ai->ai_protocol);
        if (fd < 0) {
            continue;
        }
        nak_set_nonblocking(fd);
        rc = ::connect(fd, ai->ai_addr, ai->ai_addrlen);
        if (rc != 0 && errno == EINPROGRESS) {
            pollfd pfd = { fd, POLLOUT, 0 };
            rc = poll(&pfd, 1, timeout_ms);
            if (rc == 1) {
                int soerr = 0;
                socklen_t len = sizeof(soerr);
                getsockopt(fd, SOL_SOCKET, SO_ERROR, &soerr, &len);
                rc = soerr == 0 ? 0 : -1;
                errno = soerr;
            } else {
                errno = rc == 0 ? ETIMEDOUT : errno;
                rc = -1;
            }
        }
        if (rc == 0) {
            const int fl = fcntl(fd, F_GETFL, 0);
            fcntl(fd, F_SETFL, fl & ~O_NONBLOCK);
            nak_set_nodelay(fd);
            break;
        }
        err = "cannot connect to " + host + ":" + p + ": " + strerror(errno);
        ::close(fd);
        fd = -1;
    }
    freeaddrinfo(res);
    return fd;
}

int nak_connect_start(const std::string & host, int port, std::string & err) {
    addrinfo * res = resolve_tcp(host, port, err);
    if (!res) {
        return -1;
    }
    const std::string p = std::to_string(port);
    // the first address only: trying the next one needs the outcome of this one, i.e. waiting
    const addrinfo * ai = res;
    int fd = nak_socket(ai->ai_family, ai->ai_socktype, ai->ai_protocol);
    if (fd < 0) {
        err = std::string("socket failed: ") + strerror(errno);
    } else {
        nak_set_nonblocking(fd);
        nak_set_nodelay(fd);
        if (::connect(fd, ai->ai_addr, ai->ai_addrlen) != 0 && errno != EINPROGRESS) {
            err = "cannot connect to " + host + ":" + p + ": " + strerror(errno);
            ::close(fd);
            fd = -1;
        }
    }
    freeaddrinfo(res);
    return fd;
}

bool nak_connect_finish(int fd, std::string & err) {
    int soerr = 0;
    socklen_t len = sizeof(soerr);
    if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &soerr, &len) != 0) {
        soerr = errno;
    }
    if (soerr != 0) {
        err = std::string("cannot connect: ") + strerror(soerr);
        return false;
    }
    return true;
}

static bool wait_fd(int fd, short events, int64_t deadline, std::string & err) {
    for (;;) {
        const int64_t left = deadline - now_ms();
        if (left <= 0) {
            err = "timed out";
            return false;
        }
        pollfd pfd = { fd, events, 0 };
        const int rc = poll(&pfd, 1, (int) left);
        if (rc > 0) {
            return true;
        }
        if (rc < 0 && errno != EINTR) {
            err = strerror(errno);
            return false;
        }
    }
}

bool nak_send_all(int fd, const uint8_t * data, size_t n, int timeout_ms, std::string & err) {
    const int64_t deadline = now_ms() + timeout_ms;
    while (n > 0) {
        const ssize_t k = nak_send_nosignal(fd, data, n, true);
        if (k > 0) {
            data += k;
            n    -= (size_t) k;
            continue;
        }
        if (k < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) {
            if (!wait_fd(fd, POLLOUT, deadline, err)) {
                err = "send " + err;
                return false;
            }
            continue;
        }
        err = std::string("send failed: ") + strerror(errno);
        return false;
    }
    return true;
}

bool nak_recv_exact(int fd, uint8_t * data, size_t n, int timeout_ms, std::string & err) {
    const int64_t deadline = now_ms() + timeout_ms;
    while (n > 0) {
        const ssize_t k = recv(fd, data, n, MSG_DONTWAIT);
        if (k > 0) {
            data += k;
            n    -= (size_t) k;
            continue;
        }
        if (k == 0) {
            err = "connection closed by peer";
            return false;
        }
        if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) {
            if (!wait_fd(fd, POLLIN, deadline, err)) {
                err = "receive " + err;
                return false;
            }
            continue;
        }
        err = std::string("receive failed: ") + strerror(errno);
        return false;
    }
    return true;
}

bool nak_client::connect(const std::string & host, int port, int connect_timeout_ms, std::string & err) {
    close();
    fd   = nak_connect(host, port, connect_timeout_ms, err);
    peer = host + ":" + std::to_string(port);
    return fd >= 0;
}

void nak_client::close() {
    if (fd >= 0) {
        ::close(fd);
        fd = -1;
    }
}

bool nak_client::send_frame(const nak_header & h, const std::vector<uint8_t> & payload, std::string & err) {
    if (fd < 0) {
        err = "not connected";
        return false;
    }
    std::vector<uint8_t> frame = nak_frame_bytes(h, payload);
    auth.seal(frame);
    if (!nak_send_all(fd, frame.data(), frame.size(), timeout_ms, err)) {
        close();
        return false;
    }
    return true;
}

bool nak_client::recv_frame(nak_frame & reply, std::string & err, int wait_ms) {
    uint8_t hdr[NAK_HEADER_SIZE];
    if (!nak_recv_exact(fd, hdr, NAK_HEADER_SIZE, wait_ms < 0 ? timeout_ms : wait_ms, err)) {
        close();
        return false;
    }
    if (!nak_header_decode(hdr, reply.hdr) || reply.hdr.version != NAK_PROTO_VERSION) {
        err = "the peer does not speak the nakshatra protocol v" + std::to_string(NAK_PROTO_VERSION);
        close();
        return false;
    }
    if (reply.hdr.payload_len > max_payload + (auth.ready ? NAK_MAC_SIZE : 0)) {
        err = "reply of " + std::to_string(reply.hdr.payload_len) + " bytes exceeds the frame limit";
        close();
        return false;
    }
    reply.payload.resize(reply.hdr.payload_len);
    if (!nak_recv_exact(fd, reply.payload.data(), reply.payload.size(), timeout_ms, err) || !auth.open(reply, err)) {
        close();
        return false;
    }
    return true;
}

uint64_t nak_client::new_request_id() {
    static std::atomic<uint64_t> next{ 1 };
    return next++;
}

bool nak_client::call(uint8_t type, uint64_t session_id, uint8_t dtype, const std::vector<uint8_t> & payload,
                      nak_frame & reply, std::string & err) {
    nak_header h;
    h.type       = type;
    h.session_id = session_id;
    h.dtype      = dtype;
    h.request_id = new_request_id();
    if (!send_frame(h, payload, err)) {
        return false;
    }
    // a FORWARD_OK or ERROR of an earlier forwarded step (one that failed half-way) may still be
    // in the stream: skip it. PROGRESS for this request restarts the wait; other PROGRESS (an
    // earlier step's, another session's) is skipped without restarting it.
    int64_t deadline = now_ms() + timeout_ms;
    for (;;) {
        const int64_t left = deadline - now_ms();
        if (left <= 0 || !recv_frame(reply, err, (int) left)) {
            if (left <= 0) {
                err = "no reply within " + std::to_string(timeout_ms) + " ms";
                close();
            }
            return false;
        }
        if (reply.hdr.type == NAK_MSG_PROGRESS) {
            if (reply.hdr.request_id == h.request_id) {
                deadline = now_ms() + timeout_ms;
            }
            continue;
        }
        if (reply.hdr.request_id != h.request_id && reply.hdr.request_id != 0 &&
            (reply.hdr.type == NAK_MSG_FORWARD_OK || reply.hdr.type == NAK_MSG_ERROR)) {
            continue;
        }
        break;
    }
    if (reply.hdr.request_id != h.request_id && reply.hdr.type != NAK_MSG_ERROR) {
        err = "reply to request " + std::to_string(reply.hdr.request_id) + " while waiting for " +
              std::to_string(h.request_id);
        close();
        return false;
    }
    return true;
}

bool nak_client::hello(nak_hello & m, nak_frame & reply, bool & unauthorized, std::string & err) {
    unauthorized = false;
    const bool keyed = auth.enabled;
    if (keyed) {
        m.caps |= NAK_CAP_AUTH;
    }
    nak_writer w;
    nak_encode(w, m);
    nak_header h;
    h.type       = NAK_MSG_HELLO;
    h.request_id = new_request_id();
    if (auth.ready) { // HELLO again on an authenticated connection: an ordinary (MACed) request
        if (!send_frame(h, w.buf, err)) {
            return false;
        }
        do { // PROGRESS of this connection's sessions may come first
            if (!recv_frame(reply, err)) {
                return false;
            }
        } while (reply.hdr.type == NAK_MSG_PROGRESS);
        return true;
    }
    const std::vector<uint8_t> hello_bytes = nak_frame_bytes(h, w.buf);
    if (!send_frame(h, w.buf, err) || !recv_frame(reply, err)) {
        return false;
    }
    if (!keyed || reply.hdr.type != NAK_MSG_HELLO_OK) {
        return true; // no key, or an ERROR for the caller to raise
    }
    nak_hello_ok ok;
    if (!nak_decode(reply.payload, ok)) {
        err = "malformed HELLO_OK";
        close();
        return false;
    }
    if (!(ok.caps & NAK_CAP_AUTH)) {
        err = "the stage has no cluster key but this client has one: refusing an unauthenticated stage "
              "(start it with the same --key-file / NAK_KEY)";
        unauthorized = true;
        close();
        return false;
    }
    auth.on_hello(hello_bytes, m.nonce);
    auth.on_hello_ok(nak_frame_bytes(reply.hdr, reply.payload), ok.nonce);
    uint8_t proof[NAK_PROOF_SIZE];
    auth.client_proof(proof);
    const std::vector<uint8_t> a = nak_auth_frame(NAK_MSG_AUTH, proof);
    nak_frame r2;
    if (!nak_send_all(fd, a.data(), a.size(), timeout_ms, err) || !recv_frame(r2, err)) {
        close();
        return false;
    }
    if (r2.hdr.type == NAK_MSG_ERROR) {
        reply = std::move(r2); // the stage refused our proof: unauthorized, for the caller to raise
        close();
        return true;
    }
    uint8_t want[NAK_PROOF_SIZE];
    auth.stage_proof(want);
    if (r2.hdr.type != NAK_MSG_AUTH_OK || r2.payload.size() != NAK_PROOF_SIZE ||
        !nak_ct_equal(want, r2.payload.data(), NAK_PROOF_SIZE)) {
        err = "the stage failed to prove it holds the cluster key (another key, or something in between)";
        unauthorized = true;
        close();
        return false;
    }
    auth.establish();
    return true;
}
