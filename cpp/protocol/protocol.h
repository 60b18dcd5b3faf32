// Nakshatra wire protocol: frames between a client and a stage, and between stages.
//
// No llama.cpp headers here on purpose: the stage, the client bound for Python, and fuzz and
// sanitizer builds all link this library without compiling llama.cpp.
//
// Every frame is a fixed 32-byte little-endian header followed by `payload_len` bytes:
//
//   | magic u32 "NAKS" | version u16 | type u8 | flags u8 | request_id u64 | session_id u64 |
//   | dtype u8 | reserved u8[3] | payload_len u32 | payload ... |
//
// With a cluster key (auth.h), every frame after the AUTH / AUTH_OK handshake has NAK_FLAG_MAC set
// in `flags` and ends in a 16-byte MAC trailer that payload_len counts:
//
//   | header (flags |= NAK_FLAG_MAC, payload_len = n + 16) | payload (n bytes) | mac u8[16] |
//
// Without a key nothing changes: flags stay 0 and there is no trailer.
//
// Payloads are sequences of little-endian scalars; strings and arrays carry a u32 length first.
// A decoder never reads past the payload: every read is bounds-checked and a short or malformed
// payload makes decode return false (the stage answers NAK_MSG_ERROR / bad_request).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#if defined(__BYTE_ORDER__) && defined(__ORDER_LITTLE_ENDIAN__)
static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__,
              "the Nakshatra wire copies numbers as they are in memory: little-endian hosts only");
#endif
#define NAK_PROTO_MAGIC         0x534b414eu // "NAKS" read as a little-endian u32
#define NAK_PROTO_VERSION       3 // 2: OPEN names a KV sequence, BATCH between stages, wire dtypes;
                                  // 3: PROGRESS while a stage computes, health busy/stalled, session tokens
#define NAK_HEADER_SIZE         32
#define NAK_MAX_PAYLOAD_DEFAULT (64u << 20) // 64 MiB: a 2048-token batch of n_embd 8192 f32
#define NAK_NONCE_SIZE          32
#define NAK_PROGRESS_INTERVAL_MS 500 // PROGRESS frames at most this often per step

// capability bits exchanged in HELLO / HELLO_OK. Bits 0-2 were sent by earlier versions and never
// read: a receiver ignores them (and any bit it does not know)
#define NAK_CAP_AUTH     (1ull << 3) // this end has a cluster key: AUTH / AUTH_OK follow (auth.h)

// header flags
#define NAK_FLAG_MAC 0x01u // a 16-byte MAC trailer ends the payload (auth.h)

enum nak_msg_type : uint8_t {
    NAK_MSG_HELLO         = 1,
    NAK_MSG_HELLO_OK      = 2,
    NAK_MSG_OPEN          = 3,
    NAK_MSG_OPEN_OK       = 4,
    NAK_MSG_FORWARD       = 5,
    NAK_MSG_FORWARD_OK    = 6,
    NAK_MSG_TRUNCATE      = 7,
    NAK_MSG_TRUNCATE_OK   = 8,
    NAK_MSG_CLOSE         = 9,
    NAK_MSG_CLOSE_OK      = 10,
    NAK_MSG_STATS         = 11,
    NAK_MSG_STATS_OK      = 12,
    NAK_MSG_TOKENIZE      = 13,
    NAK_MSG_TOKENIZE_OK   = 14,
    NAK_MSG_DETOKENIZE    = 15,
    NAK_MSG_DETOKENIZE_OK = 16,
    NAK_MSG_TEMPLATE      = 17,
    NAK_MSG_TEMPLATE_OK   = 18,
    NAK_MSG_BATCH         = 19, // stage to stage: the first stage's batch of session steps, unchanged
    NAK_MSG_AUTH          = 20, // client's proof of the cluster key (auth.h)
    NAK_MSG_AUTH_OK       = 21, // stage's proof
    // stage to the owner of a session whose step it is computing, or holds queued behind a
    // computation that is advancing: "busy, and making progress". Sent at most every
    // NAK_PROGRESS_INTERVAL_MS and only while llama_decode advances, so a client can wait as long
    // as a long prefill takes and still tell a hung stage (no PROGRESS) within its timeout.
    // Header: the step's session_id and request_id; payload: u64 progress counter. No reply.
    NAK_MSG_PROGRESS      = 22,
    // client to stage: the model the stage serves (an in-place swap, docs/cluster.md). Payload: a
    // JSON request string {"op": "status" | "prepare" | "swap" | "release", ...}; CONTROL_OK
    // carries a JSON reply string. Run by the event loop, in queue order, while no request
    // computes. A swap closes every connection: their sessions and routes were the old model's.
    NAK_MSG_CONTROL       = 23,
    NAK_MSG_CONTROL_OK    = 24,
    NAK_MSG_ERROR         = 255,
};

enum nak_error_code : uint16_t {
    NAK_ERR_BAD_REQUEST  = 1,
    NAK_ERR_WRONG_MODEL  = 2,
    NAK_ERR_CTX_FULL     = 3,
    NAK_ERR_OVERLOADED   = 4,
    NAK_ERR_UNAUTHORIZED = 5,
    NAK_ERR_NO_SESSION   = 6,
    NAK_ERR_VERSION      = 7,
    NAK_ERR_TOO_LARGE    = 8,
    NAK_ERR_INTERNAL     = 9,
    NAK_ERR_WINDOW_LOST  = 10, // a rollback the sliding-window KV cache cannot do: replay from position 0
    NAK_ERR_NEXT_HOP     = 11, // the next stage on the route cannot be reached or went away: the client checks
                               // which stage died and fails over (a refused key is UNAUTHORIZED instead)
};

// element type of a hidden-state payload
enum nak_dtype : uint8_t {
    NAK_DTYPE_NONE = 0,
    NAK_DTYPE_F32  = 1, // exact, the default
    NAK_DTYPE_BF16 = 2, // lossy opt-in, see wire.h
    NAK_DTYPE_Q8R  = 3, // lossy opt-in: per-row scaled int8, see wire.h
};

// FORWARD flags
#define NAK_FWD_TOKENS (1u << 0) // payload carries token ids (first stage input; last stage sampler history)
#define NAK_FWD_EMBD   (1u << 1) // payload carries hidden states [n_tokens, n_embd]
#define NAK_FWD_SAMPLE (1u << 2) // the last stage samples a token from the last row
#define NAK_FWD_RING   (1u << 3) // ring: the last stage sends the sampled token on to the first stage
// speculative window: the rows after the first carry draft tokens. The last stage samples every
// row and keeps the rows up to the first draft that differs from its sampler's token (see
// nak_forward_ok::tokens); every other stage keeps all rows and lets the session's next step start
// at any of these rows' positions: the rejected rows leave its KV cache then, in the same trip.
#define NAK_FWD_SPEC   (1u << 4)

struct nak_header {
    uint32_t magic       = NAK_PROTO_MAGIC;
    uint16_t version     = NAK_PROTO_VERSION;
    uint8_t  type        = 0;
    uint8_t  flags       = 0;
    uint64_t request_id  = 0;
    uint64_t session_id  = 0;
    uint8_t  dtype       = NAK_DTYPE_NONE;
    uint8_t  reserved[3] = {}; // kept as received, so a MAC over a re-encoded header covers them
    uint32_t payload_len = 0;
};

struct nak_frame {
    nak_header           hdr;
    std::vector<uint8_t> payload;
};

// header (de)serialisation; decode checks magic only (version and size are policy of the caller)
void nak_header_encode(const nak_header & h, uint8_t out[NAK_HEADER_SIZE]);
bool nak_header_decode(const uint8_t in[NAK_HEADER_SIZE], nak_header & h);

const char * nak_msg_type_name(uint8_t type);
const char * nak_error_code_name(uint16_t code);

// ---- payload writer / reader --------------------------------------------------------------

struct nak_writer {
    std::vector<uint8_t> buf;

    void u8 (uint8_t  v) { buf.push_back(v); }
    void u16(uint16_t v) { put(&v, 2); }
    void u32(uint32_t v) { put(&v, 4); }
    void u64(uint64_t v) { put(&v, 8); }
    void i32(int32_t  v) { put(&v, 4); }
    void f32(float    v) { put(&v, 4); }
    void bytes(const void * p, size_t n) { put(p, n); }
    void str(const std::string & s) { u32((uint32_t) s.size()); put(s.data(), s.size()); }
    void i32s(const std::vector<int32_t> & v) { u32((uint32_t) v.size()); put(v.data(), v.size() * 4); }

  private:
    // the wire is little-endian, and so are all hosts we build for (x86-64, arm64): numbers are
    // copied as they are in memory (a static_assert at the top refuses a big-endian build)
    void put(const void * p, size_t n) {
        const uint8_t * b = (const uint8_t *) p;
        buf.insert(buf.end(), b, b + n);
    }
};

struct nak_reader {
    const uint8_t * p;
    size_t          n;
    size_t          off = 0;
    bool            ok  = true;

    nak_reader(const uint8_t * data, size_t size) : p(data), n(size) {}
    explicit nak_reader(const std::vector<uint8_t> & v) : p(v.data()), n(v.size()) {}

    uint8_t  u8 () { uint8_t  v = 0; get(&v, 1); return v; }
    uint16_t u16() { uint16_t v = 0; get(&v, 2); return v; }
    uint32_t u32() { uint32_t v = 0; get(&v, 4); return v; }
    uint64_t u64() { uint64_t v = 0; get(&v, 8); return v; }
    int32_t  i32() { int32_t  v = 0; get(&v, 4); return v; }
    float    f32() { float    v = 0; get(&v, 4); return v; }
    std::string str();
    std::vector<int32_t> i32s();
    // a view of the next n bytes (nullptr and ok = false when short)
    const uint8_t * view(size_t len);
    bool done() const { return ok && off == n; }

  private:
    void get(void * dst, size_t len);
};

// ---- messages ------------------------------------------------------------------------------

struct nak_health {
    uint32_t sessions_active = 0;
    uint32_t max_sessions    = 0;
    uint32_t queue_depth     = 0;
    uint32_t n_ctx_session   = 0;  // tokens of KV per session
    uint64_t kv_tokens_used  = 0;  // sum over sessions of cached positions
    uint64_t rss_bytes       = 0;
    uint64_t uptime_ms       = 0;
    uint64_t tokens_in       = 0;  // token rows decoded since start
    uint64_t cpu_ms          = 0;  // CPU time the stage process used since start (all threads)
    uint64_t mem_available_bytes = 0; // memory the host could still give (Linux MemAvailable), bytes
    float    layers_per_s    = 0.0f; // decode speed of this stage from its self-benchmark at start:
                                     // layers x tokens per second (for `nak plan`); 0: not measured
    // liveness while computing (answered by the network thread, never blocked by llama_decode)
    uint64_t busy_ms    = 0; // how long the running request has been computing; 0: idle
    uint64_t stalled_ms = 0; // how long llama_decode has made no progress (graph nodes) while busy; 0: idle
    uint64_t progress   = 0; // graph nodes computed since start (a counter that moves while computing)
    // rss_bytes split (platform.h, nak_rss_split): memory only this stage holds (weight copies,
    // KV, buffers) and file-backed pages (the mmap'd slice, reclaimable), bytes; 0: not known
    uint64_t rss_anon_bytes = 0;
    uint64_t rss_file_bytes = 0;
};

struct nak_hello {
    uint64_t    caps = 0;
    uint8_t     nonce[NAK_NONCE_SIZE] = {};
    std::string client_name;
    std::string want_model_sha256; // empty: any model; else the stage answers wrong_model on mismatch
};

struct nak_hello_ok {
    uint16_t    version = NAK_PROTO_VERSION;
    uint64_t    caps    = 0;
    uint8_t     nonce[NAK_NONCE_SIZE] = {};
    std::string model_sha256;
    std::string arch;
    uint32_t    layer_start  = 0; // global, half-open [layer_start, layer_end)
    uint32_t    layer_end    = 0;
    uint32_t    n_layer_full = 0;
    uint32_t    n_embd       = 0;
    uint32_t    n_vocab      = 0;
    std::string backend;
    nak_health  health;
};

struct nak_sampler_params {
    float    temp           = 0.8f; // <= 0: greedy
    int32_t  top_k          = 40;
    float    top_p          = 0.95f;
    float    min_p          = 0.05f;
    float    repeat_penalty = 1.0f;
    int32_t  repeat_last_n  = 64;
    uint32_t seed           = 0xFFFFFFFF; // LLAMA_DEFAULT_SEED: random
};

struct nak_open {
    nak_sampler_params   sampler;
    int32_t              n_predict = -1;
    std::vector<int32_t> stop_tokens; // sampled tokens that end the generation like an EOG token
    // KV sequence id wanted (-1: the stage picks the lowest free one; a busy one is not an error).
    // The client opens the first stage first and asks every other stage for the same id:
    // llama.cpp cuts a multi-session batch into ubatches by runs of consecutive sequence ids, so
    // stages that number the sessions alike cut a batch the same way (and a replay with it).
    int32_t              seq = -1;
    uint8_t              ignore_eog = 0; // as llama.cpp's --ignore-eos: only n_predict and stop tokens end it (benchmarks)
    // 1: the session is already open here; give it these sampling settings and stop rule and keep
    // its KV cache and token history (a server reusing a cached prompt prefix for a new request).
    // On the wire only when set (a trailing byte 1).
    uint8_t              reuse = 0;
    // the session's secret, chosen by the client at random and the same on every stage: frames
    // for the session that do not come from the connection that opened it (the stage before on
    // its route: forwarding, ring) must carry it. 0: none (only the opening connection may use it).
    // Never shown (stats, health): the session id is no secret.
    uint64_t             token = 0;
    // speculative decoding for this session (ring and forwarding): the last stage drafts at most
    // this many tokens per window with llama.cpp's n-gram drafter (0: off). On the wire after
    // `reuse` (which is then sent as 0 or 1), only when set.
    int32_t              draft_max = 0;
};

struct nak_forward {
    uint64_t             step    = 0; // per-session step number, starts at 0
    uint32_t             flags   = 0; // NAK_FWD_*
    uint32_t             n_tokens = 0;
    std::vector<int32_t> pos;         // [n_tokens]
    std::vector<int32_t> tokens;      // [n_tokens] when NAK_FWD_TOKENS
    const uint8_t *      embd = nullptr; // [n_tokens, n_embd] of header dtype when NAK_FWD_EMBD (a view)
    size_t               embd_bytes = 0;
    // forwarding route: the addresses ("host:port,host:port") of the stages after this one. A
    // non-last stage given a route sends its hidden state (with the tokens and SAMPLE flag) as a
    // FORWARD to the first address and the rest of the route; the last stage answers the
    // session's owner. Empty: answer the sender with the hidden state (client relay).
    std::string          next_hop;
    // ring route: every stage's address, first stage first (with NAK_FWD_RING): the last stage
    // starts the next decode step itself until end of generation, n_predict or a full context
    std::string          ring;
    uint64_t             token = 0; // the session's token (nak_open::token)
};

struct nak_forward_ok {
    uint64_t    step       = 0;
    uint32_t    n_tokens   = 0;
    uint32_t    n_past     = 0;       // positions cached for the session after this step
    uint64_t    compute_us = 0;       // time in llama_decode (+ sampling)
    int32_t     token      = -1;      // sampled token (last stage with NAK_FWD_SAMPLE)
    uint8_t     is_eog     = 0;
    std::string piece;                // detokenized sampled token
    const uint8_t * embd = nullptr;   // hidden states out (non-last stage), a view
    size_t      embd_bytes = 0;
    // Speculative decoding (on the wire after embd, only when `spec` is set). A window step
    // (NAK_FWD_SPEC) yields every token the last stage sampled, in order: `token` and `piece` above
    // are the last of them, `n_past` counts the rows kept (the window's start + tokens.size()).
    // `drafts` are the draft tokens this step verified (the window after its first row), and
    // `next_drafts` the tokens drafted to follow `token`: a client that drives the chain itself
    // (no ring) sends [token, next_drafts...] as the next window; a ring has already sent it.
    bool                     spec = false;
    std::vector<int32_t>     tokens;
    std::vector<std::string> pieces;
    std::vector<int32_t>     drafts;
    std::vector<int32_t>     next_drafts;
};

// One session's step inside a BATCH: the fields of a FORWARD, plus who asked and the KV sequence.
struct nak_batch_entry {
    uint64_t             session_id = 0;
    uint64_t             request_id = 0; // of the client's FORWARD: the last stage's reply carries it
    uint64_t             step       = 0;
    uint32_t             flags      = 0; // NAK_FWD_TOKENS | NAK_FWD_SAMPLE | NAK_FWD_RING
    int32_t              seq        = 0; // KV sequence id on every stage (see nak_open::seq)
    uint32_t             n_tokens   = 0;
    int32_t              pos0       = 0; // positions pos0 .. pos0 + n_tokens - 1
    std::vector<int32_t> tokens;         // [n_tokens] when NAK_FWD_TOKENS
    std::string          ring;           // ring route (see nak_forward::ring)
    uint64_t             token      = 0; // the session's token (nak_open::token)
};

// A batch formed by the first stage (continuous batching): every later stage decodes the same
// rows in the same order in one llama_decode, so the batch can be logged and replayed through
// the unsplit model. Hidden states of all rows follow, entry after entry.
struct nak_batch {
    uint64_t                     id = 0;     // the first stage's batch counter
    std::vector<nak_batch_entry> entries;
    std::string                  next_hop;   // the rest of the route after the receiving stage
    const uint8_t *              embd = nullptr; // [sum n_tokens, n_embd] in the header's dtype (a view)
    size_t                       embd_bytes = 0;
};

struct nak_error {
    uint16_t    code = NAK_ERR_INTERNAL;
    std::string message;
};

// encode appends the payload; decode returns false on a malformed payload
void nak_encode(nak_writer & w, const nak_hello & m);
void nak_encode(nak_writer & w, const nak_hello_ok & m);
void nak_encode(nak_writer & w, const nak_open & m);
void nak_encode(nak_writer & w, const nak_forward & m);
void nak_encode(nak_writer & w, const nak_forward_ok & m);
void nak_encode(nak_writer & w, const nak_error & m);
void nak_encode(nak_writer & w, const nak_health & m);
void nak_encode(nak_writer & w, const nak_batch & m);

bool nak_decode(const std::vector<uint8_t> & p, nak_hello & m);
bool nak_decode(const std::vector<uint8_t> & p, nak_hello_ok & m);
bool nak_decode(const std::vector<uint8_t> & p, nak_open & m);
bool nak_decode(const std::vector<uint8_t> & p, nak_forward & m);
bool nak_decode(const std::vector<uint8_t> & p, nak_forward_ok & m);
bool nak_decode(const std::vector<uint8_t> & p, nak_error & m);
bool nak_decode(nak_reader & r, nak_health & m);
bool nak_decode(const std::vector<uint8_t> & p, nak_batch & m);

// a complete frame (header + payload) ready to send
std::vector<uint8_t> nak_frame_bytes(nak_header h, const std::vector<uint8_t> & payload);

// ---- incremental frame parser (server side) ------------------------------------------------

enum nak_parse_status {
    NAK_PARSE_NEED_MORE,
    NAK_PARSE_FRAME,
    NAK_PARSE_BAD_MAGIC,
    NAK_PARSE_BAD_VERSION,
    NAK_PARSE_TOO_LARGE,
};

// Accumulates bytes from a stream and cuts frames. After an error status the stream cannot be
// resynchronised: the caller answers with an error frame and closes the connection.
struct nak_frame_parser {
    uint32_t             max_payload = NAK_MAX_PAYLOAD_DEFAULT;
    std::vector<uint8_t> buf;
    size_t               off = 0;

    void feed(const uint8_t * data, size_t n);
    nak_parse_status next(nak_frame & out);
};
