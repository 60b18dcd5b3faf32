// The stage executor: decode steps from FORWARD and BATCH frames, checked against their sessions,
// decoded as one llama_decode per batch, then answered (FORWARD_OK to the session's owner) or
// passed on to the next stage; a speculative window's rejected rows rolled back.
#include "stage.h"
#include "stage_util.h"

#include "wire.h"

#include <algorithm>
#include <cerrno>
#include <sys/file.h>
#include <unistd.h>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <signal.h>
#include <thread>

// JSON (--batch-log) through the library in llama.cpp's vendor/ tree; ordered_json keeps the keys
// in the order written
#include <nlohmann/json.hpp>
using json = nlohmann::ordered_json;

// ---- decode steps: FORWARD frames and BATCH frames ---------------------------------------------

size_t nak_stage::ring_due(int64_t now, const std::vector<uint64_t> & except) const {
    size_t n = 0;
    for (const auto & kv : ring_trips_) {
        const ring_trip & t = kv.second;
        if (!t.out || t.cycle_us == 0 || std::find(except.begin(), except.end(), kv.first) != except.end()) {
            continue;
        }
        if (now < t.sent_us + t.cycle_us * 3 / 2 + 1000) {
            n++;
        }
    }
    return n;
}

// a FORWARD frame as one step; `next_hop` receives its route
static nak_step step_from_forward(const nak_frame & req, int32_t conn, std::string & next_hop) {
    nak_forward f;
    if (!nak_decode(req.payload, f)) {
        throw nak_reject{ NAK_ERR_BAD_REQUEST, "malformed FORWARD payload" };
    }
    nak_step st;
    st.e.session_id = req.hdr.session_id;
    st.e.request_id = req.hdr.request_id;
    st.e.step       = f.step;
    st.e.flags      = f.flags & (NAK_FWD_TOKENS | NAK_FWD_SAMPLE | NAK_FWD_RING | NAK_FWD_SPEC);
    st.e.n_tokens   = f.n_tokens;
    st.e.pos0       = f.n_tokens > 0 ? f.pos[0] : 0;
    st.e.tokens     = std::move(f.tokens);
    st.e.ring       = std::move(f.ring);
    st.e.token      = f.token;
    for (uint32_t i = 0; i < f.n_tokens; i++) {
        if (f.pos[i] != st.e.pos0 + (int32_t) i) {
            throw nak_reject{ NAK_ERR_BAD_REQUEST, "positions of one step must be consecutive" };
        }
    }
    st.embd       = (f.flags & NAK_FWD_EMBD) ? f.embd : nullptr;
    st.embd_bytes = (f.flags & NAK_FWD_EMBD) ? f.embd_bytes : 0;
    st.dtype      = req.hdr.dtype;
    st.req        = req.hdr;
    st.reply_conn = conn;
    next_hop      = std::move(f.next_hop);
    return st;
}

bool nak_stage::batchable(const nak_frame & req, std::string & route) {
    if (req.hdr.type != NAK_MSG_FORWARD) {
        return false;
    }
    nak_forward f;
    if (!nak_decode(req.payload, f) || f.next_hop.empty()) {
        return false;
    }
    route = f.next_hop;
    return true;
}

// check a step against its session before it joins a batch; throws nak_reject
void nak_stage::check_step(nak_step & st, const std::string & next_hop) {
    nak_session * s = find_session(st.e.session_id);
    if (!s) {
        throw nak_reject{ NAK_ERR_NO_SESSION, "no open session " + std::to_string(st.e.session_id) + " on this stage" };
    }
    // a step from the session's own connection, or carrying its token (the stage before on its
    // route); anything else is refused to the sender, before the session is touched
    if (st.reply_conn != s->conn && (s->token == 0 || st.e.token != s->token)) {
        throw nak_reject{ NAK_ERR_UNAUTHORIZED, "session " + std::to_string(st.e.session_id) +
                          " belongs to another connection and this step does not carry its token: only the client "
                          "that opened a session, and the stages on its route, may write into it" };
    }
    st.s          = s;
    st.reply_conn = s->conn; // the client waits for the reply (or an error) on its own connection
    const uint32_t n = st.e.n_tokens;
    if (st.e.step != s->next_step) {
        throw nak_reject{ NAK_ERR_BAD_REQUEST, "step " + std::to_string(st.e.step) + " out of order: expected " +
                          std::to_string(s->next_step) };
    }
    if (n == 0 || n > params_.n_batch) {
        throw nak_reject{ NAK_ERR_BAD_REQUEST, "a FORWARD carries 1.." + std::to_string(params_.n_batch) +
                          " tokens, not " + std::to_string(n) };
    }
    // a step continues the cached positions, or starts inside the last speculative window (its
    // rejected rows are dropped first, roll_back)
    if (st.e.pos0 > (int32_t) s->n_past || st.e.pos0 < (int32_t) (s->n_past - s->spec_tail)) {
        throw nak_reject{ NAK_ERR_BAD_REQUEST, "position " + std::to_string(st.e.pos0) + " does not continue the " +
                          std::to_string(s->n_past) + " cached positions; TRUNCATE first" };
    }
    if ((uint64_t) st.e.pos0 + n > params_.n_ctx_session) {
        throw nak_reject{ NAK_ERR_CTX_FULL, "session context full: " + std::to_string(st.e.pos0) + " + " +
                          std::to_string(n) + " tokens > --ctx " + std::to_string(params_.n_ctx_session) };
    }
    if ((st.e.flags & NAK_FWD_SPEC) && n < 2) {
        throw nak_reject{ NAK_ERR_BAD_REQUEST, "a speculative window holds the sampled token and at least one draft" };
    }
    if ((st.e.flags & NAK_FWD_SAMPLE) && !is_last() && next_hop.empty()) {
        throw nak_reject{ NAK_ERR_BAD_REQUEST, "only the last stage samples (no route to it given)" };
    }
    if (is_last() && !next_hop.empty()) {
        throw nak_reject{ NAK_ERR_BAD_REQUEST, "the last stage has no next hop (route '" + next_hop + "')" };
    }
    const int32_t n_vocab = llama_vocab_n_tokens(vocab_);
    if (st.e.flags & NAK_FWD_TOKENS) {
        for (int32_t t : st.e.tokens) {
            if (t < 0 || t >= n_vocab) {
                throw nak_reject{ NAK_ERR_BAD_REQUEST, "token id " + std::to_string(t) + " outside the vocabulary [0, " +
                                  std::to_string(n_vocab) + ")" };
            }
        }
    }
    if (is_first()) {
        if (!(st.e.flags & NAK_FWD_TOKENS)) {
            throw nak_reject{ NAK_ERR_BAD_REQUEST, "the first stage takes token ids" };
        }
        return;
    }
    const size_t row_bytes = nak_wire_row_bytes(st.dtype, n_embd_);
    if (!st.embd || row_bytes == 0) {
        throw nak_reject{ NAK_ERR_BAD_REQUEST, "this stage takes hidden states (layers from " +
                          std::to_string(layer_start_) + ") as f32, bf16 or q8r" };
    }
    if (st.embd_bytes != (size_t) n * row_bytes) {
        throw nak_reject{ NAK_ERR_BAD_REQUEST, "hidden state of " + std::to_string(st.embd_bytes) +
                          " bytes; expected n_tokens x " + std::to_string(row_bytes) + " = " +
                          std::to_string((size_t) n * row_bytes) };
    }
}

void nak_stage::reject_step(const nak_step & st, int32_t conn, uint16_t code, const std::string & msg,
                            std::vector<nak_outgoing> & out) {
    nak_header req = st.req;
    req.request_id = st.e.request_id;
    req.session_id = st.e.session_id;
    nak_outgoing s;
    s.conn  = st.s ? st.s->conn : conn;
    s.frame = nak_error_frame(req, code, msg);
    bytes_out_ += s.frame.size();
    out.push_back(std::move(s));
}

void nak_stage::on_forwards(const std::vector<const nak_frame *> & reqs, const std::vector<int32_t> & conns,
                            std::vector<nak_outgoing> & out) {
    std::vector<nak_step> steps;
    std::string next_hop;
    for (size_t i = 0; i < reqs.size(); i++) {
        bytes_in_ += NAK_HEADER_SIZE + reqs[i]->payload.size();
        nak_step st;
        st.req        = reqs[i]->hdr;
        st.reply_conn = conns[i];
        try {
            std::string hop;
            st = step_from_forward(*reqs[i], conns[i], hop);
            if (i > 0 && hop != next_hop) {
                throw nak_reject{ NAK_ERR_INTERNAL, "steps of one batch must share a route" };
            }
            next_hop = hop;
            check_step(st, next_hop);
            roll_back(st);
            st.wire_in = NAK_HEADER_SIZE + reqs[i]->payload.size();
            auto it = ring_trips_.find(st.e.session_id);
            if (it != ring_trips_.end() && it->second.out) {
                it->second.out      = false;
                it->second.cycle_us = nak_now_us() - it->second.sent_us;
            }
            steps.push_back(std::move(st));
        } catch (const nak_reject & e) {
            reject_step(st, conns[i], e.code, e.message, out);
        }
    }
    if (!steps.empty()) {
        run_steps(steps, next_hop, is_first() && !next_hop.empty() ? ++n_batches_formed_ : 0, out);
    }
}

void nak_stage::on_batch(const nak_frame & req, int32_t conn, std::vector<nak_outgoing> & out) {
    bytes_in_ += NAK_HEADER_SIZE + req.payload.size();
    nak_batch b;
    if (!nak_decode(req.payload, b)) {
        nak_outgoing s;
        s.conn  = conn;
        s.frame = nak_error_frame(req.hdr, NAK_ERR_BAD_REQUEST, "malformed BATCH payload");
        out.push_back(std::move(s));
        return;
    }
    const size_t row_bytes = nak_wire_row_bytes(req.hdr.dtype, n_embd_);
    size_t off = 0;
    std::vector<nak_step> steps;
    for (auto & e : b.entries) {
        nak_step st;
        st.req        = req.hdr;
        st.dtype      = req.hdr.dtype;
        st.reply_conn = conn;
        const size_t bytes = (size_t) e.n_tokens * row_bytes;
        if (row_bytes > 0 && off + bytes <= b.embd_bytes) {
            st.embd       = b.embd + off;
            st.embd_bytes = bytes;
        }
        off += bytes;
        st.e = std::move(e);
        try {
            check_step(st, b.next_hop);
            roll_back(st);
            if (st.e.seq != st.s->seq) {
                // decoded all the same, but the batch may be cut into other ubatches than upstream
                seq_mismatches_++;
            }
            st.wire_in = (NAK_HEADER_SIZE + req.payload.size()) / std::max<size_t>(1, b.entries.size());
            steps.push_back(std::move(st));
        } catch (const nak_reject & e) {
            reject_step(st, conn, e.code, e.message, out);
        }
    }
    if (off != b.embd_bytes) {
        for (const auto & st : steps) {
            reject_step(st, conn, NAK_ERR_BAD_REQUEST, "BATCH hidden states do not match its rows", out);
        }
        return;
    }
    if (!steps.empty()) {
        run_steps(steps, b.next_hop, b.id, out);
    }
}

// Testing hook for the failover tests: with NAK_DEBUG_KILL_DIR set, a stage whose file
// <dir>/<pid> holds "STEP before" or "STEP after" removes that file and SIGKILLs itself at the
// first step >= STEP of any session, before its llama_decode or after it (the result computed,
// not sent). A signal from outside cannot do this deterministically in ring mode, where the
// stages run ahead of the client that would send it. "STEP hang" blocks the compute thread there
// instead (until shutdown), while the network thread goes on answering: a hung computation.
// Unset (always, outside tests): one branch.
static void nak_debug_kill_point(const std::vector<nak_step> & steps, const char * when,
                                 const std::atomic<bool> & stop) {
    static const char * dir = getenv("NAK_DEBUG_KILL_DIR");
    if (dir == nullptr || *dir == '\0') {
        return;
    }
    const std::string path = std::string(dir) + "/" + std::to_string((long) getpid());
    FILE * f = fopen(path.c_str(), "r");
    if (f == nullptr) {
        return;
    }
    unsigned long long step = 0;
    char at[16] = {};
    const bool ok = fscanf(f, "%llu %15s", &step, at) == 2;
    fclose(f);
    const bool hang = ok && strcmp(at, "hang") == 0 && strcmp(when, "before") == 0;
    if (!ok || (strcmp(at, when) != 0 && !hang)) {
        return;
    }
    for (const auto & st : steps) {
        if (st.e.step >= step) {
            unlink(path.c_str()); // a replica started from the same environment lives on
            if (hang) {
                fprintf(stderr, "nak stage: NAK_DEBUG_KILL_DIR: compute hangs at step %llu\n",
                        (unsigned long long) st.e.step);
                while (!stop.load()) {
                    std::this_thread::sleep_for(std::chrono::milliseconds(20));
                }
                return;
            }
            fprintf(stderr, "nak stage: NAK_DEBUG_KILL_DIR: killed at step %llu (%s)\n",
                    (unsigned long long) st.e.step, when);
            raise(SIGKILL);
        }
    }
}

// one llama_decode over every step's rows, in order; then each step's reply, or the batch onward
void nak_stage::run_steps(std::vector<nak_step> & steps, const std::string & next_hop, uint64_t batch_id,
                          std::vector<nak_outgoing> & out) {
    uint32_t n_rows = 0;
    for (const auto & st : steps) {
        n_rows += st.e.n_tokens;
    }
    if (n_rows > params_.n_batch) {
        for (const auto & st : steps) {
            reject_step(st, -1, NAK_ERR_BAD_REQUEST, "a batch of " + std::to_string(n_rows) + " rows exceeds n_batch " +
                        std::to_string(params_.n_batch), out);
        }
        return;
    }
    llama_batch batch = llama_batch_init((int32_t) n_rows, is_first() ? 0 : (int32_t) n_embd_, 1);
    batch.n_tokens = (int32_t) n_rows;
    int32_t row = 0;
    for (auto & st : steps) {
        st.row0 = row;
        const bool sample = (st.e.flags & NAK_FWD_SAMPLE) != 0;
        if (!is_first()) {
            nak_wire_decode(st.dtype, st.embd, st.e.n_tokens, n_embd_, batch.embd + (size_t) row * n_embd_);
        }
        for (uint32_t i = 0; i < st.e.n_tokens; i++, row++) {
            if (is_first()) {
                batch.token[row] = st.e.tokens[i];
            }
            batch.pos[row]       = st.e.pos0 + (int32_t) i;
            batch.n_seq_id[row]  = 1;
            batch.seq_id[row][0] = st.s->seq;
            // the last stage samples the last row, or every row of a speculative window
            const bool spec      = (st.e.flags & NAK_FWD_SPEC) != 0;
            batch.logits[row]    = is_last() ? (sample && (spec || i == st.e.n_tokens - 1)) : 1;
        }
    }
    nak_debug_kill_point(steps, "before", abort_);
    const int64_t t0 = nak_now_us();
    // stages sharing a machine take turns (--cpu-lock): each decodes with every core, and none
    // spins in ggml's barriers while another holds the cores
    if (cpu_lock_fd_ >= 0) {
        while (flock(cpu_lock_fd_, LOCK_EX) != 0 && errno == EINTR) {
        }
    }
    const int64_t t_locked = nak_now_us();
    const int32_t rc = llama_decode(ctx_, batch);
    // llama_decode only queues the graph on a GPU backend (CUDA, Vulkan, Metal): the outputs are
    // waited for by the first getter. Wait here, so decode_llama_us holds the GPU's compute and
    // the time split does not count it as the stage's own work (the hand-off below would wait
    // for it anyway, so this costs nothing)
    if (rc == 0) {
        llama_synchronize(ctx_);
    }
    const int64_t t_decoded = nak_now_us();
    if (cpu_lock_fd_ >= 0) {
        flock(cpu_lock_fd_, LOCK_UN);
    }
    llama_batch_free(batch);
    if (rc != 0) {
        for (const auto & st : steps) {
            // a failed multi-ubatch decode may have written part of the batch: drop it; if that
            // part overwrote sliding-window cells the session still needs, drop the session's KV
            // (the client sees n_past 0 and feeds it again)
            const bool kept = window_kept(*st.s, (int32_t) st.s->n_past);
            llama_memory_seq_rm(llama_get_memory(ctx_), st.s->seq, kept ? (llama_pos) st.s->n_past : -1, -1);
            if (!kept) {
                st.s->n_past = 0;
                st.s->history.clear();
            }
            reject_step(st, -1, rc == 1 ? NAK_ERR_CTX_FULL : NAK_ERR_INTERNAL,
                        "llama_decode failed (" + std::to_string(rc) + ")" + (rc == 1 ? ": no KV slot" : ""), out);
        }
        return;
    }
    nak_debug_kill_point(steps, "after", abort_);
    log_batch(steps, batch_id, t0, t_locked, t_decoded);
    n_decode_++;
    n_batch_entries_ += steps.size();
    max_batch_entries_ = std::max<uint64_t>(max_batch_entries_, steps.size());
    for (auto & st : steps) {
        advance(st);
    }

    if (is_last()) {
        for (auto & st : steps) {
            reply_step(st, (uint64_t) (nak_now_us() - t0) * st.e.n_tokens / n_rows, out);
        }
    } else if (!next_hop.empty()) {
        pass_on(steps, next_hop, batch_id, out);
    } else {
        for (auto & st : steps) {
            reply_step(st, (uint64_t) (nak_now_us() - t0) * st.e.n_tokens / n_rows, out);
        }
    }
    const int64_t dt = nak_now_us() - t0;
    compute_us_ += dt;
    for (auto & st : steps) {
        const uint64_t share = (uint64_t) dt * st.e.n_tokens / n_rows;
        st.s->compute_us += share;
        if (st.e.n_tokens == 1) {
            st.s->decode_us += share;
            st.s->decode_steps++;
            st.s->decode_bytes_in += st.wire_in;
            st.s->decode_llama_us += (uint64_t) (t_decoded - t_locked) / n_rows;
            st.s->decode_lock_us += (uint64_t) (t_locked - t0) / n_rows;
            st.s->turn_open = true;
        }
    }
}

// the session's state after its rows were decoded
void nak_stage::advance(nak_step & st) {
    nak_session * s = st.s;
    // a window the last stage verifies: only its first row is known to stay; verify_step adds
    // the drafts the sampler agrees with
    const bool verify = is_last() && (st.e.flags & NAK_FWD_SPEC) && (st.e.flags & NAK_FWD_SAMPLE);
    if (st.e.flags & NAK_FWD_TOKENS) {
        for (uint32_t i = 0; i < (verify ? 1 : st.e.n_tokens); i++) {
            if ((size_t) (st.e.pos0 + i) == s->history.size()) {
                s->history.push_back(st.e.tokens[i]);
                // the sampler already accepted the token it sampled for this position
                if (s->smpl && !(s->pending_sampled && i == 0 && st.e.tokens[i] == s->last_sampled)) {
                    llama_sampler_accept(s->smpl, st.e.tokens[i]);
                }
            }
        }
    }
    s->pending_sampled = false;
    s->n_past = (uint32_t) st.e.pos0 + st.e.n_tokens;
    s->spec_tail = (st.e.flags & NAK_FWD_SPEC) ? st.e.n_tokens - 1 : 0;
    s->next_step++;
    s->tokens_in += st.e.n_tokens;
    s->last_used_ms = nak_now_ms();
    tokens_in_ += st.e.n_tokens;
}

// A step that starts inside the session's last speculative window: the rows from its first
// position on were rejected by the last stage. Drop them from the KV cache and the token history
// before the step's rows are decoded (throws nak_reject when the cache cannot).
void nak_stage::roll_back(nak_step & st) {
    nak_session * s = st.s;
    if (st.e.pos0 >= (int32_t) s->n_past) {
        return;
    }
    if (!window_kept(*s, st.e.pos0)) {
        throw nak_reject{ NAK_ERR_WINDOW_LOST, "cannot drop the rejected rows from position " + std::to_string(st.e.pos0) +
                          ": the sliding-window KV cache no longer holds the positions before them" };
    }
    if (!llama_memory_seq_rm(llama_get_memory(ctx_), s->seq, st.e.pos0, -1)) {
        throw nak_reject{ NAK_ERR_BAD_REQUEST, "this model's memory cannot drop the rejected rows of a speculative "
                          "window (recurrent state): open the session with draft_max 0" };
    }
    spec_rolled_back_ += s->n_past - (uint32_t) st.e.pos0;
    s->n_past    = (uint32_t) st.e.pos0;
    s->spec_tail = 0;
    if (s->history.size() > (size_t) st.e.pos0) {
        s->history.resize(st.e.pos0);
        s->pending_sampled = false;
        rebuild_sampler(*s);
    }
}

// FORWARD_OK to the session's owner: the sampled token (last stage) or the hidden state (relay)
void nak_stage::reply_step(nak_step & st, uint64_t compute_us, std::vector<nak_outgoing> & out) {
    nak_session * s = st.s;
    nak_header h;
    h.type       = NAK_MSG_FORWARD_OK;
    h.request_id = st.e.request_id;
    h.session_id = st.e.session_id;
    nak_forward_ok ok;
    ok.step       = st.e.step;
    ok.n_tokens   = st.e.n_tokens;
    ok.n_past     = s->n_past;
    ok.compute_us = compute_us;
    std::vector<uint8_t> wire;
    if (is_last()) {
        if (st.e.flags & NAK_FWD_SAMPLE) {
            if (st.e.flags & NAK_FWD_SPEC) {
                verify_step(st, ok);
            } else {
                nak_sampler_seed_at(s->smpl, s->sp, s->n_past);
                const llama_token tok = llama_sampler_sample(s->smpl, ctx_, st.row0 + (int32_t) st.e.n_tokens - 1);
                ok.token = tok;
                const bool stop = std::find(s->stop_tokens.begin(), s->stop_tokens.end(), tok) != s->stop_tokens.end();
                ok.is_eog = (llama_vocab_is_eog(vocab_, tok) && !s->ignore_eog) || stop ? 1 : 0;
                ok.piece = nak_token_piece(vocab_, tok);
                s->pending_sampled = true;
                s->last_sampled    = tok;
                s->n_generated++;
            }
            // the next window: drafted here, where every token is seen
            std::vector<int32_t> drafts;
            if (s->spec.draft_max > 0 && !ok.is_eog) {
                const int64_t room = std::min<int64_t>({
                    s->n_predict >= 0 ? (int64_t) s->n_predict - s->n_generated - 1 : INT32_MAX,
                    (int64_t) params_.n_ctx_session - s->n_past - 1,
                    (int64_t) params_.n_batch - 1 });
                if (room > 0 && !(s->n_predict >= 0 && s->n_generated >= s->n_predict)) {
                    drafts = s->spec.draft(s->history, ok.token, (int32_t) room);
                }
                if (!(st.e.flags & NAK_FWD_RING)) {
                    ok.spec        = true;
                    ok.next_drafts = drafts;
                }
            }
            if (ok.spec && ok.tokens.empty()) {
                ok.tokens = { ok.token };
                ok.pieces = { ok.piece };
            }
            // the ring's next step leaves before the client's copy: it is on the critical path
            if ((st.e.flags & NAK_FWD_RING) && !ok.is_eog) {
                ring_next(*s, st, ok.token, drafts, out);
            }
        }
    } else {
        const float * e = llama_get_embeddings(ctx_);
        if (!e) {
            reject_step(st, -1, NAK_ERR_INTERNAL, "llama.cpp returned no hidden states (is the slice patched?)", out);
            return;
        }
        h.dtype = wire_dtype_;
        nak_wire_encode(wire_dtype_, e + (size_t) st.row0 * n_embd_, st.e.n_tokens, n_embd_, wire);
        ok.embd       = wire.data();
        ok.embd_bytes = wire.size();
    }
    nak_writer w;
    nak_encode(w, ok);
    nak_outgoing s_out;
    s_out.conn  = s->conn;
    s_out.frame = nak_frame_bytes(h, w.buf);
    bytes_out_ += s_out.frame.size();
    out.push_back(std::move(s_out));
}

// forwarding: the whole batch, rows in the same order, to the next stage with the rest of the route
void nak_stage::pass_on(const std::vector<nak_step> & steps, const std::string & next_hop, uint64_t batch_id,
                        std::vector<nak_outgoing> & out) {
    const float * e = llama_get_embeddings(ctx_);
    if (!e) {
        for (const auto & st : steps) {
            reject_step(st, -1, NAK_ERR_INTERNAL, "llama.cpp returned no hidden states (is the slice patched?)", out);
        }
        return;
    }
    uint32_t n_rows = 0;
    nak_batch b;
    b.id = batch_id;
    for (const auto & st : steps) {
        b.entries.push_back(st.e);
        b.entries.back().seq   = st.s->seq;
        b.entries.back().token = st.s->token;
        n_rows += st.e.n_tokens;
    }
    std::vector<uint8_t> wire;
    nak_wire_encode(wire_dtype_, e, n_rows, n_embd_, wire);
    b.embd       = wire.data();
    b.embd_bytes = wire.size();
    const size_t comma = next_hop.find(',');
    b.next_hop = comma == std::string::npos ? std::string() : next_hop.substr(comma + 1);
    nak_header h;
    h.type       = NAK_MSG_BATCH;
    h.request_id = batch_id;
    h.dtype      = wire_dtype_;
    nak_writer w;
    nak_encode(w, b);
    if (is_first()) {
        for (const auto & st : steps) {
            if (st.e.flags & NAK_FWD_RING) {
                ring_trip & t = ring_trips_[st.e.session_id];
                t.sent_us = nak_now_us();
                t.out     = true;
            }
        }
    }
    nak_outgoing s;
    s.address = next_hop.substr(0, comma);
    for (const auto & st : steps) {
        nak_header req = st.req;
        req.request_id = st.e.request_id;
        req.session_id = st.e.session_id;
        s.fail_to.push_back({ st.s->conn, req });
    }
    s.frame = nak_frame_bytes(h, w.buf);
    bytes_out_ += s.frame.size();
    out.push_back(std::move(s));
}

// ring: start the next decode step at the first stage, as the client would have, while the
// session wants more tokens (the client applies the same rule to know when the stream ends)
void nak_stage::ring_next(const nak_session & s, const nak_step & st, llama_token tok, const std::vector<int32_t> & drafts,
                          std::vector<nak_outgoing> & out) {
    if ((s.n_predict >= 0 && s.n_generated >= s.n_predict) || s.n_past + 1 > params_.n_ctx_session || st.e.ring.empty()) {
        return;
    }
    nak_forward nf;
    nf.step     = st.e.step + 1;
    nf.flags    = NAK_FWD_TOKENS | NAK_FWD_SAMPLE | NAK_FWD_RING | (drafts.empty() ? 0 : NAK_FWD_SPEC);
    nf.n_tokens = 1 + (uint32_t) drafts.size();
    nf.tokens   = { tok };
    nf.tokens.insert(nf.tokens.end(), drafts.begin(), drafts.end());
    for (uint32_t i = 0; i < nf.n_tokens; i++) {
        nf.pos.push_back((int32_t) s.n_past + (int32_t) i);
    }
    nf.ring     = st.e.ring;
    nf.token    = s.token;
    const size_t comma = st.e.ring.find(',');
    nf.next_hop = comma == std::string::npos ? std::string() : st.e.ring.substr(comma + 1);
    nak_header h;
    h.type       = NAK_MSG_FORWARD;
    h.request_id = st.e.request_id;
    h.session_id = st.e.session_id;
    nak_writer w;
    nak_encode(w, nf);
    nak_outgoing o;
    o.address = st.e.ring.substr(0, comma);
    o.fail_to.push_back({ s.conn, h });
    o.frame   = nak_frame_bytes(h, w.buf);
    out.push_back(std::move(o));
}

// one JSON line per decoded batch (--batch-log): enough to replay it through the unsplit model
void nak_stage::log_batch(const std::vector<nak_step> & steps, uint64_t batch_id, int64_t t_start_us,
                          int64_t t_locked_us, int64_t t_end_us) {
    if (!batch_log_) {
        return;
    }
    json entries = json::array();
    for (const auto & st : steps) {
        const nak_batch_entry & e = st.e;
        entries.push_back({
            { "session", e.session_id }, { "seq", st.s->seq },   { "step", e.step },
            { "pos", e.pos0 },           { "n_tokens", e.n_tokens },
            { "sample", (e.flags & NAK_FWD_SAMPLE) != 0 },        { "spec", (e.flags & NAK_FWD_SPEC) != 0 },
            { "tokens", e.tokens },
        });
    }
    // when the decode was due, when it had the CPU lock and when llama_decode returned (steady
    // clock, us: comparable between the stages of one machine)
    const json j = {
        { "batch", batch_id },       { "t_start_us", t_start_us }, { "t_locked_us", t_locked_us },
        { "t_end_us", t_end_us },    { "entries", std::move(entries) },
    };
    const std::string line = j.dump() + "\n";
    fputs(line.c_str(), batch_log_);
    fflush(batch_log_);
}

// Whether the session's KV still holds every position a token at `pos` attends to once positions
// >= pos are dropped. Without swa_full a sliding-window cache reuses the cells of positions that
// left the window, and at this commit llama_memory_seq_rm reports success even when the cells a
// rollback needs are gone (later output is silently wrong), so check first, with llama-server's
// rule (server-context.cpp: re-process when pos_min > max(0, n_past - n_swa)). The cache keeps the
// window plus at least one ubatch (llama-kv-cache-iswa.cpp, size_swa), so a rollback of up to
// about n_ubatch positions is always kept.
bool nak_stage::window_kept(const nak_session & s, int32_t pos) const {
    const int32_t n_swa = llama_model_n_swa(model_);
    if (params_.swa_full || n_swa <= 0 || pos <= 0) {
        return true;
    }
    llama_memory_t mem = llama_get_memory(ctx_);
    if (pos > llama_memory_seq_pos_max(mem, s.seq)) {
        return true; // nothing to drop: the cache is as the last decode left it
    }
    return llama_memory_seq_pos_min(mem, s.seq) <= std::max(0, pos - n_swa);
}
