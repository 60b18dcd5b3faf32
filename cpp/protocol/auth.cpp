#include "auth.h"

#include <cstring>

void nak_sha256(const uint8_t * data, size_t n, uint8_t out[32]) {
    sha256_t s;
    sha256_init(&s);
    sha256_update(&s, data, n);
    sha256_final(&s, out);
}

bool nak_ct_equal(const uint8_t * a, const uint8_t * b, size_t n) {
    volatile uint8_t d = 0;
    for (size_t i = 0; i < n; i++) {
        d = d | (uint8_t) (a[i] ^ b[i]);
    }
    return d == 0;
}

// RFC 2104: H((K ^ opad) | H((K ^ ipad) | m)), K hashed first when longer than a block
void nak_hmac::set_key(const uint8_t * key, size_t n) {
    uint8_t k[64] = {};
    if (n > 64) {
        nak_sha256(key, n, k);
    } else if (n > 0) {
        memcpy(k, key, n);
    }
    uint8_t pad[64];
    for (int i = 0; i < 64; i++) pad[i] = k[i] ^ 0x36;
    sha256_init(&inner0);
    sha256_update(&inner0, pad, 64);
    for (int i = 0; i < 64; i++) pad[i] = k[i] ^ 0x5c;
    sha256_init(&outer0);
    sha256_update(&outer0, pad, 64);
    memset(k, 0, sizeof(k));
    memset(pad, 0, sizeof(pad));
    cur = inner0;
}

void nak_hmac::final(uint8_t out[32]) {
    uint8_t ih[32];
    sha256_final(&cur, ih);
    sha256_t o = outer0;
    sha256_update(&o, ih, 32);
    sha256_final(&o, out);
}

void nak_hmac_sha256(const uint8_t * key, size_t key_len, const uint8_t * data, size_t n, uint8_t out[32]) {
    nak_hmac h;
    h.set_key(key, key_len);
    h.begin();
    h.update(data, n);
    h.final(out);
}

bool nak_parse_key_hex(const std::string & hex, std::vector<uint8_t> & key, std::string & err) {
    std::string s;
    for (char ch : hex) {
        if (ch != ' ' && ch != '\n' && ch != '\r' && ch != '\t') {
            s.push_back(ch);
        }
    }
    if (s.size() != 2 * NAK_KEY_SIZE) {
        err = "a cluster key is " + std::to_string(2 * NAK_KEY_SIZE) + " hex digits (`nak keygen`), got " +
              std::to_string(s.size()) + " characters";
        return false;
    }
    key.assign(NAK_KEY_SIZE, 0);
    for (size_t i = 0; i < s.size(); i++) {
        const char ch = s[i];
        int v;
        if (ch >= '0' && ch <= '9') v = ch - '0';
        else if (ch >= 'a' && ch <= 'f') v = ch - 'a' + 10;
        else if (ch >= 'A' && ch <= 'F') v = ch - 'A' + 10;
        else {
            err = "a cluster key is hex digits only (`nak keygen`)";
            key.clear();
            return false;
        }
        key[i / 2] = (uint8_t) (key[i / 2] << 4 | v);
    }
    return true;
}

void nak_auth::set_key(const std::vector<uint8_t> & k) {
    enabled = k.size() == NAK_KEY_SIZE;
    if (enabled) {
        memcpy(key, k.data(), NAK_KEY_SIZE);
    }
    reset();
}

void nak_auth::reset() {
    ready    = false;
    send_ctr = recv_ctr = 0;
    sha256_init(&th);
}

void nak_auth::on_hello(const std::vector<uint8_t> & frame_bytes, const uint8_t nonce_c[NAK_NONCE_SIZE]) {
    reset();
    memcpy(nc, nonce_c, NAK_NONCE_SIZE);
    sha256_update(&th, frame_bytes.data(), frame_bytes.size());
}

void nak_auth::on_hello_ok(const std::vector<uint8_t> & frame_bytes, const uint8_t nonce_s[NAK_NONCE_SIZE]) {
    memcpy(ns, nonce_s, NAK_NONCE_SIZE);
    sha256_update(&th, frame_bytes.data(), frame_bytes.size());
    sha256_t t = th;
    sha256_final(&t, transcript);
}

static void labelled(const uint8_t key[NAK_KEY_SIZE], const char * label, const uint8_t * a, const uint8_t * b,
                     const uint8_t transcript[32], uint8_t out[32]) {
    nak_hmac h;
    h.set_key(key, NAK_KEY_SIZE);
    h.begin();
    h.update(label, strlen(label));
    h.update(a, NAK_NONCE_SIZE);
    h.update(b, NAK_NONCE_SIZE);
    h.update(transcript, 32);
    h.final(out);
}

void nak_auth::client_proof(uint8_t out[NAK_PROOF_SIZE]) const {
    labelled(key, "nakshatra-v1 client", nc, ns, transcript, out);
}

void nak_auth::stage_proof(uint8_t out[NAK_PROOF_SIZE]) const {
    labelled(key, "nakshatra-v1 stage", ns, nc, transcript, out);
}

void nak_auth::establish() {
    uint8_t ks[32];
    labelled(key, "nakshatra-v1 session", nc, ns, transcript, ks);
    session.set_key(ks, sizeof(ks));
    memset(ks, 0, sizeof(ks));
    send_ctr = recv_ctr = 0;
    ready = true;
}

static void frame_mac(nak_hmac & h, uint8_t dir, uint64_t ctr, const uint8_t * hdr, const uint8_t * payload, size_t n,
                      uint8_t out[32]) {
    uint8_t pre[9];
    pre[0] = dir;
    memcpy(pre + 1, &ctr, 8); // little-endian hosts only, as the rest of the wire
    h.begin();
    h.update(pre, sizeof(pre));
    h.update(hdr, NAK_HEADER_SIZE);
    h.update(payload, n);
    h.final(out);
}

void nak_auth::seal(std::vector<uint8_t> & frame) {
    if (!ready || frame.size() < NAK_HEADER_SIZE) {
        return;
    }
    nak_header h;
    nak_header_decode(frame.data(), h);
    const size_t n = frame.size() - NAK_HEADER_SIZE;
    h.flags |= NAK_FLAG_MAC;
    h.payload_len = (uint32_t) (n + NAK_MAC_SIZE);
    nak_header_encode(h, frame.data());
    uint8_t mac[32];
    frame_mac(session, is_stage ? 'S' : 'C', send_ctr++, frame.data(), frame.data() + NAK_HEADER_SIZE, n, mac);
    frame.insert(frame.end(), mac, mac + NAK_MAC_SIZE);
}

bool nak_auth::open(nak_frame & f, std::string & err) {
    if (!ready) {
        return true;
    }
    if (!(f.hdr.flags & NAK_FLAG_MAC) || f.payload.size() < NAK_MAC_SIZE) {
        err = "frame without a MAC on an authenticated connection";
        return false;
    }
    uint8_t hdr[NAK_HEADER_SIZE];
    nak_header_encode(f.hdr, hdr);
    const size_t n = f.payload.size() - NAK_MAC_SIZE;
    uint8_t mac[32];
    frame_mac(session, is_stage ? 'C' : 'S', recv_ctr, hdr, f.payload.data(), n, mac);
    if (!nak_ct_equal(mac, f.payload.data() + n, NAK_MAC_SIZE)) {
        err = "frame failed authentication (bad MAC: altered, replayed or reordered in flight?)";
        return false;
    }
    recv_ctr++;
    f.payload.resize(n);
    return true;
}

std::vector<uint8_t> nak_auth_frame(uint8_t type, const uint8_t proof[NAK_PROOF_SIZE]) {
    nak_header h;
    h.type = type;
    return nak_frame_bytes(h, std::vector<uint8_t>(proof, proof + NAK_PROOF_SIZE));
}

void nak_auth_gate::set_key(const std::vector<uint8_t> & k) {
    auth.set_key(k);
    auth.is_stage = true;
    state         = WAIT_HELLO;
}

nak_gate_result nak_auth_gate::check(nak_frame & f, std::vector<uint8_t> & reply, uint16_t & code, std::string & err) {
    code = NAK_ERR_UNAUTHORIZED;
    switch (state) {
        case WAIT_HELLO: {
            nak_hello m;
            if (f.hdr.type != NAK_MSG_HELLO || !nak_decode(f.payload, m)) {
                code = NAK_ERR_BAD_REQUEST;
                err  = "the first frame on a connection must be a well-formed HELLO";
                return NAK_GATE_REJECT;
            }
            if (!(m.caps & NAK_CAP_AUTH)) {
                err = "this stage requires the cluster key: give the client the same key "
                      "(--key-file FILE or NAK_KEY; `nak keygen` makes one)";
                return NAK_GATE_REJECT;
            }
            auth.on_hello(nak_frame_bytes(f.hdr, f.payload), m.nonce);
            state = WAIT_HELLO_OK;
            return NAK_GATE_PASS;
        }
        case WAIT_HELLO_OK:
        case WAIT_AUTH: {
            if (f.hdr.type != NAK_MSG_AUTH || state != WAIT_AUTH) {
                err = "this stage requires the cluster key: AUTH must follow HELLO_OK";
                return NAK_GATE_REJECT;
            }
            // the client's proof: HMAC(K, "client" | nc | ns | transcript), answered by ours
            uint8_t want[NAK_PROOF_SIZE];
            auth.client_proof(want);
            if (f.payload.size() != NAK_PROOF_SIZE || !nak_ct_equal(want, f.payload.data(), NAK_PROOF_SIZE)) {
                err = "wrong cluster key: this stage holds another key (or the handshake was replayed)";
                return NAK_GATE_REJECT;
            }
            uint8_t proof[NAK_PROOF_SIZE];
            auth.stage_proof(proof);
            reply = nak_auth_frame(NAK_MSG_AUTH_OK, proof);
            auth.establish();
            state = DONE;
            return NAK_GATE_REPLY;
        }
        case DONE:
            return auth.open(f, err) ? NAK_GATE_PASS : NAK_GATE_REJECT;
    }
    err = "unreachable";
    return NAK_GATE_REJECT;
}

void nak_auth_gate::on_hello_ok_sent(const std::vector<uint8_t> & frame_bytes, const uint8_t nonce_s[NAK_NONCE_SIZE]) {
    auth.on_hello_ok(frame_bytes, nonce_s);
    state = WAIT_AUTH;
}
