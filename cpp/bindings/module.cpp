// nakshatra._nakshatra: the stage (executor + event loop), the protocol client, and the reference
// runner, bound for Python. Every call that computes or waits on the network releases the GIL.
#include "memory_estimate.h"
#include "net.h"
#include "protocol.h"
#include "reference.h"
#include "server.h"
#include "stage.h"

#include "ggml-backend.h"
#include "llama.h"

#include <pybind11/functional.h>
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <atomic>
#include <cerrno>
#include <poll.h>
#include <cstdio>
#include <cstring>
#include <memory>
#include <chrono>
#include <optional>
#include <random>

namespace py = pybind11;

#ifndef NAK_LLAMA_COMMIT
#define NAK_LLAMA_COMMIT "unknown"
#endif
#ifndef NAK_PATCHES
#define NAK_PATCHES ""
#endif
#ifndef NAK_PATCH_HASH
#define NAK_PATCH_HASH "unknown"
#endif

namespace {

std::atomic<int> g_log_level{ GGML_LOG_LEVEL_WARN };

void log_callback(ggml_log_level level, const char * text, void *) {
    // CONT continues the previous line: keep it when that line was shown
    static bool last_shown = false;
    const bool show = level == GGML_LOG_LEVEL_CONT ? last_shown : (int) level >= g_log_level.load();
    last_shown = show;
    if (show) {
        fputs(text, stderr);
    }
}

void ensure_backend() {
    static bool done = false;
    if (!done) {
        llama_log_set(log_callback, nullptr);
        llama_backend_init();
        done = true;
    }
}

[[noreturn]] void raise_stage_error(const std::string & msg, const std::string & code) {
    py::object cls = py::module_::import("nakshatra.errors").attr("StageError");
    py::object exc = cls(msg, code);
    PyErr_SetObject(cls.ptr(), exc.ptr());
    throw py::error_already_set();
}

// HELLO_OK as a Python dict (health counters under "health")
py::dict hello_dict(const nak_hello_ok & ok) {
    py::dict d;
    d["version"]      = ok.version;
    d["caps"]         = ok.caps;
    d["model_sha256"] = ok.model_sha256;
    d["arch"]         = ok.arch;
    d["layer_start"]  = ok.layer_start;
    d["layer_end"]    = ok.layer_end;
    d["n_layer_full"] = ok.n_layer_full;
    d["n_embd"]       = ok.n_embd;
    d["n_vocab"]      = ok.n_vocab;
    d["backend"]      = ok.backend;
    py::dict hd;
    hd["sessions_active"] = ok.health.sessions_active;
    hd["max_sessions"]    = ok.health.max_sessions;
    hd["queue_depth"]     = ok.health.queue_depth;
    hd["n_ctx_session"]   = ok.health.n_ctx_session;
    hd["kv_tokens_used"]  = ok.health.kv_tokens_used;
    hd["rss_bytes"]       = ok.health.rss_bytes;
    hd["uptime_ms"]       = ok.health.uptime_ms;
    hd["tokens_in"]       = ok.health.tokens_in;
    hd["cpu_ms"]          = ok.health.cpu_ms;
    hd["mem_available_bytes"] = ok.health.mem_available_bytes;
    hd["layers_per_s"]    = ok.health.layers_per_s;
    hd["busy_ms"]         = ok.health.busy_ms;
    hd["stalled_ms"]      = ok.health.stalled_ms;
    hd["progress"]        = ok.health.progress;
    hd["rss_anon_bytes"]  = ok.health.rss_anon_bytes;
    hd["rss_file_bytes"]  = ok.health.rss_file_bytes;
    d["health"] = hd;
    d["rss_bytes"] = ok.health.rss_bytes;
    return d;
}

// a Python-facing client of one stage
struct py_stage_client {
    nak_client  c;
    std::string host;
    int         port = 0;

    py_stage_client(const std::string & host_, int port_, int timeout_ms, int connect_timeout_ms, const py::bytes & key)
        : host(host_), port(port_) {
        c.timeout_ms = timeout_ms;
        const std::string k = key;
        if (!k.empty() && k.size() != NAK_KEY_SIZE) {
            throw py::value_error("a cluster key is " + std::to_string(NAK_KEY_SIZE) + " bytes");
        }
        c.auth.set_key(std::vector<uint8_t>(k.begin(), k.end()));
        std::string err;
        bool ok;
        {
            py::gil_scoped_release nogil;
            ok = c.connect(host, port, connect_timeout_ms, err);
        }
        if (!ok) {
            raise_stage_error(host + ":" + std::to_string(port) + ": " + err +
                              " (is `nak serve` running there, and the port right?)", "transport");
        }
    }

    std::string where() const { return host + ":" + std::to_string(port); }

    // send and receive; raise StageError on transport failure or an ERROR reply
    nak_frame call(uint8_t type, uint64_t session, uint8_t dtype, const std::vector<uint8_t> & payload, uint8_t expect) {
        nak_frame reply;
        std::string err;
        bool ok;
        {
            py::gil_scoped_release nogil;
            ok = c.call(type, session, dtype, payload, reply, err);
        }
        if (!ok) {
            raise_stage_error(where() + ": " + err, "transport");
        }
        if (reply.hdr.type == NAK_MSG_ERROR) {
            nak_error e;
            if (!nak_decode(reply.payload, e)) {
                raise_stage_error(where() + ": malformed ERROR reply", "transport");
            }
            raise_stage_error(where() + ": " + e.message, nak_error_code_name(e.code));
        }
        if (reply.hdr.type != expect) {
            raise_stage_error(where() + ": unexpected reply " + nak_msg_type_name(reply.hdr.type), "transport");
        }
        return reply;
    }

    py::dict hello(const std::string & client_name, const std::string & want_model_sha256) {
        nak_hello m;
        m.caps        = 0; // nak_client::hello adds NAK_CAP_AUTH with a key
        m.client_name = client_name;
        m.want_model_sha256 = want_model_sha256;
        std::random_device rd; // the nonce matters once the handshake authenticates
        for (int i = 0; i < NAK_NONCE_SIZE; i++) {
            m.nonce[i] = (uint8_t) rd();
        }
        nak_frame r;
        std::string err;
        bool ok_io, unauthorized = false;
        {
            py::gil_scoped_release nogil;
            ok_io = c.hello(m, r, unauthorized, err);
        }
        if (!ok_io) {
            raise_stage_error(where() + ": " + err, unauthorized ? "unauthorized" : "transport");
        }
        if (r.hdr.type == NAK_MSG_ERROR) {
            nak_error e;
            nak_decode(r.payload, e);
            raise_stage_error(where() + ": " + e.message, nak_error_code_name(e.code));
        }
        nak_hello_ok ok;
        if (!nak_decode(r.payload, ok)) {
            raise_stage_error(where() + ": malformed HELLO_OK", "transport");
        }
        return hello_dict(ok);
    }

    // (positions the stage holds for the session, its KV sequence id)
    py::tuple open(uint64_t session, float temp, int32_t top_k, float top_p, float min_p, float repeat_penalty,
                   int32_t repeat_last_n, uint32_t seed, int32_t n_predict, const std::vector<int32_t> & stop_tokens,
                   int32_t seq, bool ignore_eog, bool reuse, uint64_t token, int32_t draft_max) {
        nak_open m;
        m.draft_max  = draft_max;
        m.token      = token;
        m.ignore_eog = ignore_eog ? 1 : 0;
        m.reuse      = reuse ? 1 : 0;
        m.sampler = { temp, top_k, top_p, min_p, repeat_penalty, repeat_last_n, seed };
        m.n_predict = n_predict;
        m.stop_tokens = stop_tokens;
        m.seq = seq;
        nak_writer w;
        nak_encode(w, m);
        nak_frame r = call(NAK_MSG_OPEN, session, NAK_DTYPE_NONE, w.buf, NAK_MSG_OPEN_OK);
        nak_reader rd(r.payload);
        const uint32_t n_ctx = rd.u32();
        const int32_t  got   = rd.i32();
        return py::make_tuple(n_ctx, got);
    }

    static std::vector<uint8_t> forward_payload(uint64_t step, const std::vector<int32_t> & pos,
                                                const std::optional<std::vector<int32_t>> & tokens,
                                                const std::optional<py::bytes> & embd, bool sample,
                                                const std::string & next_hop, const std::string & ring = "",
                                                uint64_t token = 0, bool spec = false) {
        nak_forward f;
        f.token    = token;
        f.step     = step;
        f.n_tokens = (uint32_t) pos.size();
        f.pos      = pos;
        f.next_hop = next_hop;
        f.ring     = ring;
        if (!ring.empty()) {
            f.flags |= NAK_FWD_RING;
        }
        std::string embd_buf;
        if (tokens) {
            if (tokens->size() != pos.size()) {
                throw py::value_error("tokens and positions differ in length");
            }
            f.flags |= NAK_FWD_TOKENS;
            f.tokens = *tokens;
        }
        if (embd) {
            embd_buf = *embd;
            f.flags |= NAK_FWD_EMBD;
            f.embd       = (const uint8_t *) embd_buf.data();
            f.embd_bytes = embd_buf.size();
        }
        if (sample) {
            f.flags |= NAK_FWD_SAMPLE;
        }
        if (spec) {
            f.flags |= NAK_FWD_SPEC;
        }
        nak_writer w;
        nak_encode(w, f);
        return std::move(w.buf);
    }

    py::dict forward(uint64_t session, uint64_t step, const std::vector<int32_t> & pos,
                     const std::optional<std::vector<int32_t>> & tokens, const std::optional<py::bytes> & embd,
                     bool sample, uint8_t dtype, bool spec) {
        const std::vector<uint8_t> payload = forward_payload(step, pos, tokens, embd, sample, "", "", 0, spec);
        nak_frame r = call(NAK_MSG_FORWARD, session, embd ? dtype : (uint8_t) NAK_DTYPE_NONE, payload, NAK_MSG_FORWARD_OK);
        py::dict d = forward_ok_dict(r);
        d["wire_bytes"] = (uint64_t) (NAK_HEADER_SIZE * 2 + payload.size() + r.payload.size());
        return d;
    }

    // forwarding: send a FORWARD whose hidden state travels stage to stage along `route` (the
    // addresses after this stage, comma separated); the reply comes from the last stage, see
    // wait_forward_ok. Returns the bytes sent.
    uint64_t send_forward(uint64_t session, uint64_t step, const std::vector<int32_t> & pos,
                          const std::vector<int32_t> & tokens, bool sample, const std::string & route,
                          const std::string & ring, uint64_t token, bool spec) {
        const std::vector<uint8_t> payload = forward_payload(step, pos, tokens, std::nullopt, sample, route, ring, token, spec);
        nak_header h;
        h.type       = NAK_MSG_FORWARD;
        h.session_id = session;
        h.request_id = nak_client::new_request_id();
        last_request_id = h.request_id;
        std::vector<uint8_t> frame = nak_frame_bytes(h, payload);
        c.auth.seal(frame);
        std::string err;
        bool ok;
        {
            py::gil_scoped_release nogil;
            ok = nak_send_all(c.fd, frame.data(), frame.size(), c.timeout_ms, err);
        }
        if (!ok) {
            c.close();
            raise_stage_error(where() + ": " + err, "transport");
        }
        return frame.size();
    }

    py::dict forward_ok_dict(const nak_frame & r) {
        nak_forward_ok ok;
        if (!nak_decode(r.payload, ok)) {
            raise_stage_error(where() + ": malformed FORWARD_OK", "transport");
        }
        py::dict d;
        d["step"]       = ok.step;
        d["n_tokens"]   = ok.n_tokens;
        d["n_past"]     = ok.n_past;
        d["compute_us"] = ok.compute_us;
        d["token"]      = ok.token;
        d["is_eog"]     = ok.is_eog != 0;
        d["piece"]      = py::bytes(ok.piece);
        d["embd"]       = ok.embd_bytes ? py::bytes((const char *) ok.embd, ok.embd_bytes) : py::bytes();
        d["dtype"]      = r.hdr.dtype; // of embd (the sending stage's --wire)
        if (ok.spec) {
            py::list pieces;
            for (const auto & p : ok.pieces) {
                pieces.append(py::bytes(p));
            }
            d["tokens"]      = ok.tokens;
            d["pieces"]      = pieces;
            d["drafts"]      = ok.drafts;
            d["next_drafts"] = ok.next_drafts;
        }
        return d;
    }

    py::tuple truncate(uint64_t session, int32_t pos, int64_t next_step, int32_t n_generated) {
        nak_writer w;
        w.i32(pos);
        if (next_step >= 0) {
            w.u64((uint64_t) next_step);
            if (n_generated >= 0) {
                w.i32(n_generated);
            }
        }
        nak_frame r = call(NAK_MSG_TRUNCATE, session, NAK_DTYPE_NONE, w.buf, NAK_MSG_TRUNCATE_OK);
        nak_reader rd(r.payload);
        const uint32_t n_past = rd.u32();
        const uint64_t step = rd.u64();
        return py::make_tuple(n_past, step);
    }

    bool close_session(uint64_t session) {
        nak_frame r = call(NAK_MSG_CLOSE, session, NAK_DTYPE_NONE, {}, NAK_MSG_CLOSE_OK);
        return !r.payload.empty() && r.payload[0] != 0;
    }

    std::string stats() {
        nak_frame r = call(NAK_MSG_STATS, 0, NAK_DTYPE_NONE, {}, NAK_MSG_STATS_OK);
        nak_reader rd(r.payload);
        return rd.str();
    }

    std::vector<int32_t> tokenize(const std::string & text, bool add_special, bool parse_special) {
        nak_writer w;
        w.str(text);
        w.u8(add_special);
        w.u8(parse_special);
        nak_frame r = call(NAK_MSG_TOKENIZE, 0, NAK_DTYPE_NONE, w.buf, NAK_MSG_TOKENIZE_OK);
        nak_reader rd(r.payload);
        return rd.i32s();
    }

    py::bytes detokenize(const std::vector<int32_t> & tokens, bool special) {
        nak_writer w;
        w.i32s(tokens);
        w.u8(special);
        nak_frame r = call(NAK_MSG_DETOKENIZE, 0, NAK_DTYPE_NONE, w.buf, NAK_MSG_DETOKENIZE_OK);
        nak_reader rd(r.payload);
        return py::bytes(rd.str());
    }

    std::string apply_template(const std::vector<std::pair<std::string, std::string>> & msgs, bool add_assistant) {
        nak_writer w;
        w.u32((uint32_t) msgs.size());
        for (const auto & m : msgs) {
            w.str(m.first);
            w.str(m.second);
        }
        w.u8(add_assistant);
        nak_frame r = call(NAK_MSG_TEMPLATE, 0, NAK_DTYPE_NONE, w.buf, NAK_MSG_TEMPLATE_OK);
        nak_reader rd(r.payload);
        return rd.str();
    }

    void close() { c.close(); }

    uint64_t last_request_id = 0; // of the last send_forward
};

// Wait for the reply to a forwarded step: FORWARD_OK from the last stage, or an ERROR from any
// stage (each answers errors to the session's owner, i.e. this client). Raises StageError naming
// the stage, or on timeout.
// The wait ends timeout_ms after the last sign of life for this step: a stage computing it (or
// holding it behind a computation that advances) sends PROGRESS frames with its request id, each
// of which restarts the wait, so a slow stage is waited for and a hung or stopped one is not.
py::dict wait_forward_ok(const std::vector<py_stage_client *> & clients, int timeout_ms, uint64_t min_request_id) {
    auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
  again:
    std::vector<pollfd> pfds;
    for (auto * c : clients) {
        pfds.push_back({ c->c.fd, POLLIN, 0 });
    }
    int rc;
    {
        py::gil_scoped_release nogil;
        do {
            const int left = (int) std::chrono::duration_cast<std::chrono::milliseconds>(
                deadline - std::chrono::steady_clock::now()).count();
            rc = poll(pfds.data(), pfds.size(), std::max(0, left));
        } while (rc < 0 && errno == EINTR);
    }
    if (rc <= 0) {
        raise_stage_error("no reply and no progress from the chain within " + std::to_string(timeout_ms) + " ms", "timeout");
    }
    for (size_t i = 0; i < pfds.size(); i++) {
        if (!(pfds[i].revents & (POLLIN | POLLHUP | POLLERR))) {
            continue;
        }
        py_stage_client * c = clients[i];
        nak_frame r;
        std::string err;
        bool ok;
        {
            py::gil_scoped_release nogil;
            uint8_t hdr[NAK_HEADER_SIZE];
            ok = nak_recv_exact(c->c.fd, hdr, NAK_HEADER_SIZE, c->c.timeout_ms, err) && nak_header_decode(hdr, r.hdr) &&
                 r.hdr.payload_len <= c->c.max_payload + NAK_MAC_SIZE;
            if (ok) {
                r.payload.resize(r.hdr.payload_len);
                ok = nak_recv_exact(c->c.fd, r.payload.data(), r.payload.size(), c->c.timeout_ms, err) &&
                     c->c.auth.open(r, err); // MAC checked and stripped once authenticated
            }
        }
        if (!ok) {
            c->c.close();
            raise_stage_error(c->where() + ": " + (err.empty() ? "bad frame" : err), "transport");
        }
        if (r.hdr.request_id != 0 && r.hdr.request_id < min_request_id) {
            goto again; // the reply, error or progress of an earlier step that failed half-way
        }
        if (r.hdr.type == NAK_MSG_PROGRESS) {
            if (r.hdr.request_id != 0) {
                deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
            }
            goto again;
        }
        if (r.hdr.type == NAK_MSG_ERROR) {
            nak_error e;
            nak_decode(r.payload, e);
            raise_stage_error(c->where() + ": " + e.message, nak_error_code_name(e.code));
        }
        if (r.hdr.type != NAK_MSG_FORWARD_OK) {
            raise_stage_error(c->where() + ": unexpected reply " + nak_msg_type_name(r.hdr.type), "transport");
        }
        py::dict d = c->forward_ok_dict(r);
        d["wire_bytes"] = (uint64_t) (NAK_HEADER_SIZE + r.payload.size());
        return d;
    }
    raise_stage_error("poll reported no readable stage", "transport");
}

// the llama.cpp-facing part of a stage's parameters (what its model and context are built from),
// shared by a stage and its memory estimate
static nak_stage_params llama_params(const std::string & path, uint32_t n_ctx, uint32_t max_sessions, uint32_t n_batch,
                                     uint32_t n_ubatch, int32_t n_gpu_layers, int32_t flash_attn,
                                     const std::string & cache_type_k, const std::string & cache_type_v,
                                     bool no_repack, bool mlock, bool swa_full) {
    nak_stage_params p;
    p.model_path    = path;
    p.n_ctx_session = n_ctx;
    p.max_sessions  = max_sessions;
    p.n_batch       = n_batch;
    p.n_ubatch      = n_ubatch;
    p.n_gpu_layers  = n_gpu_layers;
    p.flash_attn    = flash_attn;
    p.cache_type_k  = cache_type_k;
    p.cache_type_v  = cache_type_v;
    p.no_repack     = no_repack;
    p.mlock         = mlock;
    p.swa_full      = swa_full;
    return p;
}

struct py_stage {
    std::unique_ptr<nak_stage> st;

    py_stage(const std::string & path, const std::string & model_sha256, uint32_t n_ctx, uint32_t max_sessions,
             int32_t n_threads, int32_t n_threads_batch, int32_t n_gpu_layers, int32_t flash_attn, const std::string & cache_type_k,
             const std::string & cache_type_v, uint32_t n_batch, uint32_t n_ubatch, uint32_t idle_timeout_s,
             uint32_t max_batch, const std::string & wire, const std::string & batch_log, int32_t poll, bool cpu_strict,
             const std::string & cpu_lock, uint32_t batch_hold_ms, bool no_repack, bool mlock, bool swa_full) {
        ensure_backend();
        nak_stage_params p = llama_params(path, n_ctx, max_sessions, n_batch, n_ubatch, n_gpu_layers, flash_attn,
                                          cache_type_k, cache_type_v, no_repack, mlock, swa_full);
        p.model_sha256   = model_sha256;
        p.n_threads      = n_threads;
        p.n_threads_batch = n_threads_batch;
        p.idle_timeout_s = idle_timeout_s;
        p.max_batch      = max_batch;
        p.wire           = wire;
        p.batch_log      = batch_log;
        p.poll           = poll;
        p.cpu_strict     = cpu_strict;
        p.cpu_lock       = cpu_lock;
        p.batch_hold_ms  = batch_hold_ms;
        st = std::make_unique<nak_stage>();
        std::string err;
        bool ok;
        {
            py::gil_scoped_release nogil;
            ok = st->load(p, err);
        }
        if (!ok) {
            raise_stage_error(err, "load");
        }
    }

    // serve until a signal handler raises (SIGINT -> KeyboardInterrupt) or stop() is called
    void serve(const std::string & host, int port, const std::function<void(int)> & on_ready, uint32_t max_payload,
               const py::bytes & key, bool insecure) {
        nak_server_params sp;
        sp.insecure = insecure;
        const std::string k = key;
        if (!k.empty() && k.size() != NAK_KEY_SIZE) {
            throw py::value_error("a cluster key is " + std::to_string(NAK_KEY_SIZE) + " bytes");
        }
        sp.key.assign(k.begin(), k.end());
        sp.host        = host;
        sp.port        = port;
        sp.max_payload = max_payload;
        bool interrupted = false;
        std::string err;
        bool ok;
        {
            py::gil_scoped_release nogil;
            auto should_stop = [&]() {
                py::gil_scoped_acquire gil;
                if (PyErr_CheckSignals() != 0) {
                    interrupted = true;
                    return true;
                }
                return stop_flag.load();
            };
            auto ready = [&](int p) {
                py::gil_scoped_acquire gil;
                on_ready(p);
            };
            ok = nak_serve(*st, sp, should_stop, ready, err);
        }
        if (interrupted) {
            throw py::error_already_set();
        }
        if (!ok) {
            raise_stage_error(err, "listen");
        }
    }

    std::atomic<bool> stop_flag{ false };
};

struct py_reference {
    nak_reference ref;

    py_reference(const std::string & path, uint32_t n_ctx, uint32_t n_batch, uint32_t n_ubatch, int32_t n_threads,
                 const std::vector<int> & capture_layers, uint32_t n_seq_max, bool swa_full, int32_t poll) {
        ensure_backend();
        std::string err;
        bool ok;
        {
            py::gil_scoped_release nogil;
            ok = ref.load(path, n_ctx, n_batch, n_ubatch, n_threads, capture_layers, err, n_seq_max, swa_full, poll);
        }
        if (!ok) {
            raise_stage_error(err, "load");
        }
    }

    std::vector<int32_t> generate(const std::vector<int32_t> & prompt, int32_t n_predict, float temp, int32_t top_k,
                                  float top_p, float min_p, float repeat_penalty, int32_t repeat_last_n, uint32_t seed) {
        nak_sampler_params sp{ temp, top_k, top_p, min_p, repeat_penalty, repeat_last_n, seed };
        std::string err;
        std::vector<int32_t> out;
        {
            py::gil_scoped_release nogil;
            out = ref.generate(prompt, n_predict, sp, err);
        }
        if (!err.empty()) {
            raise_stage_error(err, "internal");
        }
        return out;
    }

    std::vector<int32_t> decode_batch(const std::vector<int32_t> & seq, const std::vector<int32_t> & pos,
                                      const std::vector<int32_t> & tokens, const std::vector<int32_t> & sample) {
        if (seq.size() != pos.size() || pos.size() != tokens.size() || tokens.size() != sample.size()) {
            throw py::value_error("seq, pos, tokens and sample must have one entry per row");
        }
        std::string err;
        std::vector<int32_t> out;
        {
            py::gil_scoped_release nogil;
            out = ref.decode_batch(seq, pos, tokens, sample, err);
        }
        if (!err.empty()) {
            raise_stage_error(err, "internal");
        }
        return out;
    }

    py::array_t<float> last_logits() const {
        const py::ssize_t n_vocab = llama_vocab_n_tokens(ref.vocab);
        const py::ssize_t n_rows  = (py::ssize_t) (ref.last_logits.size() / (size_t) n_vocab);
        return py::array_t<float>({ n_rows, n_vocab }, ref.last_logits.data()); // a copy
    }

    py::array_t<float> step_logits(const std::vector<int32_t> & prompt, const std::vector<int32_t> & continuation) {
        auto * rows = new std::vector<float>();
        // owns the rows once the array exists; frees them on every error path before that
        py::capsule owner(rows, [](void * p) { delete (std::vector<float> *) p; });
        std::string err;
        bool bad_input = false;
        bool ok;
        {
            py::gil_scoped_release nogil;
            ok = ref.step_logits(prompt, continuation, *rows, bad_input, err);
        }
        if (!ok) {
            if (bad_input) {
                throw py::value_error(err);
            }
            raise_stage_error(err, "internal");
        }
        const py::ssize_t n_vocab = llama_vocab_n_tokens(ref.vocab);
        const py::ssize_t n_rows  = (py::ssize_t) (rows->size() / (size_t) n_vocab);
        return py::array_t<float>({ n_rows, n_vocab }, rows->data(), owner);
    }

    py::tuple time_run(const std::vector<int32_t> & prompt, int32_t n_decode) {
        int64_t prefill_us = 0, decode_us = 0;
        std::string err;
        bool ok;
        {
            py::gil_scoped_release nogil;
            ok = ref.time_run(prompt, n_decode, prefill_us, decode_us, err);
        }
        if (!ok) {
            raise_stage_error(err, "internal");
        }
        return py::make_tuple(prefill_us, decode_us);
    }

    py::bytes captured(int layer) const {
        auto it = ref.captured.find(layer);
        if (it == ref.captured.end()) {
            return py::bytes();
        }
        return py::bytes((const char *) it->second.data(), it->second.size() * sizeof(float));
    }

    std::vector<int32_t> tokenize(const std::string & text, bool add_special, bool parse_special) const {
        std::vector<llama_token> toks(text.size() + 8);
        int32_t n = llama_tokenize(ref.vocab, text.data(), (int32_t) text.size(), toks.data(), (int32_t) toks.size(),
                                   add_special, parse_special);
        if (n < 0) {
            toks.resize(-n);
            n = llama_tokenize(ref.vocab, text.data(), (int32_t) text.size(), toks.data(), (int32_t) toks.size(),
                               add_special, parse_special);
        }
        toks.resize(std::max(0, n));
        return toks;
    }
};

// nak_estimate_memory as a dict (bytes; buffers: one dict per llama.cpp buffer type)
py::dict estimate_memory(const std::string & model_path, uint32_t n_ctx, uint32_t max_sessions, uint32_t n_batch,
                         uint32_t n_ubatch, int32_t n_gpu_layers, int32_t flash_attn, const std::string & cache_type_k,
                         const std::string & cache_type_v, bool no_repack, bool mlock, bool swa_full) {
    ensure_backend();
    nak_stage_params p = llama_params(model_path, n_ctx, max_sessions, n_batch, n_ubatch, n_gpu_layers, flash_attn,
                                      cache_type_k, cache_type_v, no_repack, mlock, swa_full);
    // one thread: the estimate computes nothing, and the thread count changes no buffer size
    p.n_threads       = 1;
    p.n_threads_batch = 1;
    nak_memory_estimate e;
    std::string err;
    bool ok;
    {
        py::gil_scoped_release nogil;
        ok = nak_estimate_memory(p, e, err);
    }
    if (!ok) {
        raise_stage_error(err, "load");
    }
    py::dict d;
    d["arch"]            = e.arch;
    d["layer_start"]     = e.layer_start;
    d["layer_end"]       = e.layer_end;
    d["n_layer_full"]    = e.n_layer_full;
    d["is_first"]        = e.is_first;
    d["is_last"]         = e.is_last;
    d["n_ctx"]           = e.n_ctx;
    d["n_seq_max"]       = e.n_seq_max;
    d["n_batch"]         = e.n_batch;
    d["n_ubatch"]        = e.n_ubatch;
    d["n_embd"]          = e.n_embd;
    d["n_embd_out"]      = e.n_embd_out;
    d["n_vocab"]         = e.n_vocab;
    d["output_bytes"]    = e.output_bytes;
    d["output_rows_max"] = e.output_rows_max;
    d["heap_bytes"]      = e.heap_bytes;
    d["heap_known"]      = e.heap_known;
    py::list bufs;
    for (const auto & b : e.buffers) {
        py::dict bd;
        bd["name"]    = b.name;
        bd["host"]    = b.host;
        bd["mapped"]  = b.mapped;
        bd["model"]   = b.model;
        bd["context"] = b.context;
        bd["compute"] = b.compute;
        bufs.append(bd);
    }
    d["buffers"] = bufs;
    return d;
}

py::dict build_info() {
    ensure_backend();
    py::dict d;
    d["backend"]          = NAK_BACKEND_NAME;
    d["llama_commit"]     = NAK_LLAMA_COMMIT;
    d["patch_hash"]       = NAK_PATCH_HASH;
    d["patches"]          = std::string(NAK_PATCHES);
    d["protocol_version"] = NAK_PROTO_VERSION;
    py::list regs;
    for (size_t i = 0; i < ggml_backend_reg_count(); i++) {
        regs.append(ggml_backend_reg_name(ggml_backend_reg_get(i)));
    }
    d["ggml_backends"] = regs;
    d["system_info"]   = llama_print_system_info();
    return d;
}

} // namespace

PYBIND11_MODULE(_nakshatra, m) {
    m.doc() = "Nakshatra core: stage executor and event loop, protocol client, reference runner";

    m.attr("PROTOCOL_VERSION") = NAK_PROTO_VERSION;
    m.attr("STAGE_DRAFT_MAX") = NAK_STAGE_DRAFT_MAX; // most draft tokens a stage verifies per window
    m.attr("HEADER_SIZE")      = NAK_HEADER_SIZE;
    m.attr("MAX_PAYLOAD")      = NAK_MAX_PAYLOAD_DEFAULT;

    m.def("build_info", &build_info, "Compiled backend, llama.cpp commit, patch-set hash, protocol version.");
    m.def("set_log_level", [](int level) { g_log_level = level; },
          "llama.cpp log threshold: 1 debug, 2 info, 3 warn (default), 4 error.");
    m.def("estimate_memory", &estimate_memory, py::arg("model_path"), py::arg("n_ctx") = 4096,
          py::arg("max_sessions") = 8, py::arg("n_batch") = 2048, py::arg("n_ubatch") = 512,
          py::arg("n_gpu_layers") = -1, py::arg("flash_attn") = -1, py::arg("cache_type_k") = "f16",
          py::arg("cache_type_v") = "f16", py::arg("no_repack") = false, py::arg("mlock") = false,
          py::arg("swa_full") = false,
          "What llama.cpp allocates for a stage serving model_path with these parameters, without "
          "allocating it (cpp/stage/memory_estimate.h): a dict of bytes. Raises StageError (code "
          "'load') for a missing or non-GGUF file, bad parameters, or a model llama.cpp cannot load.");
    m.def("is_loopback", &nak_is_loopback, "Whether a host name or address is loopback.");
    m.def("hmac_sha256", [](const py::bytes & key, const py::bytes & data) {
              const std::string k = key, d = data;
              uint8_t out[32];
              nak_hmac_sha256((const uint8_t *) k.data(), k.size(), (const uint8_t *) d.data(), d.size(), out);
              return py::bytes((const char *) out, 32);
          }, py::arg("key"), py::arg("data"), "HMAC-SHA256 as the handshake computes it (tests).");
    m.def("wait_forward_ok", &wait_forward_ok, py::arg("clients"), py::arg("timeout_ms"), py::arg("min_request_id") = 0,
          "Wait for a forwarded step's FORWARD_OK (last stage) or an ERROR (any stage).");

    py::class_<py_stage>(m, "Stage", "One loaded slice and its llama_context (see cpp/stage/stage.h).")
        .def(py::init<const std::string &, const std::string &, uint32_t, uint32_t, int32_t, int32_t, int32_t, int32_t,
                      const std::string &, const std::string &, uint32_t, uint32_t, uint32_t, uint32_t,
                      const std::string &, const std::string &, int32_t, bool, const std::string &, uint32_t, bool,
                      bool, bool>(),
             py::arg("model_path"), py::arg("model_sha256") = "", py::arg("n_ctx") = 4096, py::arg("max_sessions") = 8,
             py::arg("n_threads") = 0, py::arg("n_threads_batch") = 0, py::arg("n_gpu_layers") = -1, py::arg("flash_attn") = -1,
             py::arg("cache_type_k") = "f16", py::arg("cache_type_v") = "f16", py::arg("n_batch") = 2048,
             py::arg("n_ubatch") = 512, py::arg("idle_timeout_s") = 600, py::arg("max_batch") = 8,
             py::arg("wire") = "f32", py::arg("batch_log") = "", py::arg("poll") = 0, py::arg("cpu_strict") = false,
             py::arg("cpu_lock") = "", py::arg("batch_hold_ms") = 0, py::arg("no_repack") = false,
             py::arg("mlock") = false, py::arg("swa_full") = false)
        .def("serve", &py_stage::serve, py::arg("host"), py::arg("port"), py::arg("on_ready"),
             py::arg("max_payload") = NAK_MAX_PAYLOAD_DEFAULT, py::arg("key") = py::bytes(), py::arg("insecure") = false,
             "Run the event loop until SIGINT/SIGTERM raises or stop() is called; on_ready(port) once listening. "
             "Without a key the stage forwards only to loopback addresses unless insecure.")
        .def("stop", [](py_stage & s) { s.stop_flag = true; })
        .def_property_readonly("layer_start", [](const py_stage & s) { return s.st->layer_start(); })
        .def_property_readonly("layer_end", [](const py_stage & s) { return s.st->layer_end(); })
        .def_property_readonly("n_embd", [](const py_stage & s) { return s.st->n_embd(); })
        .def_property_readonly("is_first", [](const py_stage & s) { return s.st->is_first(); })
        .def_property_readonly("is_last", [](const py_stage & s) { return s.st->is_last(); })
        .def("info", [](const py_stage & s) { return hello_dict(s.st->info()); },
             "What this stage answers to HELLO (layer range, model, health).");

    py::class_<py_stage_client>(m, "StageClient", "A blocking connection to one stage; every wait is bounded by timeout_ms.")
        .def(py::init<const std::string &, int, int, int, const py::bytes &>(), py::arg("host"), py::arg("port"),
             py::arg("timeout_ms") = 60000, py::arg("connect_timeout_ms") = 5000, py::arg("key") = py::bytes(),
             "key: the 32-byte cluster key (empty: none); hello() then authenticates both ends and every "
             "later frame carries a MAC.")
        .def("hello", &py_stage_client::hello, py::arg("client_name") = "nakshatra-py",
             py::arg("want_model_sha256") = "")
        .def("open", &py_stage_client::open, py::arg("session"), py::arg("temp") = 0.8f, py::arg("top_k") = 40,
             py::arg("top_p") = 0.95f, py::arg("min_p") = 0.05f, py::arg("repeat_penalty") = 1.0f,
             py::arg("repeat_last_n") = 64, py::arg("seed") = 0xFFFFFFFFu, py::arg("n_predict") = -1,
             py::arg("stop_tokens") = std::vector<int32_t>{}, py::arg("seq") = -1,
             py::arg("ignore_eog") = false, py::arg("reuse") = false, py::arg("token") = 0, py::arg("draft_max") = 0,
             "Open a session: returns (n_ctx positions it may hold, its KV sequence id); seq -1 lets the stage pick. "
             "reuse: the session is open already; give it these settings and keep its KV cache. token: the "
             "session's secret (random, the same on every stage), which steps forwarded by other stages carry; "
             "0: only this connection may use the session. draft_max: speculative decoding, at most this many "
             "n-gram draft tokens per window (the last stage drafts; 0: off).")
        .def("forward", &py_stage_client::forward, py::arg("session"), py::arg("step"), py::arg("pos"),
             py::arg("tokens") = py::none(), py::arg("embd") = py::none(), py::arg("sample") = false,
             py::arg("dtype") = (uint8_t) NAK_DTYPE_F32, py::arg("spec") = false,
             "One step on this stage; spec: the rows after the first are drafts (the last stage verifies them: "
             "the reply then has tokens, pieces, drafts and next_drafts).")
        .def("send_forward", &py_stage_client::send_forward, py::arg("session"), py::arg("step"), py::arg("pos"),
             py::arg("tokens"), py::arg("sample"), py::arg("route"), py::arg("ring") = "", py::arg("token") = 0,
             py::arg("spec") = false,
             "Forwarding: send a step whose hidden state travels stage to stage along route; see wait_forward_ok. "
             "With ring (every stage's address, first first) the last stage starts each next step itself. "
             "token: the session's token given to open() on every stage (the stages after the first need it).")
        .def("truncate", &py_stage_client::truncate, py::arg("session"), py::arg("pos"), py::arg("next_step") = -1,
             py::arg("n_generated") = -1,
             "Drop cached positions >= pos; next_step >= 0 also sets the session's step counter (and "
             "n_generated >= 0 the count of generated tokens a ring's n_predict is checked against). "
             "Returns (n_past, next_step).")
        .def("close_session", &py_stage_client::close_session, py::arg("session"))
        .def("stats", &py_stage_client::stats)
        .def("tokenize", &py_stage_client::tokenize, py::arg("text"), py::arg("add_special") = true,
             py::arg("parse_special") = false)
        .def("detokenize", &py_stage_client::detokenize, py::arg("tokens"), py::arg("special") = false)
        .def("apply_template", &py_stage_client::apply_template, py::arg("messages"), py::arg("add_assistant") = true)
        .def("close", &py_stage_client::close)
        .def_readonly("last_request_id", &py_stage_client::last_request_id,
                      "Request id of the last send_forward (replies to older steps are skipped).");

    py::class_<py_reference>(m, "Reference", "The unsplit model on llama.cpp's stock path (see cpp/stage/reference.h).")
        .def(py::init<const std::string &, uint32_t, uint32_t, uint32_t, int32_t, const std::vector<int> &, uint32_t, bool, int32_t>(),
             py::arg("model_path"), py::arg("n_ctx") = 4096, py::arg("n_batch") = 2048, py::arg("n_ubatch") = 512,
             py::arg("n_threads") = 0, py::arg("capture_layers") = std::vector<int>{}, py::arg("n_seq_max") = 1, py::arg("swa_full") = false, py::arg("poll") = -1,
             "n_seq_max > 1: that many KV sequences of n_ctx / n_seq_max positions each, one stream per\n"
             "sequence, as a stage with --max-sessions n_seq_max (for decode_batch replays). swa_full: keep the\n"
             "whole context in sliding-window layers, as a stage with --swa-full. poll: the thread pool's polling\n"
             "level (llama.cpp's --poll; -1: its default, 50; 0: as stages run, workers sleep between graphs).")
        .def("generate", &py_reference::generate, py::arg("prompt"), py::arg("n_predict"), py::arg("temp") = 0.0f,
             py::arg("top_k") = 40, py::arg("top_p") = 0.95f, py::arg("min_p") = 0.05f, py::arg("repeat_penalty") = 1.0f,
             py::arg("repeat_last_n") = 64, py::arg("seed") = 0xFFFFFFFFu)
        .def("decode_batch", &py_reference::decode_batch, py::arg("seq"), py::arg("pos"), py::arg("tokens"),
             py::arg("sample"),
             "One llama_decode of the given rows (one entry per row); returns the greedy token of every row "
             "whose sample flag is set, in row order. Replays a stage's --batch-log. A row at a position its "
             "sequence holds drops that position and the ones after it first (a speculative window's roll-back).")
        .def("last_logits", &py_reference::last_logits,
             "Logits of the rows the last decode_batch sampled: float32 [n_sampled, n_vocab] (a copy).")
        .def("step_logits", &py_reference::step_logits, py::arg("prompt"), py::arg("continuation"),
             "Teacher-forced logits: prefill prompt (n_batch chunks, as generate), then decode each\n"
             "continuation token one per llama_decode. float32 array [1 + len(continuation), n_vocab]:\n"
             "the logits of the last prompt row, then after each continuation token. ValueError for an\n"
             "empty prompt, a token id outside the vocabulary, or more tokens than a sequence holds.")
        .def("time_run", &py_reference::time_run, py::arg("prompt"), py::arg("n_decode"),
             "Prefill then n_decode greedy one-token steps from an empty cache: (prefill_us, decode_us).")
        .def("captured", &py_reference::captured, py::arg("layer"),
             "l_out of a global layer over every decoded row: [n_rows, n_embd] float32 bytes.")
        .def("tokenize", &py_reference::tokenize, py::arg("text"), py::arg("add_special") = true,
             py::arg("parse_special") = false);
}
