#include "protocol.h"

#include <cstring>

void nak_header_encode(const nak_header & h, uint8_t out[NAK_HEADER_SIZE]) {
    nak_writer w;
    w.u32(h.magic);
    w.u16(h.version);
    w.u8(h.type);
    w.u8(h.flags);
    w.u64(h.request_id);
    w.u64(h.session_id);
    w.u8(h.dtype);
    w.u8(h.reserved[0]); w.u8(h.reserved[1]); w.u8(h.reserved[2]);
    w.u32(h.payload_len);
    memcpy(out, w.buf.data(), NAK_HEADER_SIZE);
}

bool nak_header_decode(const uint8_t in[NAK_HEADER_SIZE], nak_header & h) {
    nak_reader r(in, NAK_HEADER_SIZE);
    h.magic      = r.u32();
    h.version    = r.u16();
    h.type       = r.u8();
    h.flags      = r.u8();
    h.request_id = r.u64();
    h.session_id = r.u64();
    h.dtype      = r.u8();
    h.reserved[0] = r.u8(); h.reserved[1] = r.u8(); h.reserved[2] = r.u8();
    h.payload_len = r.u32();
    return r.ok && h.magic == NAK_PROTO_MAGIC;
}

const char * nak_msg_type_name(uint8_t type) {
    switch (type) {
        case NAK_MSG_HELLO:         return "HELLO";
        case NAK_MSG_HELLO_OK:      return "HELLO_OK";
        case NAK_MSG_OPEN:          return "OPEN";
        case NAK_MSG_OPEN_OK:       return "OPEN_OK";
        case NAK_MSG_FORWARD:       return "FORWARD";
        case NAK_MSG_FORWARD_OK:    return "FORWARD_OK";
        case NAK_MSG_TRUNCATE:      return "TRUNCATE";
        case NAK_MSG_TRUNCATE_OK:   return "TRUNCATE_OK";
        case NAK_MSG_CLOSE:         return "CLOSE";
        case NAK_MSG_CLOSE_OK:      return "CLOSE_OK";
        case NAK_MSG_STATS:         return "STATS";
        case NAK_MSG_STATS_OK:      return "STATS_OK";
        case NAK_MSG_TOKENIZE:      return "TOKENIZE";
        case NAK_MSG_TOKENIZE_OK:   return "TOKENIZE_OK";
        case NAK_MSG_DETOKENIZE:    return "DETOKENIZE";
        case NAK_MSG_DETOKENIZE_OK: return "DETOKENIZE_OK";
        case NAK_MSG_TEMPLATE:      return "TEMPLATE";
        case NAK_MSG_TEMPLATE_OK:   return "TEMPLATE_OK";
        case NAK_MSG_CONTROL:       return "CONTROL";
        case NAK_MSG_CONTROL_OK:    return "CONTROL_OK";
        case NAK_MSG_BATCH:         return "BATCH";
        case NAK_MSG_AUTH:          return "AUTH";
        case NAK_MSG_AUTH_OK:       return "AUTH_OK";
        case NAK_MSG_PROGRESS:      return "PROGRESS";
        case NAK_MSG_ERROR:         return "ERROR";
        default:                    return "UNKNOWN";
    }
}

const char * nak_error_code_name(uint16_t code) {
    switch (code) {
        case NAK_ERR_BAD_REQUEST:  return "bad_request";
        case NAK_ERR_WRONG_MODEL:  return "wrong_model";
        case NAK_ERR_CTX_FULL:     return "ctx_full";
        case NAK_ERR_OVERLOADED:   return "overloaded";
        case NAK_ERR_UNAUTHORIZED: return "unauthorized";
        case NAK_ERR_NO_SESSION:   return "no_session";
        case NAK_ERR_VERSION:      return "version";
        case NAK_ERR_TOO_LARGE:    return "too_large";
        case NAK_ERR_INTERNAL:     return "internal";
        case NAK_ERR_WINDOW_LOST:  return "window_lost";
        case NAK_ERR_NEXT_HOP:     return "next_hop";
        default:                   return "unknown";
    }
}

// ---- reader ----

void nak_reader::get(void * dst, size_t len) {
    // an empty array's dst may be null, and memcpy/memset with a null pointer is undefined even
    // for 0 bytes (UBSan, found by cpp/fuzz)
    if (len == 0) {
        return;
    }
    if (!ok || len > n - off) {
        ok = false;
        memset(dst, 0, len);
        return;
    }
    memcpy(dst, p + off, len);
    off += len;
}

const uint8_t * nak_reader::view(size_t len) {
    if (!ok || len > n - off) {
        ok = false;
        return nullptr;
    }
    const uint8_t * v = p + off;
    off += len;
    return v;
}

std::string nak_reader::str() {
    const uint32_t len = u32();
    const uint8_t * v = view(len);
    return v ? std::string((const char *) v, len) : std::string();
}

std::vector<int32_t> nak_reader::i32s() {
    const uint32_t cnt = u32();
    // check the length against what is left before allocating: a hostile count must not allocate
    if (!ok || cnt > (n - off) / 4) {
        ok = false;
        return {};
    }
    std::vector<int32_t> v(cnt);
    get(v.data(), (size_t) cnt * 4);
    return v;
}

// ---- messages ----

void nak_encode(nak_writer & w, const nak_health & m) {
    w.u32(m.sessions_active);
    w.u32(m.max_sessions);
    w.u32(m.queue_depth);
    w.u32(m.n_ctx_session);
    w.u64(m.kv_tokens_used);
    w.u64(m.rss_bytes);
    w.u64(m.uptime_ms);
    w.u64(m.tokens_in);
    w.u64(m.cpu_ms);
    w.u64(m.mem_available_bytes);
    w.f32(m.layers_per_s);
    w.u64(m.busy_ms);
    w.u64(m.stalled_ms);
    w.u64(m.progress);
    w.u64(m.rss_anon_bytes);
    w.u64(m.rss_file_bytes);
}

bool nak_decode(nak_reader & r, nak_health & m) {
    m.sessions_active = r.u32();
    m.max_sessions    = r.u32();
    m.queue_depth     = r.u32();
    m.n_ctx_session   = r.u32();
    m.kv_tokens_used  = r.u64();
    m.rss_bytes       = r.u64();
    m.uptime_ms       = r.u64();
    m.tokens_in       = r.u64();
    m.cpu_ms          = r.u64();
    m.mem_available_bytes = r.u64();
    m.layers_per_s    = r.f32();
    m.busy_ms         = r.u64();
    m.stalled_ms      = r.u64();
    m.progress        = r.u64();
    m.rss_anon_bytes  = r.u64();
    m.rss_file_bytes  = r.u64();
    return r.ok;
}

void nak_encode(nak_writer & w, const nak_hello & m) {
    w.u64(m.caps);
    w.bytes(m.nonce, NAK_NONCE_SIZE);
    w.str(m.client_name);
    w.str(m.want_model_sha256);
}

bool nak_decode(const std::vector<uint8_t> & p, nak_hello & m) {
    nak_reader r(p);
    m.caps = r.u64();
    const uint8_t * nonce = r.view(NAK_NONCE_SIZE);
    if (nonce) {
        memcpy(m.nonce, nonce, NAK_NONCE_SIZE);
    }
    m.client_name       = r.str();
    m.want_model_sha256 = r.str();
    return r.done();
}

void nak_encode(nak_writer & w, const nak_hello_ok & m) {
    w.u16(m.version);
    w.u64(m.caps);
    w.bytes(m.nonce, NAK_NONCE_SIZE);
    w.str(m.model_sha256);
    w.str(m.arch);
    w.u32(m.layer_start);
    w.u32(m.layer_end);
    w.u32(m.n_layer_full);
    w.u32(m.n_embd);
    w.u32(m.n_vocab);
    w.str(m.backend);
    nak_encode(w, m.health);
}

bool nak_decode(const std::vector<uint8_t> & p, nak_hello_ok & m) {
    nak_reader r(p);
    m.version = r.u16();
    m.caps    = r.u64();
    const uint8_t * nonce = r.view(NAK_NONCE_SIZE);
    if (nonce) {
        memcpy(m.nonce, nonce, NAK_NONCE_SIZE);
    }
    m.model_sha256 = r.str();
    m.arch         = r.str();
    m.layer_start  = r.u32();
    m.layer_end    = r.u32();
    m.n_layer_full = r.u32();
    m.n_embd       = r.u32();
    m.n_vocab      = r.u32();
    m.backend      = r.str();
    nak_decode(r, m.health);
    return r.done();
}

void nak_encode(nak_writer & w, const nak_open & m) {
    w.f32(m.sampler.temp);
    w.i32(m.sampler.top_k);
    w.f32(m.sampler.top_p);
    w.f32(m.sampler.min_p);
    w.f32(m.sampler.repeat_penalty);
    w.i32(m.sampler.repeat_last_n);
    w.u32(m.sampler.seed);
    w.i32(m.n_predict);
    w.i32s(m.stop_tokens);
    w.i32(m.seq);
    w.u8(m.ignore_eog);
    w.u64(m.token);
    if (m.reuse || m.draft_max != 0) {
        w.u8(m.reuse ? 1 : 0);
    }
    if (m.draft_max != 0) {
        w.i32(m.draft_max);
    }
}

bool nak_decode(const std::vector<uint8_t> & p, nak_open & m) {
    nak_reader r(p);
    m.sampler.temp           = r.f32();
    m.sampler.top_k          = r.i32();
    m.sampler.top_p          = r.f32();
    m.sampler.min_p          = r.f32();
    m.sampler.repeat_penalty = r.f32();
    m.sampler.repeat_last_n  = r.i32();
    m.sampler.seed           = r.u32();
    m.n_predict              = r.i32();
    m.stop_tokens            = r.i32s();
    m.seq                    = r.i32();
    m.ignore_eog             = r.u8();
    m.token                  = r.u64();
    m.reuse                  = 0;
    m.draft_max              = 0;
    if (r.ok && !r.done()) {
        m.reuse = r.u8();
        if (m.reuse > 1) {
            return false;
        }
        // one encoding per message (the fuzzer checks decode-encode round trips): draft_max is
        // sent only when set, and the `reuse` byte alone only when it is 1
        if (r.ok && !r.done()) {
            m.draft_max = r.i32();
            if (m.draft_max == 0) {
                return false;
            }
        } else if (m.reuse != 1) {
            return false;
        }
    }
    return r.done();
}

// FORWARD payload:
// | step u64 | flags u32 | n_tokens u32 | pos i32[n] | (tokens i32[n]) | (embd_bytes u32 | embd) | next_hop str | ring str | token u64 |
void nak_encode(nak_writer & w, const nak_forward & m) {
    w.u64(m.step);
    w.u32(m.flags);
    w.u32(m.n_tokens);
    w.bytes(m.pos.data(), m.pos.size() * 4);
    if (m.flags & NAK_FWD_TOKENS) {
        w.bytes(m.tokens.data(), m.tokens.size() * 4);
    }
    if (m.flags & NAK_FWD_EMBD) {
        w.u32((uint32_t) m.embd_bytes);
        w.bytes(m.embd, m.embd_bytes);
    }
    w.str(m.next_hop);
    w.str(m.ring);
    w.u64(m.token);
}

static bool read_i32_array(nak_reader & r, uint32_t n, std::vector<int32_t> & out) {
    const uint8_t * v = r.view((size_t) n * 4);
    if (!v) {
        return false;
    }
    out.resize(n);
    if (n > 0) { // out.data() may be null for n == 0: memcpy must not see it (UBSan, cpp/fuzz)
        memcpy(out.data(), v, (size_t) n * 4);
    }
    return true;
}

bool nak_decode(const std::vector<uint8_t> & p, nak_forward & m) {
    nak_reader r(p);
    m.step     = r.u64();
    m.flags    = r.u32();
    m.n_tokens = r.u32();
    if (!r.ok || m.n_tokens > (r.n - r.off) / 4) {
        return false;
    }
    if (!read_i32_array(r, m.n_tokens, m.pos)) {
        return false;
    }
    if ((m.flags & NAK_FWD_TOKENS) && !read_i32_array(r, m.n_tokens, m.tokens)) {
        return false;
    }
    if (m.flags & NAK_FWD_EMBD) {
        m.embd_bytes = r.u32();
        m.embd       = r.view(m.embd_bytes);
    }
    m.next_hop = r.str();
    m.ring     = r.str();
    m.token    = r.u64();
    return r.done();
}

// FORWARD_OK payload:
// | step u64 | n_tokens u32 | n_past u32 | compute_us u64 | token i32 | is_eog u8 | piece str | embd_bytes u32 | embd |
// then, only for a speculative step: | tokens i32s | n_pieces u32 | piece str ... | drafts i32s | next_drafts i32s |
void nak_encode(nak_writer & w, const nak_forward_ok & m) {
    w.u64(m.step);
    w.u32(m.n_tokens);
    w.u32(m.n_past);
    w.u64(m.compute_us);
    w.i32(m.token);
    w.u8(m.is_eog);
    w.str(m.piece);
    w.u32((uint32_t) m.embd_bytes);
    w.bytes(m.embd, m.embd_bytes);
    if (m.spec) {
        w.i32s(m.tokens);
        w.u32((uint32_t) m.pieces.size());
        for (const auto & p : m.pieces) {
            w.str(p);
        }
        w.i32s(m.drafts);
        w.i32s(m.next_drafts);
    }
}

bool nak_decode(const std::vector<uint8_t> & p, nak_forward_ok & m) {
    nak_reader r(p);
    m.step       = r.u64();
    m.n_tokens   = r.u32();
    m.n_past     = r.u32();
    m.compute_us = r.u64();
    m.token      = r.i32();
    m.is_eog     = r.u8();
    m.piece      = r.str();
    m.embd_bytes = r.u32();
    m.embd       = r.view(m.embd_bytes);
    m.spec       = r.ok && !r.done();
    if (m.spec) {
        m.tokens = r.i32s();
        const uint32_t n = r.u32();
        if (!r.ok || n != m.tokens.size()) {
            return false;
        }
        m.pieces.resize(n);
        for (uint32_t i = 0; i < n && r.ok; i++) {
            m.pieces[i] = r.str();
        }
        m.drafts      = r.i32s();
        m.next_drafts = r.i32s();
    }
    return r.done();
}

// BATCH payload:
// | id u64 | n_entries u32 | entry ... | next_hop str | embd_bytes u32 | embd |
// entry: | session_id u64 | request_id u64 | step u64 | flags u32 | seq i32 | n_tokens u32 | pos0 i32 |
//        | (tokens i32[n_tokens]) | ring str |
void nak_encode(nak_writer & w, const nak_batch & m) {
    w.u64(m.id);
    w.u32((uint32_t) m.entries.size());
    for (const auto & e : m.entries) {
        w.u64(e.session_id);
        w.u64(e.request_id);
        w.u64(e.step);
        w.u32(e.flags);
        w.i32(e.seq);
        w.u32(e.n_tokens);
        w.i32(e.pos0);
        w.u64(e.token);
        if (e.flags & NAK_FWD_TOKENS) {
            w.bytes(e.tokens.data(), e.tokens.size() * 4);
        }
        w.str(e.ring);
    }
    w.str(m.next_hop);
    w.u32((uint32_t) m.embd_bytes);
    w.bytes(m.embd, m.embd_bytes);
}

bool nak_decode(const std::vector<uint8_t> & p, nak_batch & m) {
    nak_reader r(p);
    m.id = r.u64();
    const uint32_t n = r.u32();
    // an entry takes at least 52 bytes: a count beyond what the payload can hold is malformed
    if (!r.ok || n > (r.n - r.off) / 52) {
        return false;
    }
    m.entries.resize(n);
    for (auto & e : m.entries) {
        e.session_id = r.u64();
        e.request_id = r.u64();
        e.step       = r.u64();
        e.flags      = r.u32();
        e.seq        = r.i32();
        e.n_tokens   = r.u32();
        e.pos0       = r.i32();
        e.token      = r.u64();
        if (!r.ok || e.n_tokens > (r.n - r.off) / 4) {
            return false;
        }
        if ((e.flags & NAK_FWD_TOKENS) && !read_i32_array(r, e.n_tokens, e.tokens)) {
            return false;
        }
        e.ring = r.str();
    }
    m.next_hop   = r.str();
    m.embd_bytes = r.u32();
    m.embd       = r.view(m.embd_bytes);
    return r.done();
}

void nak_encode(nak_writer & w, const nak_error & m) {
    w.u16(m.code);
    w.str(m.message);
}

bool nak_decode(const std::vector<uint8_t> & p, nak_error & m) {
    nak_reader r(p);
    m.code    = r.u16();
    m.message = r.str();
    return r.done();
}

std::vector<uint8_t> nak_frame_bytes(nak_header h, const std::vector<uint8_t> & payload) {
    h.payload_len = (uint32_t) payload.size();
    std::vector<uint8_t> out(NAK_HEADER_SIZE + payload.size());
    nak_header_encode(h, out.data());
    if (!payload.empty()) {
        memcpy(out.data() + NAK_HEADER_SIZE, payload.data(), payload.size());
    }
    return out;
}

// ---- parser ----

void nak_frame_parser::feed(const uint8_t * data, size_t n) {
    // drop consumed bytes before growing, so a long-lived connection does not grow without bound
    if (off > 0 && off == buf.size()) {
        buf.clear();
        off = 0;
    } else if (off > (1u << 20)) {
        buf.erase(buf.begin(), buf.begin() + off);
        off = 0;
    }
    buf.insert(buf.end(), data, data + n);
}

nak_parse_status nak_frame_parser::next(nak_frame & out) {
    if (buf.size() - off < NAK_HEADER_SIZE) {
        return NAK_PARSE_NEED_MORE;
    }
    nak_header h;
    if (!nak_header_decode(buf.data() + off, h)) {
        return NAK_PARSE_BAD_MAGIC;
    }
    if (h.version != NAK_PROTO_VERSION) {
        return NAK_PARSE_BAD_VERSION;
    }
    if (h.payload_len > max_payload) {
        return NAK_PARSE_TOO_LARGE;
    }
    if (buf.size() - off < NAK_HEADER_SIZE + (size_t) h.payload_len) {
        return NAK_PARSE_NEED_MORE;
    }
    out.hdr = h;
    const uint8_t * b = buf.data() + off + NAK_HEADER_SIZE;
    out.payload.assign(b, b + h.payload_len);
    off += NAK_HEADER_SIZE + h.payload_len;
    return NAK_PARSE_FRAME;
}
