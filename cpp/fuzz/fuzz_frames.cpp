// libFuzzer target: the byte stream a stage reads from a socket, cut into frames and decoded.
//
// Input layout: | chunk seed u8 | n_embd seed u8 | stream ... |
//   chunk seed  picks the sizes the stream is fed to nak_frame_parser in (as recv() would split it)
//   n_embd seed the stage's n_embd (1..256) for the hidden-state size checks and nak_wire_decode
//
// Every frame cut is decoded by the decoder of its type (as the stage and the client do), checked
// like cpp/stage/executor.cpp checks it, and its hidden state decoded with nak_wire_decode. A
// payload that decodes must encode back to the same bytes: the encoder and decoder agree on the
// layout.
//
// Build and run: cpp/fuzz/run.sh SECONDS. Write the seed corpus: fuzz_frames --write-corpus DIR.
#include "protocol.h"
#include "wire.h"

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

static void check(bool cond, const char * what) {
    if (!cond) {
        fprintf(stderr, "fuzz_frames: %s\n", what);
        abort();
    }
}

// decode the payload as a T; when it decodes, inspect it (the checks the stage makes), then it must
// encode back to the same bytes: the encoder and decoder agree on the layout
template <typename T, typename F>
static void roundtrip(const std::vector<uint8_t> & payload, const char * what, F && inspect) {
    T m;
    if (!nak_decode(payload, m)) {
        return;
    }
    inspect(m);
    nak_writer w;
    nak_encode(w, m);
    check(w.buf == payload, what);
}

template <typename T>
static void roundtrip(const std::vector<uint8_t> & payload, const char * what) {
    roundtrip<T>(payload, what, [](const T &) {});
}

// a decoded message's hidden-state bytes are a view into the payload, never past it
static void check_embd_view(const nak_frame & f, const uint8_t * embd, size_t embd_bytes, const char * what) {
    check(embd_bytes == 0 || (embd >= f.payload.data() && embd + embd_bytes <= f.payload.data() + f.payload.size()),
          what);
}

// hidden states of n_rows rows as the stage takes them: at least one row (check_step rejects
// n_tokens == 0), exactly n_rows x row bytes, else rejected
static void decode_rows(uint8_t dtype, const uint8_t * embd, size_t embd_bytes, uint32_t n_rows, uint32_t n_embd) {
    const size_t row_bytes = nak_wire_row_bytes(dtype, n_embd);
    if (n_rows == 0 || !embd || row_bytes == 0 || embd_bytes != (size_t) n_rows * row_bytes) {
        return;
    }
    std::vector<float> out((size_t) n_rows * n_embd);
    nak_wire_decode(dtype, embd, n_rows, n_embd, out.data());
}

static void decode_frame(const nak_frame & f, uint32_t n_embd) {
    switch (f.hdr.type) {
        case NAK_MSG_HELLO:
            roundtrip<nak_hello>(f.payload, "HELLO round trip");
            break;
        case NAK_MSG_HELLO_OK:
            roundtrip<nak_hello_ok>(f.payload, "HELLO_OK round trip");
            break;
        case NAK_MSG_OPEN:
            roundtrip<nak_open>(f.payload, "OPEN round trip");
            break;
        case NAK_MSG_FORWARD:
            roundtrip<nak_forward>(f.payload, "FORWARD round trip", [&](const nak_forward & m) {
                check(m.pos.size() == m.n_tokens, "FORWARD pos count");
                check(!(m.flags & NAK_FWD_TOKENS) || m.tokens.size() == m.n_tokens, "FORWARD token count");
                if (m.flags & NAK_FWD_EMBD) {
                    check_embd_view(f, m.embd, m.embd_bytes, "FORWARD embd view");
                    decode_rows(f.hdr.dtype, m.embd, m.embd_bytes, m.n_tokens, n_embd);
                }
            });
            break;
        case NAK_MSG_FORWARD_OK:
            roundtrip<nak_forward_ok>(f.payload, "FORWARD_OK round trip", [&](const nak_forward_ok & m) {
                check_embd_view(f, m.embd, m.embd_bytes, "FORWARD_OK embd view");
                decode_rows(f.hdr.dtype, m.embd, m.embd_bytes, m.n_tokens, n_embd);
            });
            break;
        case NAK_MSG_BATCH:
            roundtrip<nak_batch>(f.payload, "BATCH round trip", [&](const nak_batch & m) {
                check_embd_view(f, m.embd, m.embd_bytes, "BATCH embd view");
                // as nak_stage::on_batch: each entry's rows in turn, only when they fit
                const size_t row_bytes = nak_wire_row_bytes(f.hdr.dtype, n_embd);
                size_t off = 0;
                for (const auto & e : m.entries) {
                    check(!(e.flags & NAK_FWD_TOKENS) || e.tokens.size() == e.n_tokens, "BATCH token count");
                    const size_t bytes = (size_t) e.n_tokens * row_bytes;
                    if (row_bytes > 0 && off + bytes <= m.embd_bytes) {
                        decode_rows(f.hdr.dtype, m.embd + off, bytes, e.n_tokens, n_embd);
                    }
                    off += bytes;
                }
            });
            break;
        case NAK_MSG_ERROR:
            roundtrip<nak_error>(f.payload, "ERROR round trip",
                                 [](const nak_error & m) { (void) nak_error_code_name(m.code); });
            break;
        default: {
            // health counters travel inside HELLO_OK; decode any other payload as them too
            nak_health m;
            nak_reader r(f.payload);
            if (nak_decode(r, m) && r.done()) {
                nak_writer w;
                nak_encode(w, m);
                check(w.buf == f.payload, "health round trip");
            }
        } break;
    }
    (void) nak_msg_type_name(f.hdr.type);
    (void) nak_wire_name(f.hdr.dtype);
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t * data, size_t size) {
    if (size < 2) {
        return 0;
    }
    uint32_t rng = 0x9e3779b9u ^ ((uint32_t) data[0] * 0x01000193u);
    const uint32_t n_embd = 1 + data[1];
    data += 2;
    size -= 2;

    nak_frame_parser parser;
    // small enough that the fuzzer reaches the too-large path; the stage's default is 64 MiB
    parser.max_payload = 1u << 16;
    size_t pos = 0;
    bool closed = false;
    while (pos < size && !closed) {
        // xorshift: chunks of 1..64 bytes, sometimes the rest at once
        rng ^= rng << 13;
        rng ^= rng >> 17;
        rng ^= rng << 5;
        size_t chunk = (rng & 7) == 0 ? size - pos : 1 + (rng >> 8) % 64;
        if (chunk > size - pos) {
            chunk = size - pos;
        }
        parser.feed(data + pos, chunk);
        pos += chunk;
        nak_frame f;
        for (;;) {
            const nak_parse_status st = parser.next(f);
            if (st == NAK_PARSE_FRAME) {
                check(f.hdr.magic == NAK_PROTO_MAGIC && f.hdr.version == NAK_PROTO_VERSION, "frame header");
                check(f.payload.size() == f.hdr.payload_len, "frame payload size");
                decode_frame(f, n_embd);
                continue;
            }
            // after an error the stage answers once and closes the connection
            closed = st != NAK_PARSE_NEED_MORE;
            break;
        }
    }
    return 0;
}

#ifdef NAK_FUZZ_CORPUS_WRITER
// Not part of the fuzz build: a small program that writes valid frames of each type as seeds.
static void write_seed(const std::string & dir, const std::string & name, uint8_t n_embd_seed,
                       const std::vector<std::vector<uint8_t>> & frames) {
    std::vector<uint8_t> bytes = { 0x2a, n_embd_seed };
    for (const auto & fr : frames) {
        bytes.insert(bytes.end(), fr.begin(), fr.end());
    }
    const std::string path = dir + "/" + name;
    FILE * fp = fopen(path.c_str(), "wb");
    check(fp != nullptr, "cannot write a seed");
    fwrite(bytes.data(), 1, bytes.size(), fp);
    fclose(fp);
}

static std::vector<uint8_t> frame(uint8_t type, uint8_t dtype, const nak_writer & w) {
    nak_header h;
    h.type       = type;
    h.dtype      = dtype;
    h.request_id = 7;
    h.session_id = 3;
    return nak_frame_bytes(h, w.buf);
}

int main(int argc, char ** argv) {
    if (argc != 3 || std::string(argv[1]) != "--write-corpus") {
        fprintf(stderr, "usage: %s --write-corpus DIR\n", argv[0]);
        return 2;
    }
    const std::string dir = argv[2];
    const uint32_t n_embd = 4; // n_embd seed 3
    const float rows[2 * 4] = { 0.5f, -1.0f, 2.0f, 3.5f, -0.25f, 8.0f, 0.0f, 1.0f };

    nak_hello hello;
    hello.caps        = 0;
    hello.client_name = "fuzz";
    nak_writer w_hello;
    nak_encode(w_hello, hello);
    write_seed(dir, "hello", 3, { frame(NAK_MSG_HELLO, 0, w_hello) });

    nak_hello_ok ok;
    ok.model_sha256 = "ab12";
    ok.arch         = "llama";
    ok.layer_end    = 4;
    ok.n_layer_full = 8;
    ok.n_embd       = n_embd;
    ok.n_vocab      = 32;
    ok.backend      = "cpu";
    ok.health.max_sessions = 4;
    nak_writer w_ok;
    nak_encode(w_ok, ok);
    write_seed(dir, "hello_ok", 3, { frame(NAK_MSG_HELLO_OK, 0, w_ok) });

    nak_open open;
    open.stop_tokens = { 2, 5 };
    open.seq         = 1;
    nak_writer w_open;
    nak_encode(w_open, open);
    write_seed(dir, "open", 3, { frame(NAK_MSG_OPEN, 0, w_open) });

    nak_forward fw;
    fw.flags    = NAK_FWD_TOKENS | NAK_FWD_SAMPLE;
    fw.n_tokens = 2;
    fw.pos      = { 0, 1 };
    fw.tokens   = { 17, 42 };
    fw.ring     = "127.0.0.1:9001,127.0.0.1:9002";
    nak_writer w_fw;
    nak_encode(w_fw, fw);
    write_seed(dir, "forward_tokens", 3, { frame(NAK_MSG_FORWARD, 0, w_fw) });

    const uint8_t dtypes[3] = { NAK_DTYPE_F32, NAK_DTYPE_BF16, NAK_DTYPE_Q8R };
    for (uint8_t dt : dtypes) {
        std::vector<uint8_t> wire;
        nak_wire_encode(dt, rows, 2, n_embd, wire);
        nak_forward fe;
        fe.flags      = NAK_FWD_EMBD | NAK_FWD_SAMPLE;
        fe.n_tokens   = 2;
        fe.pos        = { 4, 5 };
        fe.embd       = wire.data();
        fe.embd_bytes = wire.size();
        fe.next_hop   = "127.0.0.1:9002";
        nak_writer w_fe;
        nak_encode(w_fe, fe);

        nak_forward_ok fo;
        fo.n_tokens   = 2;
        fo.n_past     = 6;
        fo.embd       = wire.data();
        fo.embd_bytes = wire.size();
        nak_writer w_fo;
        nak_encode(w_fo, fo);

        nak_batch b;
        b.id = 9;
        nak_batch_entry e1;
        e1.session_id = 3;
        e1.flags      = NAK_FWD_SAMPLE;
        e1.n_tokens   = 1;
        e1.pos0       = 4;
        nak_batch_entry e2 = e1;
        e2.session_id = 4;
        e2.seq        = 1;
        e2.ring       = "127.0.0.1:9001";
        b.entries     = { e1, e2 };
        b.next_hop    = "127.0.0.1:9003";
        b.embd        = wire.data();
        b.embd_bytes  = wire.size();
        nak_writer w_b;
        nak_encode(w_b, b);

        const std::string n = nak_wire_name(dt);
        write_seed(dir, "forward_embd_" + n, 3, { frame(NAK_MSG_FORWARD, dt, w_fe) });
        write_seed(dir, "forward_ok_" + n, 3, { frame(NAK_MSG_FORWARD_OK, dt, w_fo) });
        write_seed(dir, "batch_" + n, 3, { frame(NAK_MSG_BATCH, dt, w_b) });
    }

    nak_forward_ok fs;
    fs.n_tokens = 1;
    fs.token    = 42;
    fs.is_eog   = 1;
    fs.piece    = " hi";
    nak_writer w_fs;
    nak_encode(w_fs, fs);
    write_seed(dir, "forward_ok_sampled", 3, { frame(NAK_MSG_FORWARD_OK, 0, w_fs) });

    nak_error err;
    err.code    = NAK_ERR_CTX_FULL;
    err.message = "context full";
    nak_writer w_err;
    nak_encode(w_err, err);
    write_seed(dir, "error", 3, { frame(NAK_MSG_ERROR, 0, w_err) });

    nak_health health;
    health.sessions_active = 1;
    health.uptime_ms       = 1000;
    nak_writer w_health;
    nak_encode(w_health, health);
    write_seed(dir, "health", 3, { frame(NAK_MSG_STATS_OK, 0, w_health) });

    // a connection's worth: HELLO, OPEN, FORWARD back to back
    write_seed(dir, "stream", 3, { frame(NAK_MSG_HELLO, 0, w_hello), frame(NAK_MSG_OPEN, 0, w_open),
                                   frame(NAK_MSG_FORWARD, 0, w_fw) });
    return 0;
}
#endif
