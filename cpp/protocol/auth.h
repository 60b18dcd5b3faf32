// Cluster-key authentication: a mutual HMAC-SHA256 challenge-response after HELLO / HELLO_OK,
// then a truncated HMAC on every frame under a per-connection session key.
//
// SHA-256 is llama.cpp's vendored public-domain implementation (vendor/hash/sha256, Igor Pavlov,
// compiled from the fetched llama.cpp tree); HMAC is RFC 2104 on top of it. No secret crosses the
// wire. There is no encryption: use WireGuard / Tailscale between hosts for confidentiality.
//
// Handshake (K: the 32-byte cluster key; nc, ns: 32 fresh random bytes from client and stage;
// T = SHA256(HELLO frame bytes | HELLO_OK frame bytes), so the whole HELLO exchange is bound):
//
//   client -> stage  HELLO     caps | NAK_CAP_AUTH, nonce nc          (a keyless HELLO is refused)
//   stage  -> client HELLO_OK  caps | NAK_CAP_AUTH, nonce ns          (no CAP_AUTH: the client refuses)
//   client -> stage  AUTH      HMAC(K, "nakshatra-v1 client" | nc | ns | T)   (32 bytes)
//   stage  -> client AUTH_OK   HMAC(K, "nakshatra-v1 stage"  | ns | nc | T)   (32 bytes)
//
// A wrong client proof gets ERROR unauthorized and the connection closes; a wrong stage proof
// makes the client close. A recorded AUTH cannot be replayed: the stage's ns is fresh each time.
// Both ends then derive  Ks = HMAC(K, "nakshatra-v1 session" | nc | ns | T)  and every later frame
// in either direction carries NAK_FLAG_MAC in its header flags and a 16-byte trailer
//
//   MAC = HMAC(Ks, dir u8 | counter u64 | header[32] | payload)[0:16]
//
// counted in payload_len (the header is MACed as sent, flag and length included). dir is 'C' for
// client-to-stage frames and 'S' for stage-to-client (so a frame cannot be reflected back), and
// counter is the frame's index in its direction from 0 (so frames cannot be dropped, reordered or
// replayed). A missing or bad MAC closes the connection. MACs are compared in constant time.
#pragma once

#include "protocol.h"

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

extern "C" {
#include "sha256/sha256.h"
}

#define NAK_KEY_SIZE   32
#define NAK_MAC_SIZE   16 // per-frame trailer (truncated HMAC-SHA256)
#define NAK_PROOF_SIZE 32

void nak_sha256(const uint8_t * data, size_t n, uint8_t out[32]);
bool nak_ct_equal(const uint8_t * a, const uint8_t * b, size_t n);

// HMAC-SHA256 (RFC 2104) with the key's inner and outer pads absorbed once, so that each MAC costs
// the message's blocks plus two
struct nak_hmac {
    sha256_t inner0{}, outer0{};
    sha256_t cur{};

    void set_key(const uint8_t * key, size_t n);
    void begin() { cur = inner0; }
    void update(const void * p, size_t n) { sha256_update(&cur, (const unsigned char *) p, n); }
    void final(uint8_t out[32]);
};

void nak_hmac_sha256(const uint8_t * key, size_t key_len, const uint8_t * data, size_t n, uint8_t out[32]);

// parse a hex key (64 hex digits, surrounding whitespace allowed); false with err on a bad key
bool nak_parse_key_hex(const std::string & hex, std::vector<uint8_t> & key, std::string & err);

// One end of one connection.
struct nak_auth {
    bool     enabled  = false; // a key is configured
    bool     is_stage = false; // the accepting end
    bool     ready    = false; // handshake done: frames are MACed
    uint8_t  key[NAK_KEY_SIZE] = {};
    uint8_t  nc[NAK_NONCE_SIZE] = {};
    uint8_t  ns[NAK_NONCE_SIZE] = {};
    uint8_t  transcript[32] = {};
    sha256_t th{};             // running hash of HELLO | HELLO_OK
    nak_hmac session;
    uint64_t send_ctr = 0;
    uint64_t recv_ctr = 0;

    void set_key(const std::vector<uint8_t> & k);
    void reset();
    // record the HELLO / HELLO_OK frames (bytes as sent) and their nonces
    void on_hello(const std::vector<uint8_t> & frame_bytes, const uint8_t nonce_c[NAK_NONCE_SIZE]);
    void on_hello_ok(const std::vector<uint8_t> & frame_bytes, const uint8_t nonce_s[NAK_NONCE_SIZE]);
    void client_proof(uint8_t out[NAK_PROOF_SIZE]) const;
    void stage_proof(uint8_t out[NAK_PROOF_SIZE]) const;
    // derive the session key; from now on seal() / open() apply
    void establish();

    // append the MAC trailer to a complete frame (header + payload) and set NAK_FLAG_MAC; a no-op
    // before the handshake is done
    void seal(std::vector<uint8_t> & frame);
    // check and strip the trailer of a received frame (hdr.payload_len is left as received);
    // false with err when the MAC is missing or wrong (the caller closes the connection)
    bool open(nak_frame & f, std::string & err);
};

// What the accepting end does with one received frame (nak_auth_gate::check).
enum nak_gate_result {
    NAK_GATE_PASS,   // hand the frame on (its MAC trailer, if any, stripped)
    NAK_GATE_REPLY,  // a handshake frame, consumed: send `reply` as it is (no MAC)
    NAK_GATE_REJECT, // answer ERROR `code` / `err`, then close the connection
};

// The accepting end's side of the handshake and of the MACs after it, one received frame at a
// time, with no socket in sight: cpp/stage/server.cpp feeds it, and cpp/fuzz/fuzz_auth.cpp drives
// it with hostile and tampered streams. Call only when a key is set (auth.enabled).
struct nak_auth_gate {
    enum state_t { WAIT_HELLO, WAIT_HELLO_OK, WAIT_AUTH, DONE } state = WAIT_HELLO;
    nak_auth auth; // is_stage = true

    void set_key(const std::vector<uint8_t> & k);
    // the first frame must be a HELLO with CAP_AUTH and a nonce; then only AUTH (right proof); then
    // only frames with a good MAC
    nak_gate_result check(nak_frame & f, std::vector<uint8_t> & reply, uint16_t & code, std::string & err);
    // the stage answered the HELLO with this HELLO_OK frame (bytes as sent, CAP_AUTH set, nonce ns)
    void on_hello_ok_sent(const std::vector<uint8_t> & frame_bytes, const uint8_t nonce_s[NAK_NONCE_SIZE]);
};

// a frame of type AUTH / AUTH_OK carrying a proof
std::vector<uint8_t> nak_auth_frame(uint8_t type, const uint8_t proof[NAK_PROOF_SIZE]);
