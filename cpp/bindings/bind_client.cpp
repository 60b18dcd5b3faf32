// StageClient: a blocking connection to one stage (a request, its reply), and wait_forward_ok,
// which waits on several for the reply to a forwarded step. Every wait releases the GIL.
#include "bindings.h"

#include "net.h"

#include <pybind11/stl.h>

#include <algorithm>
#include <cerrno>
#include <poll.h>
#include <chrono>
#include <optional>
#include <random>

namespace {

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

    // a CONTROL request (JSON) and the stage's JSON reply (the model swap, nakshatra.server.swap)
    std::string control(const std::string & request) {
        nak_writer w;
        w.str(request);
        nak_frame r = call(NAK_MSG_CONTROL, 0, NAK_DTYPE_NONE, w.buf, NAK_MSG_CONTROL_OK);
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

} // namespace

void bind_client(py::module_ & m) {
    // before StageClient exists: the signature pybind11 writes for it names the C++ type, as it
    // always has (help() stays as it was)
    m.def("wait_forward_ok", &wait_forward_ok, py::arg("clients"), py::arg("timeout_ms"), py::arg("min_request_id") = 0,
          "Wait for a forwarded step's FORWARD_OK (last stage) or an ERROR (any stage).");

    // SamplerParams: nak_sampler_params (cpp/protocol/protocol.h), the one place the sampler's
    // defaults are written; open() here and nakshatra.client.chain.SamplerParams derive from it
    using S = nak_sampler_params;
    py::class_<S>(m, "SamplerParams", "The sampler settings OPEN carries; a new one holds the defaults (llama.cpp's).")
        .def(py::init<>())
        .def_readwrite("temp", &S::temp, "<= 0: greedy")
        .def_readwrite("top_k", &S::top_k)
        .def_readwrite("top_p", &S::top_p)
        .def_readwrite("min_p", &S::min_p)
        .def_readwrite("repeat_penalty", &S::repeat_penalty, "1: off")
        .def_readwrite("repeat_last_n", &S::repeat_last_n)
        .def_readwrite("seed", &S::seed, "0xFFFFFFFF (LLAMA_DEFAULT_SEED): random");
    const S sd;

    py::class_<py_stage_client>(m, "StageClient", "A blocking connection to one stage; every wait is bounded by timeout_ms.")
        .def(py::init<const std::string &, int, int, int, const py::bytes &>(), py::arg("host"), py::arg("port"),
             py::arg("timeout_ms") = 60000, py::arg("connect_timeout_ms") = 5000, py::arg("key") = py::bytes(),
             "key: the 32-byte cluster key (empty: none); hello() then authenticates both ends and every "
             "later frame carries a MAC.")
        .def("hello", &py_stage_client::hello, py::arg("client_name") = "nakshatra-py",
             py::arg("want_model_sha256") = "")
        .def("open", &py_stage_client::open, py::arg("session"), py::arg("temp") = sd.temp, py::arg("top_k") = sd.top_k,
             py::arg("top_p") = sd.top_p, py::arg("min_p") = sd.min_p, py::arg("repeat_penalty") = sd.repeat_penalty,
             py::arg("repeat_last_n") = sd.repeat_last_n, py::arg("seed") = sd.seed, py::arg("n_predict") = -1,
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
        .def("control", &py_stage_client::control, py::arg("request"),
             "Send a CONTROL request (a JSON string: the model swap, nakshatra.server.swap) and return the "
             "stage's JSON reply. Raises StageError as every request.")
        .def("tokenize", &py_stage_client::tokenize, py::arg("text"), py::arg("add_special") = true,
             py::arg("parse_special") = false)
        .def("detokenize", &py_stage_client::detokenize, py::arg("tokens"), py::arg("special") = false)
        .def("apply_template", &py_stage_client::apply_template, py::arg("messages"), py::arg("add_assistant") = true)
        .def("close", &py_stage_client::close)
        .def_readonly("last_request_id", &py_stage_client::last_request_id,
                      "Request id of the last send_forward (replies to older steps are skipped).");
}
