#include "net.h"

#include <atomic>

#include <arpa/inet.h>
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
        fd = socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC, ai->ai_protocol);
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

int nak_connect(const std::string & host, int port, int timeout_ms, std::string & err) {
    addrinfo hints = {};
    hints.ai_family   = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags    = AI_NUMERICSERV;
    addrinfo * res = nullptr;
    const std::string h = strip_brackets(host);
    const std::string p = std::to_string(port);
    int rc = getaddrinfo(h.c_str(), p.c_str(), &hints, &res);
    if (rc != 0) {
        err = "cannot resolve " + host + ": " + gai_strerror(rc);
        return -1;
    }
    int fd = -1;
    err = "no address for " + host;
    for (addrinfo * ai = res; ai; ai = ai->ai_next) {
        fd = socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC, ai->ai_protocol);
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
        const ssize_t k = send(fd, data, n, MSG_NOSIGNAL | MSG_DONTWAIT);
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

bool nak_client::call(uint8_t type, uint64_t session_id, uint8_t dtype, const std::vector<uint8_t> & payload,
                      nak_frame & reply, std::string & err) {
    if (fd < 0) {
        err = "not connected";
        return false;
    }
    nak_header h;
    h.type       = type;
    h.session_id = session_id;
    h.dtype      = dtype;
    h.request_id = new_request_id();
    const std::vector<uint8_t> frame = nak_frame_bytes(h, payload);
    if (!nak_send_all(fd, frame.data(), frame.size(), timeout_ms, err)) {
        close();
        return false;
    }
    // a FORWARD_OK or ERROR of an earlier forwarded step (one that failed half-way) may still be
    // in the stream: skip it
    do {
        if (!recv_frame(reply, err)) {
            return false;
        }
    } while (reply.hdr.request_id != h.request_id && reply.hdr.request_id != 0 &&
             (reply.hdr.type == NAK_MSG_FORWARD_OK || reply.hdr.type == NAK_MSG_ERROR));
    if (reply.hdr.request_id != h.request_id && reply.hdr.type != NAK_MSG_ERROR) {
        err = "reply to request " + std::to_string(reply.hdr.request_id) + " while waiting for " +
              std::to_string(h.request_id);
        close();
        return false;
    }
    return true;
}

uint64_t nak_client::new_request_id() {
    static std::atomic<uint64_t> next{ 1 };
    return next++;
}

bool nak_client::recv_frame(nak_frame & reply, std::string & err) {
    uint8_t hdr[NAK_HEADER_SIZE];
    if (!nak_recv_exact(fd, hdr, NAK_HEADER_SIZE, timeout_ms, err)) {
        close();
        return false;
    }
    if (!nak_header_decode(hdr, reply.hdr) || reply.hdr.version != NAK_PROTO_VERSION) {
        err = "the peer does not speak the nakshatra protocol v" + std::to_string(NAK_PROTO_VERSION);
        close();
        return false;
    }
    if (reply.hdr.payload_len > max_payload) {
        err = "reply of " + std::to_string(reply.hdr.payload_len) + " bytes exceeds the frame limit";
        close();
        return false;
    }
    reply.payload.resize(reply.hdr.payload_len);
    if (!nak_recv_exact(fd, reply.payload.data(), reply.payload.size(), timeout_ms, err)) {
        close();
        return false;
    }
    return true;
}
