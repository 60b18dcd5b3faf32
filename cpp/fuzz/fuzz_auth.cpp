// libFuzzer target: the cluster-key handshake and the per-frame MACs (auth.h), as the stage runs
// them (nak_auth_gate is what cpp/stage/server.cpp feeds every received frame to).
//
// Input layout: | mode u8 | key seed u8 | nonce seed u8 | rest ... |
//
// mode bit 0 clear: a STRANGER. `rest` is the byte stream of a client without the key, cut into
//   frames by nak_frame_parser and checked by the gate; after its HELLO the stage answers HELLO_OK
//   (as the stage would). Property: nothing after the HELLO ever passes the gate; the handshake
//   never completes.
// mode bit 0 set: an HONEST client on a HOSTILE network. The harness runs the client's side with
//   the right key (nonce from the seed), and the handshake completes; the client's and the stage's
//   proofs are each checked by the other end (bit 1 flips one bit of the stage's AUTH_OK: the
//   client must refuse it). Then `rest` is a list of ops
//     | op u8 | pos u16 | len u8 | payload[len] |
//   each a frame of type op>>3 the client seals; op&7 says what the network does to it:
//     0, 6, 7 delivered as sent: it must pass with its header and payload intact, and the stage's
//             sealed echo must open at the client
//     1 one bit flipped at pos          2 MAC trailer cut short        3 the previous frame replayed
//     4 dropped (the next one arrives)  5 a frame of the stage reflected back to it
//   Any tampering must be refused (the connection closes, so the run ends there).
//
// Build and run: cpp/fuzz/run.sh SECONDS (runs this target after fuzz_frames).
#include "auth.h"
#include "protocol.h"

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

static void check(bool cond, const char * what) {
    if (!cond) {
        fprintf(stderr, "fuzz_auth: %s\n", what);
        abort();
    }
}

static std::vector<uint8_t> seeded_bytes(uint8_t seed, size_t n, uint32_t salt) {
    std::vector<uint8_t> out(n);
    uint32_t             x = 0x9e3779b9u ^ (seed * 0x01000193u) ^ salt;
    for (size_t i = 0; i < n; i++) {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        out[i] = (uint8_t) (x >> 11);
    }
    return out;
}

// a message as the frame a peer sends: encoded, behind a header of its type
template <typename T> static std::vector<uint8_t> frame_of(uint8_t type, const T & m) {
    nak_writer w;
    nak_encode(w, m);
    nak_header h;
    h.type = type;
    return nak_frame_bytes(h, w.buf);
}

// the stage's HELLO_OK for a HELLO that passed the gate: CAP_AUTH and a fresh nonce
static std::vector<uint8_t> stage_hello_ok(nak_auth_gate & gate, uint8_t seed) {
    nak_hello_ok ok;
    ok.caps  = NAK_CAP_AUTH;
    ok.arch  = "llama";
    ok.n_embd = 8;
    const std::vector<uint8_t> ns = seeded_bytes(seed, NAK_NONCE_SIZE, 0x5354u);
    memcpy(ok.nonce, ns.data(), NAK_NONCE_SIZE);
    const std::vector<uint8_t> bytes = frame_of(NAK_MSG_HELLO_OK, ok);
    gate.on_hello_ok_sent(bytes, ok.nonce);
    return bytes;
}

// feed bytes to the stage's parser and gate; the results of the frames they complete
struct stage_end {
    nak_auth_gate    gate;
    nak_frame_parser parser;
    uint8_t          seed   = 0;
    bool             closed = false;

    // returns the frames that passed; sets closed on a reject or a parse error
    std::vector<nak_frame> receive(const uint8_t * data, size_t n, std::vector<std::vector<uint8_t>> * replies) {
        std::vector<nak_frame> passed;
        parser.feed(data, n);
        nak_frame f;
        while (!closed) {
            const nak_parse_status st = parser.next(f);
            if (st == NAK_PARSE_NEED_MORE) {
                break;
            }
            if (st != NAK_PARSE_FRAME) {
                closed = true;
                break;
            }
            std::vector<uint8_t> reply;
            uint16_t             code = 0;
            std::string          err;
            const nak_gate_result g = gate.check(f, reply, code, err);
            if (g == NAK_GATE_REJECT) {
                check(!err.empty() && code != 0, "a reject names its reason");
                closed = true;
                break;
            }
            if (g == NAK_GATE_REPLY) {
                if (replies) {
                    replies->push_back(reply);
                }
                continue;
            }
            if (f.hdr.type == NAK_MSG_HELLO && gate.state == nak_auth_gate::WAIT_HELLO_OK) {
                std::vector<uint8_t> ok = stage_hello_ok(gate, seed);
                if (replies) {
                    replies->push_back(ok);
                }
            }
            passed.push_back(f);
        }
        return passed;
    }
};

static void run_stranger(const std::vector<uint8_t> & key, uint8_t seed, const uint8_t * data, size_t size) {
    stage_end s;
    s.gate.set_key(key);
    s.seed = seed;
    s.parser.max_payload = (1u << 14) + NAK_MAC_SIZE;
    size_t n_passed = 0;
    // in chunks as recv() would cut them
    for (size_t pos = 0; pos < size && !s.closed;) {
        const size_t chunk = std::min(size - pos, (size_t) 1 + data[pos] % 97);
        n_passed += s.receive(data + pos, chunk, nullptr).size();
        pos += chunk;
        check(n_passed <= 1, "a client without the key got a frame past the HELLO");
        check(s.gate.state != nak_auth_gate::DONE, "a client without the key completed the handshake");
    }
}

static void run_honest(const std::vector<uint8_t> & key, uint8_t seed, bool bad_auth_ok, const uint8_t * data,
                       size_t size) {
    stage_end s;
    s.gate.set_key(key);
    s.seed = seed;
    s.parser.max_payload = (1u << 14) + NAK_MAC_SIZE;

    nak_auth client;
    client.set_key(key);
    nak_hello hello;
    hello.caps        = NAK_CAP_AUTH;
    hello.client_name = "fuzz";
    const std::vector<uint8_t> nc = seeded_bytes(seed, NAK_NONCE_SIZE, 0x434cu);
    memcpy(hello.nonce, nc.data(), NAK_NONCE_SIZE);
    const std::vector<uint8_t> hello_bytes = frame_of(NAK_MSG_HELLO, hello);
    client.on_hello(hello_bytes, hello.nonce);

    std::vector<std::vector<uint8_t>> replies;
    check(s.receive(hello_bytes.data(), hello_bytes.size(), &replies).size() == 1, "the HELLO passes");
    check(replies.size() == 1, "the stage answers HELLO_OK");
    nak_frame_parser cp;
    cp.feed(replies[0].data(), replies[0].size());
    nak_frame okf;
    check(cp.next(okf) == NAK_PARSE_FRAME, "HELLO_OK parses");
    nak_hello_ok ok;
    check(nak_decode(okf.payload, ok) && (ok.caps & NAK_CAP_AUTH), "HELLO_OK decodes with CAP_AUTH");
    client.on_hello_ok(replies[0], ok.nonce);

    uint8_t proof[NAK_PROOF_SIZE];
    client.client_proof(proof);
    const std::vector<uint8_t> auth = nak_auth_frame(NAK_MSG_AUTH, proof);
    replies.clear();
    check(s.receive(auth.data(), auth.size(), &replies).empty(), "AUTH is consumed");
    check(!s.closed && replies.size() == 1 && s.gate.state == nak_auth_gate::DONE, "the right proof is accepted");
    // the client checks the stage's proof as cpp/protocol/net.cpp does
    std::vector<uint8_t> auth_ok = replies[0];
    if (bad_auth_ok) {
        auth_ok[NAK_HEADER_SIZE + seed % NAK_PROOF_SIZE] ^= (uint8_t) (1u << (seed % 8));
    }
    uint8_t want[NAK_PROOF_SIZE];
    client.stage_proof(want);
    const bool proof_ok = auth_ok.size() == NAK_HEADER_SIZE + NAK_PROOF_SIZE &&
                          nak_ct_equal(want, auth_ok.data() + NAK_HEADER_SIZE, NAK_PROOF_SIZE);
    check(proof_ok == !bad_auth_ok, "the client accepts exactly the stage's proof");
    if (!proof_ok) {
        return;
    }
    client.establish();

    std::vector<uint8_t> prev;           // the last frame delivered, as sent
    std::vector<uint8_t> last_from_stage; // the stage's last sealed frame
    bool   skipped = false; // the client sealed a frame that never arrived: later ones must be refused
    size_t pos = 0;
    while (pos + 4 <= size && !s.closed) {
        const uint8_t  op  = data[pos];
        const uint16_t at  = (uint16_t) (data[pos + 1] | data[pos + 2] << 8);
        const size_t   len = std::min((size_t) data[pos + 3], size - pos - 4);
        std::vector<uint8_t> payload(data + pos + 4, data + pos + 4 + len);
        pos += 4 + len;

        nak_header fh;
        fh.type       = (uint8_t) (op >> 3);
        fh.request_id = pos;
        fh.session_id = op;
        std::vector<uint8_t> sealed = nak_frame_bytes(fh, payload);
        client.seal(sealed);

        const int what = op & 7;
        std::vector<uint8_t> sent = sealed;
        if (what == 1) {
            const size_t i = at % (sent.size() * 8);
            sent[i / 8] ^= (uint8_t) (1u << (i % 8));
        } else if (what == 2) {
            sent.resize(sent.size() - 1 - at % NAK_MAC_SIZE);
            nak_header th;
            nak_header_decode(sent.data(), th);
            th.payload_len = (uint32_t) (sent.size() - NAK_HEADER_SIZE);
            nak_header_encode(th, sent.data());
        } else if (what == 3) {
            if (prev.empty()) {
                skipped = true; // nothing to replay yet; this frame never left
                continue;
            }
            sent = prev;
        } else if (what == 4) {
            skipped = true; // dropped in flight: the next frame's counter no longer matches
            continue;
        } else if (what == 5) {
            if (last_from_stage.empty()) {
                skipped = true;
                continue;
            }
            sent = last_from_stage;
        }
        const bool tampered = what >= 1 && what <= 5;

        const std::vector<nak_frame> passed = s.receive(sent.data(), sent.size(), nullptr);
        if (tampered) {
            check(passed.empty(), "a tampered, replayed, reordered or reflected frame passed the gate");
            // a bit flip in payload_len may leave the parser waiting for bytes that never come;
            // the stage's handshake and idle timeouts end such a connection
            return;
        }
        if (s.closed) {
            check(skipped, "an honest sealed frame was refused");
            return;
        }
        check(!skipped, "a frame passed after one before it was dropped");
        check(passed.size() == 1, "an honest sealed frame passes the gate");
        const nak_frame & f = passed[0];
        check(f.hdr.type == fh.type && f.hdr.request_id == fh.request_id && f.hdr.session_id == fh.session_id,
              "the header arrives intact");
        check(f.payload == payload, "the payload arrives intact, trailer stripped");
        prev = sealed;

        // the stage answers with a sealed echo; the client opens it
        nak_header eh;
        eh.type       = NAK_MSG_FORWARD_OK;
        eh.request_id = fh.request_id;
        std::vector<uint8_t> echo = nak_frame_bytes(eh, payload);
        s.gate.auth.seal(echo);
        last_from_stage = echo;
        nak_frame_parser ep;
        ep.feed(echo.data(), echo.size());
        nak_frame ef;
        check(ep.next(ef) == NAK_PARSE_FRAME, "the stage's sealed frame parses");
        std::string err;
        check(client.open(ef, err) && ef.payload == payload, "the client opens the stage's sealed frame");
    }
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t * data, size_t size) {
    if (size < 3) {
        return 0;
    }
    const uint8_t mode = data[0];
    const std::vector<uint8_t> key = seeded_bytes(data[1], NAK_KEY_SIZE, 0x4b45u);
    const uint8_t seed = data[2];
    if (mode & 1) {
        run_honest(key, seed, (mode & 2) != 0, data + 3, size - 3);
    } else {
        run_stranger(key, seed, data + 3, size - 3);
    }
    return 0;
}
