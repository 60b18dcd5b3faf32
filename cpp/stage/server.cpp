#include "server.h"

#include "net.h"
#include "platform.h"

#include <algorithm>
#include <cstring>
#include <cerrno>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <fcntl.h>
#include <mutex>
#include <poll.h>
#include <random>
#include <sys/socket.h>
#include <thread>
#include <unistd.h>
#include <vector>

namespace {

constexpr int64_t NAK_CONNECT_TIMEOUT_MS = 5000; // to the next stage; the event loop never waits for it

struct conn_state {
    int                  fd = -1;
    int32_t              id = 0;
    nak_frame_parser     parser;
    std::vector<uint8_t> out;
    size_t               out_off = 0;
    bool                 hello_seen = false;
    bool                 closing    = false; // close once `out` is flushed
    bool                 dead       = false;
    bool                 outbound   = false;  // our connection to the next stage (forwarding)
    bool                 connecting = false;  // outbound, its connect still in progress (never waited for)
    uint16_t             fail_code  = NAK_ERR_UNAUTHORIZED; // what the owners of held frames are told if it dies
    std::string          fail_msg;
    std::string          address;
    int64_t              t_open_ms  = 0;
    int64_t              t_last_ms  = 0;
    // authentication (auth.h), when the stage has a key
    nak_auth_gate        gate; // gate.auth: this end of the MACs; gate.state: an accepted connection's handshake
    // our outbound connection's handshake (we are the client there)
    enum { AUTH_NONE, AUTH_WAIT_HELLO_OK, AUTH_WAIT_AUTH, AUTH_WAIT_AUTH_OK, AUTH_DONE } astate = AUTH_NONE;
    std::vector<std::vector<uint8_t>> pending; // outbound frames held until the next stage proved the key
    std::vector<std::pair<int32_t, nak_header>> pending_owners; // whom to tell when it never does
};

struct queued_request {
    int32_t   conn;
    nak_frame frame;
    int64_t   t_arrival_us = 0;
    // (session id, request id) of each step in the frame: whom PROGRESS is for while it waits or runs
    std::vector<std::pair<uint64_t, uint64_t>> work;
};

// the steps a request carries, for PROGRESS: a BATCH's entries, else the header's session and request
std::vector<std::pair<uint64_t, uint64_t>> work_of(const nak_frame & f) {
    std::vector<std::pair<uint64_t, uint64_t>> w;
    nak_batch b;
    if (f.hdr.type == NAK_MSG_BATCH && nak_decode(f.payload, b)) {
        for (const auto & e : b.entries) {
            w.emplace_back(e.session_id, e.request_id);
        }
    } else if (f.hdr.request_id != 0) {
        w.emplace_back(f.hdr.session_id, f.hdr.request_id);
    }
    return w;
}

// One request (or one batch of FORWARDs) at a time through the stage, on its own thread: the event
// loop goes on answering HELLO, sending PROGRESS and moving bytes while llama_decode runs, so a
// long prefill on a slow host is told from a dead or hung stage. The event loop hands a job over
// only when the worker is idle and touches no session state while it runs.
class compute_worker {
  public:
    explicit compute_worker(nak_stage & stage) : stage_(&stage) {}
    ~compute_worker() { stop(); }

    bool start(std::string & err) {
        if (pipe(wake_) != 0) {
            err = "cannot create the compute thread's wake-up pipe";
            return false;
        }
        for (int fd : wake_) {
            fcntl(fd, F_SETFD, FD_CLOEXEC);
            nak_set_nonblocking(fd);
        }
        thread_ = std::thread([this] { run(); });
        return true;
    }

    // shutdown: a running llama_decode is aborted (llama.cpp's abort callback), then joined
    void stop() {
        if (thread_.joinable()) {
            stage_->request_abort();
            {
                std::lock_guard<std::mutex> lock(mtx_);
                quit_ = true;
            }
            cv_.notify_one();
            thread_.join();
        }
        for (int & fd : wake_) {
            if (fd >= 0) {
                close(fd);
                fd = -1;
            }
        }
    }

    int  wake_fd() const { return wake_[0]; }
    bool busy() const { return busy_; }
    // serve another stage from the next job on (a model swap); only while idle
    void set_stage(nak_stage & stage) { stage_ = &stage; }
    const std::vector<queued_request> & running() const { return picked_; }

    void submit(std::vector<queued_request> && picked) {
        picked_ = std::move(picked);
        out_.clear();
        close_conn_ = false;
        busy_ = true;
        {
            std::lock_guard<std::mutex> lock(mtx_);
            has_job_ = true;
        }
        cv_.notify_one();
    }

    // the finished job's frames to send and the requests it ran; false while it still runs
    bool collect(std::vector<nak_outgoing> & out, std::vector<queued_request> & done, int32_t & conn, bool & close_conn) {
        char buf[64];
        while (read(wake_[0], buf, sizeof(buf)) > 0) {
        }
        if (!busy_) {
            return false;
        }
        {
            std::lock_guard<std::mutex> lock(mtx_);
            if (has_job_) {
                return false;
            }
        }
        out        = std::move(out_);
        conn       = picked_.empty() ? -1 : picked_[0].conn;
        close_conn = close_conn_;
        done       = std::move(picked_);
        picked_.clear();
        busy_ = false;
        return true;
    }

  private:
    void run() {
        for (;;) {
            {
                std::unique_lock<std::mutex> lock(mtx_);
                cv_.wait(lock, [this] { return has_job_ || quit_; });
                if (quit_) {
                    return;
                }
            }
            execute();
            {
                std::lock_guard<std::mutex> lock(mtx_);
                has_job_ = false;
            }
            const char c = 1;
            (void) !write(wake_[1], &c, 1);
        }
    }

    void execute() {
        stage_->begin_work();
        try {
            if (picked_.size() == 1) {
                stage_->handle(picked_[0].frame, picked_[0].conn, close_conn_, out_);
            } else {
                std::vector<const nak_frame *> frames;
                std::vector<int32_t> from;
                for (const auto & q : picked_) {
                    frames.push_back(&q.frame);
                    from.push_back(q.conn);
                }
                stage_->on_forwards(frames, from, out_);
            }
        } catch (const std::exception & e) {
            fprintf(stderr, "nak stage: request failed: %s\n", e.what());
        }
        stage_->end_work();
    }

    nak_stage *                 stage_;
    std::thread                 thread_;
    std::mutex                  mtx_;
    std::condition_variable     cv_;
    bool                        has_job_ = false; // guarded by mtx_
    bool                        quit_    = false; // guarded by mtx_
    int                         wake_[2] = { -1, -1 };
    // the job: written by the event loop before submit, read by the worker while has_job_, then
    // read by the event loop again after collect (the mutex orders the hand-overs)
    bool                        busy_ = false;     // event loop side
    std::vector<queued_request> picked_;
    std::vector<nak_outgoing>       out_;
    bool                        close_conn_ = false;
};

// An outbound connection that died on its own (closed, reset, silent) before its key handshake
// finished: the next stage went away, which is not a refused key. Its held steps' owners are told
// NEXT_HOP, so the client looks for a dead stage and fails over, whichever error reaches it first.
void mark_gone(conn_state & c, const std::string & why) {
    if (c.outbound && !c.dead && c.fail_code == NAK_ERR_UNAUTHORIZED) {
        c.fail_code = NAK_ERR_NEXT_HOP;
        c.fail_msg  = "next stage " + c.address + " went away during the key handshake: " + why;
    }
    c.dead = true;
}

void flush(conn_state & c) {
    if (c.connecting) {
        return; // sent once connected
    }
    while (c.out_off < c.out.size()) {
        const ssize_t k = nak_send_nosignal(c.fd, c.out.data() + c.out_off, c.out.size() - c.out_off, true);
        if (k > 0) {
            c.out_off += (size_t) k;
            continue;
        }
        if (k < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) {
            return;
        }
        mark_gone(c, k < 0 ? strerror(errno) : "send failed");
        return;
    }
    c.out.clear();
    c.out_off = 0;
    if (c.closing) {
        c.dead = true;
    }
}

// bytes as they are, no MAC (the handshake frames)
void send_raw(conn_state & c, const std::vector<uint8_t> & frame) {
    c.out.insert(c.out.end(), frame.begin(), frame.end());
    flush(c);
}

// the stage's HELLO_OK on an authenticating connection: say CAP_AUTH, and record it and its nonce
// for the proofs
void capture_hello_ok(conn_state & c, std::vector<uint8_t> & frame) {
    nak_header h;
    nak_hello_ok ok;
    if (frame.size() < NAK_HEADER_SIZE || !nak_header_decode(frame.data(), h) || h.type != NAK_MSG_HELLO_OK ||
        !nak_decode(std::vector<uint8_t>(frame.begin() + NAK_HEADER_SIZE, frame.end()), ok)) {
        return; // an ERROR (wrong model, ...): the handshake stops here
    }
    ok.caps |= NAK_CAP_AUTH;
    nak_writer w;
    nak_encode(w, ok);
    frame = nak_frame_bytes(h, w.buf);
    c.gate.on_hello_ok_sent(frame, ok.nonce);
}

// a frame to the peer: MACed once the connection is authenticated; on an outbound connection
// still authenticating, held until the next stage has proved the key
void send_frame(conn_state & c, const std::vector<uint8_t> & frame) {
    if (!c.gate.auth.enabled) {
        send_raw(c, frame);
        return;
    }
    if (c.outbound && !c.gate.auth.ready) {
        c.pending.push_back(frame);
        return;
    }
    std::vector<uint8_t> f = frame;
    if (!c.outbound && c.gate.state == nak_auth_gate::WAIT_HELLO_OK) {
        capture_hello_ok(c, f);
    }
    c.gate.auth.seal(f);
    send_raw(c, f);
}

// a transport-level error: answer once, then close the connection (the stream cannot be resynced)
void reject(conn_state & c, uint16_t code, const std::string & msg) {
    nak_header h;
    send_frame(c, nak_error_frame(h, code, msg));
    c.closing = true;
    flush(c);
}

// the next stage's side of the handshake on our outbound connection (auth.h); false: give up on it
bool outbound_handshake(conn_state & c, const nak_frame & f) {
    if (f.hdr.type == NAK_MSG_HELLO_OK && c.astate == conn_state::AUTH_WAIT_HELLO_OK) {
        nak_hello_ok ok;
        if (!nak_decode(f.payload, ok) || !(ok.caps & NAK_CAP_AUTH)) {
            fprintf(stderr, "nak stage: next stage %s has no cluster key: refusing to forward to it\n", c.address.c_str());
            return false;
        }
        c.gate.auth.on_hello_ok(nak_frame_bytes(f.hdr, f.payload), ok.nonce);
        uint8_t proof[NAK_PROOF_SIZE];
        c.gate.auth.client_proof(proof);
        send_raw(c, nak_auth_frame(NAK_MSG_AUTH, proof));
        c.astate = conn_state::AUTH_WAIT_AUTH_OK;
        return true;
    }
    if (f.hdr.type == NAK_MSG_AUTH_OK && c.astate == conn_state::AUTH_WAIT_AUTH_OK) {
        uint8_t want[NAK_PROOF_SIZE];
        c.gate.auth.stage_proof(want);
        if (f.payload.size() != NAK_PROOF_SIZE || !nak_ct_equal(want, f.payload.data(), NAK_PROOF_SIZE)) {
            fprintf(stderr, "nak stage: next stage %s failed to prove the cluster key: refusing to forward to it\n",
                    c.address.c_str());
            return false;
        }
        c.gate.auth.establish();
        c.astate = conn_state::AUTH_DONE;
        for (auto & p : c.pending) {
            c.gate.auth.seal(p);
            send_raw(c, p);
        }
        c.pending.clear();
        c.pending_owners.clear();
        return true;
    }
    std::string msg = std::string("unexpected ") + nak_msg_type_name(f.hdr.type);
    nak_error e;
    if (f.hdr.type == NAK_MSG_ERROR && nak_decode(f.payload, e)) {
        msg = e.message;
    }
    fprintf(stderr, "nak stage: next stage %s refused the handshake: %s\n", c.address.c_str(), msg.c_str());
    return false;
}

// frames the next stage sends back on our outbound connection: HELLO_OK (AUTH_OK), or an error it
// could not deliver to the session's owner; nothing to answer
void drain_outbound(conn_state & c) {
    nak_frame f;
    while (!c.dead && c.parser.next(f) == NAK_PARSE_FRAME) {
        if (c.gate.auth.enabled && !c.gate.auth.ready) {
            if (!outbound_handshake(c, f)) {
                c.dead = true;
            }
            continue;
        }
        std::string aerr;
        if (!c.gate.auth.open(f, aerr)) {
            fprintf(stderr, "nak stage: next stage %s: %s; closing\n", c.address.c_str(), aerr.c_str());
            c.dead = true;
            break;
        }
        if (f.hdr.type == NAK_MSG_ERROR) {
            nak_error e;
            if (nak_decode(f.payload, e)) {
                fprintf(stderr, "nak stage: next stage %s: %s\n", c.address.c_str(), e.message.c_str());
            }
        }
    }
}

// whether a request of connection `id` waits in the queue or runs: its HELLO must then queue
// behind it (replies on a connection keep the order of its requests)
bool has_pending(int32_t id, const std::deque<queued_request> & queue, const compute_worker & worker) {
    for (const auto & q : queue) {
        if (q.conn == id) {
            return true;
        }
    }
    for (const auto & q : worker.running()) {
        if (q.conn == id) {
            return true;
        }
    }
    return false;
}

void read_frames(conn_state & c, std::deque<queued_request> & queue, int64_t now, const nak_stage & stage,
                 const compute_worker & worker) {
    uint8_t buf[65536];
    for (;;) {
        const ssize_t k = recv(c.fd, buf, sizeof(buf), MSG_DONTWAIT);
        if (k > 0) {
            c.parser.feed(buf, (size_t) k);
            c.t_last_ms = now;
            continue;
        }
        if (k == 0) {
            mark_gone(c, "connection closed");
        } else if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) {
            mark_gone(c, strerror(errno));
        }
        break;
    }
    if (c.outbound) {
        drain_outbound(c);
        return;
    }
    while (!c.closing) {
        queued_request q;
        const nak_parse_status st = c.parser.next(q.frame);
        if (st == NAK_PARSE_NEED_MORE) {
            break;
        }
        if (st == NAK_PARSE_BAD_MAGIC) {
            reject(c, NAK_ERR_BAD_REQUEST, "not a nakshatra frame (bad magic); is this client speaking another protocol?");
            break;
        }
        if (st == NAK_PARSE_BAD_VERSION) {
            reject(c, NAK_ERR_VERSION, "protocol version mismatch: this stage speaks v" + std::to_string(NAK_PROTO_VERSION) +
                   "; upgrade the older side");
            break;
        }
        if (st == NAK_PARSE_TOO_LARGE) {
            reject(c, NAK_ERR_TOO_LARGE, "frame larger than the limit of " + std::to_string(c.parser.max_payload) + " bytes");
            break;
        }
        if (!c.hello_seen && q.frame.hdr.type != NAK_MSG_HELLO) {
            reject(c, NAK_ERR_BAD_REQUEST, "the first frame on a connection must be HELLO");
            break;
        }
        c.hello_seen = true;
        if (c.gate.auth.enabled) {
            std::vector<uint8_t> reply;
            uint16_t             code = 0;
            std::string          aerr;
            const nak_gate_result g = c.gate.check(q.frame, reply, code, aerr);
            if (g == NAK_GATE_REJECT) {
                fprintf(stderr, "nak stage: refused a connection: %s\n", aerr.c_str());
                reject(c, code, aerr);
                break;
            }
            if (g == NAK_GATE_REPLY) {
                send_raw(c, reply);
                continue;
            }
        }
        if (q.frame.hdr.type == NAK_MSG_HELLO && !has_pending(c.id, queue, worker)) {
            // answered here, not by the compute thread: liveness and health while it computes
            send_frame(c, stage.hello_reply(q.frame));
            continue;
        }
        q.conn = c.id;
        q.t_arrival_us = nak_now_us();
        q.work = work_of(q.frame);
        queue.push_back(std::move(q));
    }
}

// the connection to the next stage at "host:port", opened (with a HELLO) on first use
conn_state * outbound_conn(std::vector<conn_state> & conns, int32_t & next_id, const std::string & address,
                           const nak_stage & stage, const std::vector<uint8_t> & key, std::string & err) {
    for (auto & c : conns) {
        if (c.outbound && c.address == address && !c.dead) {
            return &c;
        }
    }
    const size_t colon = address.rfind(':');
    if (colon == std::string::npos) {
        err = "bad next-hop address '" + address + "'";
        return nullptr;
    }
    std::string host = address.substr(0, colon);
    const int fd = nak_connect_start(host, atoi(address.c_str() + colon + 1), err);
    if (fd < 0) {
        return nullptr;
    }
    conn_state c;
    c.fd         = fd;
    c.id         = next_id++;
    c.outbound   = true;
    c.connecting = true;
    c.fail_code  = NAK_ERR_NEXT_HOP;
    c.fail_msg   = "next stage " + address + " unreachable: connection not made";
    c.address    = address;
    c.hello_seen = true;
    c.t_open_ms  = c.t_last_ms = nak_now_ms();
    c.gate.auth.set_key(key);
    nak_hello hello;
    hello.client_name       = "nakshatra-stage";
    hello.want_model_sha256 = stage.info().model_sha256;
    hello.caps              = c.gate.auth.enabled ? NAK_CAP_AUTH : 0;
    std::random_device rd;
    for (int i = 0; i < NAK_NONCE_SIZE; i++) {
        hello.nonce[i] = (uint8_t) rd();
    }
    nak_writer w;
    nak_encode(w, hello);
    nak_header h;
    h.type = NAK_MSG_HELLO;
    const std::vector<uint8_t> hello_bytes = nak_frame_bytes(h, w.buf);
    if (c.gate.auth.enabled) {
        c.parser.max_payload += NAK_MAC_SIZE;
        c.gate.auth.on_hello(hello_bytes, hello.nonce);
        c.astate = conn_state::AUTH_WAIT_HELLO_OK;
    }
    conns.push_back(std::move(c));
    send_raw(conns.back(), hello_bytes);
    return &conns.back();
}

// the requests to decode next: the queue's first, and at the first stage with batching on, the
// FORWARDs of other sessions behind it that share its route, up to --max-batch steps and n_batch
// rows. Scanning stops at the first frame that is not a FORWARD, so a CLOSE or TRUNCATE is never
// overtaken, and a session contributes at most its earliest step.
std::vector<queued_request> pick_batch(std::deque<queued_request> & queue, const nak_stage & stage, int64_t & hold_us) {
    std::vector<queued_request> picked;
    std::string route;
    const uint32_t max_batch = stage.params().max_batch;
    if (!stage.is_first() || max_batch <= 1 || !nak_stage::batchable(queue.front().frame, route)) {
        hold_us = 0;
        picked.push_back(std::move(queue.front()));
        queue.pop_front();
        return picked;
    }
    std::vector<uint64_t> seen;
    uint64_t rows = 0;
    for (auto it = queue.begin(); it != queue.end() && picked.size() < max_batch;) {
        const nak_frame & f = it->frame;
        if (f.hdr.type != NAK_MSG_FORWARD) {
            break;
        }
        const bool dup = std::find(seen.begin(), seen.end(), f.hdr.session_id) != seen.end();
        seen.push_back(f.hdr.session_id);
        std::string r;
        nak_forward fw;
        const bool ok = !dup && nak_stage::batchable(f, r) && r == route && nak_decode(f.payload, fw) &&
                        (picked.empty() || rows + fw.n_tokens <= stage.params().n_batch);
        if (!ok) {
            ++it;
            continue;
        }
        rows += fw.n_tokens;
        picked.push_back(std::move(*it));
        it = queue.erase(it);
    }
    // hold the batch while other ring sessions are due back within one trip (bounded by
    // max_hold_us from the first step's arrival): the sessions then travel together
    const int64_t now = nak_now_us();
    std::vector<uint64_t> ids;
    for (const auto & q : picked) {
        ids.push_back(q.frame.hdr.session_id);
    }
    hold_us = 0;
    const int64_t max_hold_us = (int64_t) stage.params().batch_hold_ms * 1000;
    if (max_hold_us > 0 && picked.size() < max_batch && stage.ring_due(now, ids) > 0) {
        const int64_t waited = now - picked.front().t_arrival_us;
        if (waited < max_hold_us) {
            hold_us = std::min<int64_t>(1000, max_hold_us - waited);
            for (auto it = picked.rbegin(); it != picked.rend(); ++it) {
                queue.push_front(std::move(*it));
            }
            picked.clear();
        }
    }
    return picked;
}

// send one frame the stage produced: to an accepted connection, or to the next stage by address;
// a frame that cannot reach its address turns into an error for each session it carried
// Without a cluster key nobody who sends a route is authenticated: dial only this machine, so a
// stranger's frame cannot make the stage connect anywhere on the network (--insecure lifts it)
bool may_dial(const std::string & address, const nak_server_params & params, std::string & why) {
    if (!params.key.empty() || params.insecure) {
        return true;
    }
    const size_t colon = address.rfind(':');
    std::string host = colon == std::string::npos ? address : address.substr(0, colon);
    if (host.size() >= 2 && host.front() == '[' && host.back() == ']') {
        host = host.substr(1, host.size() - 2);
    }
    if (nak_is_loopback(host)) {
        return true;
    }
    why = "refusing to forward to " + address + ": this stage has no cluster key, so it dials only loopback "
          "addresses (a route from an unauthenticated peer could point it anywhere); give every stage the same "
          "--key-file (nak keygen), or start the stages with --insecure on a network you trust";
    return false;
}

void deliver(std::vector<conn_state> & conns, int32_t & next_id, const nak_stage & stage,
             const nak_server_params & params, nak_outgoing & s) {
    const std::vector<uint8_t> & key = params.key;
    if (!s.address.empty()) {
        std::string ferr;
        if (!may_dial(s.address, params, ferr)) {
            fprintf(stderr, "nak stage: %s\n", ferr.c_str());
            for (const auto & f : s.fail_to) {
                nak_outgoing e;
                e.conn  = f.first;
                e.frame = nak_error_frame(f.second, NAK_ERR_UNAUTHORIZED, ferr);
                deliver(conns, next_id, stage, params, e);
            }
            return;
        }
        if (conn_state * dst = outbound_conn(conns, next_id, s.address, stage, key, ferr)) {
            if (dst->connecting || (dst->gate.auth.enabled && !dst->gate.auth.ready)) {
                dst->pending_owners.insert(dst->pending_owners.end(), s.fail_to.begin(), s.fail_to.end());
            }
            send_frame(*dst, s.frame);
            return;
        }
        for (const auto & f : s.fail_to) {
            nak_outgoing e;
            e.conn  = f.first;
            e.frame = nak_error_frame(f.second, NAK_ERR_NEXT_HOP, "next stage " + s.address + " unreachable: " + ferr);
            deliver(conns, next_id, stage, params, e);
        }
        return;
    }
    for (auto & c : conns) {
        if (c.id == s.conn && !c.dead) {
            send_frame(c, s.frame);
            return;
        }
    }
}

// the connect of an outbound connection finished (POLLOUT or an error on its socket)
void finish_connect(conn_state & c) {
    std::string cerr;
    if (!nak_connect_finish(c.fd, cerr)) {
        fprintf(stderr, "nak stage: next stage %s: %s\n", c.address.c_str(), cerr.c_str());
        c.fail_msg = "next stage " + c.address + " unreachable: " + cerr;
        c.dead     = true;
        return;
    }
    c.connecting = false;
    c.fail_code  = NAK_ERR_UNAUTHORIZED; // from now on only the key handshake can fail it
    c.fail_msg   = "next stage " + c.address + " did not authenticate with this stage's cluster key (none, or another key)";
    if (!c.gate.auth.enabled) {
        c.pending_owners.clear(); // the frames go out now
    }
    flush(c);
}

// PROGRESS to whoever waits on a step that runs or is queued here: the owner of its session (the
// connection that opened it; the client, also in forwarding and ring), else the requester
void send_progress(std::vector<conn_state> & conns, const nak_stage & stage, const compute_worker & worker,
                   const std::deque<queued_request> & queue) {
    std::vector<std::pair<int32_t, uint64_t>> sent; // (conn, request id)
    nak_writer w;
    w.u64(stage.progress());
    auto notify = [&](const queued_request & q) {
        for (const auto & sr : q.work) {
            const int32_t owner = sr.first != 0 ? stage.owner_conn(sr.first) : -1;
            const int32_t to    = owner >= 0 ? owner : q.conn;
            if (std::find(sent.begin(), sent.end(), std::make_pair(to, sr.second)) != sent.end()) {
                continue;
            }
            sent.emplace_back(to, sr.second);
            for (auto & c : conns) {
                if (c.id == to && !c.dead && !c.outbound && !c.closing) {
                    nak_header h;
                    h.type       = NAK_MSG_PROGRESS;
                    h.session_id = sr.first;
                    h.request_id = sr.second;
                    send_frame(c, nak_frame_bytes(h, w.buf));
                }
            }
        }
    };
    for (const auto & q : worker.running()) {
        notify(q);
    }
    for (const auto & q : queue) {
        notify(q);
    }
}

// A CONTROL request at the head of the queue, run while the worker is idle: the handler's reply
// goes to its connection. After a swap every connection closes, the requester's once its reply
// is out: their sessions, routes and HELLOs belonged to the old model, and a client that checked
// the model at HELLO must not go on with another one unawares. Returns the stage to serve.
nak_stage * run_control(const queued_request & q, nak_stage * cur, const nak_server_params & params,
                        std::vector<conn_state> & conns, std::deque<queued_request> & queue) {
    nak_stage * next = nullptr;
    std::vector<uint8_t> reply;
    nak_reader r(q.frame.payload);
    const std::string request = r.str();
    if (!params.control) {
        reply = nak_error_frame(q.frame.hdr, NAK_ERR_BAD_REQUEST,
                                "this stage takes no CONTROL requests (model swaps): it was started without them");
    } else if (!r.done()) {
        reply = nak_error_frame(q.frame.hdr, NAK_ERR_BAD_REQUEST, "malformed CONTROL payload");
    } else {
        nak_header h;
        h.type       = NAK_MSG_CONTROL_OK;
        h.request_id = q.frame.hdr.request_id;
        nak_writer w;
        w.str(params.control(request, next));
        reply = nak_frame_bytes(h, w.buf);
    }
    const bool swapped = next != nullptr && next != cur;
    for (auto & c : conns) {
        if (c.id == q.conn && !c.dead) {
            send_frame(c, reply);
            c.closing = c.closing || swapped;
            flush(c);
        }
    }
    if (!swapped) {
        return cur;
    }
    for (auto & c : conns) {
        cur->on_disconnect(c.id); // the old stage frees their sessions' KV cells
        if (c.id != q.conn) {
            c.dead = true;
        }
    }
    queue.clear();
    return next;
}

} // namespace

bool nak_serve(nak_stage & first_stage, const nak_server_params & params,
               const std::function<bool()> & should_stop,
               const std::function<void(int)> & on_ready, std::string & err) {
    const int lfd = nak_listen(params.host, params.port, 64, err);
    if (lfd < 0) {
        return false;
    }
    nak_stage * cur = &first_stage; // the stage served now (a CONTROL swap changes it)
    compute_worker worker(*cur);
    if (!worker.start(err)) {
        close(lfd);
        return false;
    }
    on_ready(nak_bound_port(lfd));

    std::vector<conn_state>     conns;
    std::deque<queued_request>  queue;
    std::vector<int32_t>        gone;   // closed connections whose sessions wait for the worker to be idle
    int32_t next_id        = 1;
    int64_t t_stop_check   = 0;
    int64_t t_expire_check = 0;
    int64_t t_progress     = 0;         // last PROGRESS round
    uint64_t progress_sent = 0;         // cur->progress() at that round
    int64_t hold_us        = 0; // the scheduler holds a batch for ring sessions due back
    std::vector<pollfd> pfds;

    for (;;) {
        const int64_t now = nak_now_ms();
        if (now - t_stop_check >= 50) {
            t_stop_check = now;
            if (should_stop()) {
                break;
            }
        }
        if (now - t_expire_check >= 1000) {
            t_expire_check = now;
            if (!worker.busy()) {
                cur->expire_idle(now);
            }
            for (auto & c : conns) {
                const bool handshaking = !c.hello_seen || (c.gate.auth.enabled && !c.gate.auth.ready);
                if (c.connecting && now - c.t_open_ms > NAK_CONNECT_TIMEOUT_MS) {
                    c.fail_msg = "next stage " + c.address + " unreachable: no connection within " +
                                 std::to_string(NAK_CONNECT_TIMEOUT_MS) + " ms";
                    c.dead = true;
                }
                if (handshaking && now - c.t_open_ms > params.handshake_timeout_ms) {
                    mark_gone(c, "no answer within " + std::to_string(params.handshake_timeout_ms) + " ms");
                } else if (now - c.t_last_ms > (int64_t) params.conn_idle_timeout_s * 1000) {
                    c.dead = true;
                }
            }
        }

        pfds.clear();
        pfds.push_back({ lfd, POLLIN, 0 });
        pfds.push_back({ worker.wake_fd(), POLLIN, 0 });
        for (const auto & c : conns) {
            short ev = c.closing || c.connecting ? 0 : POLLIN;
            if (c.connecting || c.out_off < c.out.size()) {
                ev |= POLLOUT;
            }
            pfds.push_back({ c.fd, ev, 0 });
        }
        // busy: wake for PROGRESS rounds (the wake pipe ends the wait when the job finishes)
        const int timeout_ms = worker.busy() ? 100 : queue.empty() ? 50 : hold_us > 0 ? (int) ((hold_us + 999) / 1000) : 0;
        const int rc = poll(pfds.data(), pfds.size(), timeout_ms);
        if (rc < 0 && errno != EINTR) {
            err = "poll failed";
            break;
        }

        if (pfds[0].revents & POLLIN) {
            for (;;) {
                const int fd = nak_accept(lfd);
                if (fd < 0) {
                    break;
                }
                nak_set_nodelay(fd);
                conn_state c;
                c.fd = fd;
                c.id = next_id++;
                c.parser.max_payload = params.max_payload;
                c.gate.set_key(params.key);
                if (c.gate.auth.enabled) {
                    c.parser.max_payload += NAK_MAC_SIZE; // the trailer counts in payload_len
                }
                c.t_open_ms = c.t_last_ms = nak_now_ms();
                if ((int) conns.size() >= params.max_conns) {
                    reject(c, NAK_ERR_OVERLOADED, "too many connections to this stage");
                    close(fd);
                    continue;
                }
                conns.push_back(std::move(c));
            }
        }
        const size_t n_polled = pfds.size() - 2;
        for (size_t i = 0; i < n_polled && i < conns.size(); i++) {
            conn_state & c = conns[i];
            const short rev = pfds[i + 2].revents;
            if (c.connecting) {
                if (rev & (POLLOUT | POLLERR | POLLHUP)) {
                    finish_connect(c);
                }
                continue;
            }
            if (rev & (POLLIN | POLLHUP | POLLERR)) {
                read_frames(c, queue, now, *cur, worker);
            }
            if (rev & POLLOUT) {
                flush(c);
            }
        }

        // the compute thread finished a job: send what it produced
        {
            std::vector<nak_outgoing> out;
            std::vector<queued_request> done;
            int32_t from = -1;
            bool close_conn = false;
            if (worker.collect(out, done, from, close_conn)) {
                // a decode step's time here, from its arrival to its frames ready to send (nak
                // bench's where-the-time-goes). Stamped before sending: on shared cores the send
                // wakes the next stage, which may take the CPU from this thread for milliseconds
                // before the send returns, though its frame has already arrived.
                const int64_t t_ready = nak_now_us();
                for (const auto & q : done) {
                    for (const auto & sr : q.work) {
                        cur->note_done(sr.first, q.t_arrival_us, t_ready);
                    }
                }
                for (auto & s : out) {
                    deliver(conns, next_id, *cur, params, s);
                }
                for (auto & c : conns) {
                    if (c.id == from) {
                        c.closing = c.closing || close_conn;
                    }
                }
            }
        }
        if (!worker.busy()) {
            for (int32_t id : gone) {
                cur->on_disconnect(id);
            }
            gone.clear();
        }

        // a CONTROL request runs here, between jobs, in queue order (a swap needs the compute
        // thread idle: it changes the stage the thread computes with)
        while (!worker.busy() && !queue.empty() && queue.front().frame.hdr.type == NAK_MSG_CONTROL) {
            const queued_request q = std::move(queue.front());
            queue.pop_front();
            nak_stage * next = run_control(q, cur, params, conns, queue);
            if (next != cur) {
                cur = next;
                worker.set_stage(*cur);
            }
        }

        // scheduler: first come first served; at the first stage, forwarded steps of several
        // sessions waiting together are decoded as one batch (continuous batching)
        if (!worker.busy() && !queue.empty()) {
            std::vector<queued_request> picked = pick_batch(queue, *cur, hold_us);
            if (!picked.empty()) {
                cur->queue_depth = (uint32_t) queue.size();
                worker.submit(std::move(picked));
                t_progress = nak_now_ms();
            }
        }
        cur->queue_depth = (uint32_t) queue.size();

        // busy and advancing: tell whoever waits on a running or queued step, so a long
        // computation is waited for; a stalled one (hung, or its host stopped) sends nothing
        if (worker.busy()) {
            const int64_t t = nak_now_ms();
            const uint64_t p = cur->progress();
            if (t - t_progress >= NAK_PROGRESS_INTERVAL_MS && p != progress_sent) {
                send_progress(conns, *cur, worker, queue);
                t_progress    = t;
                progress_sent = p;
            }
        }

        // drop dead connections: free their sessions' KV (once the worker is idle) and their
        // queued requests
        {
        std::vector<nak_outgoing> refused; // steps held for a next stage never reached or never authenticated
        for (size_t i = 0; i < conns.size();) {
            if (!conns[i].dead) {
                i++;
                continue;
            }
            for (const auto & f : conns[i].pending_owners) {
                nak_outgoing e;
                e.conn  = f.first;
                e.frame = nak_error_frame(f.second, conns[i].fail_code, conns[i].fail_msg);
                refused.push_back(std::move(e));
            }
            const int32_t id = conns[i].id;
            if (worker.busy()) {
                gone.push_back(id);
            } else {
                cur->on_disconnect(id);
            }
            close(conns[i].fd);
            for (auto it = queue.begin(); it != queue.end();) {
                it = it->conn == id ? queue.erase(it) : it + 1;
            }
            conns.erase(conns.begin() + i);
        }
        for (auto & e : refused) {
            deliver(conns, next_id, *cur, params, e);
        }
        }
    }
    worker.stop();
    for (int32_t id : gone) {
        cur->on_disconnect(id);
    }
    for (auto & c : conns) {
        cur->on_disconnect(c.id);
        close(c.fd);
    }
    close(lfd);
    return err.empty();
}
