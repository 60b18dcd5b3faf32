#include "stage.h"

#include "ggml-cpu.h"

#include <algorithm>
#include <chrono>
#include <cinttypes>
#include <cstdio>
#include <cstring>
#include <random>
#include <thread>

int64_t nak_now_ms() {
    using namespace std::chrono;
    return duration_cast<milliseconds>(steady_clock::now().time_since_epoch()).count();
}

static int64_t now_us() {
    using namespace std::chrono;
    return duration_cast<microseconds>(steady_clock::now().time_since_epoch()).count();
}

uint64_t nak_rss_bytes() {
    FILE * f = fopen("/proc/self/statm", "r");
    if (!f) {
        return 0;
    }
    unsigned long size = 0, resident = 0;
    const int n = fscanf(f, "%lu %lu", &size, &resident);
    fclose(f);
    return n == 2 ? (uint64_t) resident * 4096 : 0;
}

bool nak_parse_cache_type(const std::string & name, ggml_type & out) {
    static const std::pair<const char *, ggml_type> types[] = {
        { "f32", GGML_TYPE_F32 }, { "f16", GGML_TYPE_F16 }, { "bf16", GGML_TYPE_BF16 },
        { "q8_0", GGML_TYPE_Q8_0 }, { "q4_0", GGML_TYPE_Q4_0 }, { "q4_1", GGML_TYPE_Q4_1 },
        { "q5_0", GGML_TYPE_Q5_0 }, { "q5_1", GGML_TYPE_Q5_1 },
    };
    for (const auto & t : types) {
        if (name == t.first) {
            out = t.second;
            return true;
        }
    }
    return false;
}

llama_sampler * nak_sampler_build(const llama_vocab * vocab, const nak_sampler_params & sp) {
    llama_sampler * chain = llama_sampler_chain_init(llama_sampler_chain_default_params());
    if (sp.repeat_penalty != 1.0f && sp.repeat_last_n != 0) {
        llama_sampler_chain_add(chain, llama_sampler_init_penalties(
                llama_vocab_n_tokens(vocab), sp.repeat_last_n, sp.repeat_penalty, 0.0f, 0.0f));
    }
    if (sp.temp <= 0.0f) {
        llama_sampler_chain_add(chain, llama_sampler_init_greedy());
        return chain;
    }
    llama_sampler_chain_add(chain, llama_sampler_init_top_k(sp.top_k));
    llama_sampler_chain_add(chain, llama_sampler_init_top_p(sp.top_p, 1));
    llama_sampler_chain_add(chain, llama_sampler_init_min_p(sp.min_p, 1));
    llama_sampler_chain_add(chain, llama_sampler_init_temp(sp.temp));
    llama_sampler_chain_add(chain, llama_sampler_init_dist(sp.seed));
    return chain;
}

std::vector<uint8_t> nak_error_frame(const nak_header & req, uint16_t code, const std::string & message) {
    nak_header h;
    h.type       = NAK_MSG_ERROR;
    h.request_id = req.request_id;
    h.session_id = req.session_id;
    nak_writer w;
    nak_encode(w, nak_error{ code, message });
    return nak_frame_bytes(h, w.buf);
}

static std::string meta_str(const llama_model * model, const char * key) {
    char buf[256];
    const int32_t n = llama_model_meta_val_str(model, key, buf, sizeof(buf));
    return n >= 0 ? std::string(buf) : std::string();
}

static ggml_threadpool * new_sleeping_pool(int32_t n_threads) {
    ggml_threadpool_params tpp = ggml_threadpool_params_default(n_threads);
    tpp.poll = 0;
    return ggml_threadpool_new(&tpp);
}

nak_stage::~nak_stage() {
    for (auto & kv : sessions_) {
        if (kv.second.smpl) {
            llama_sampler_free(kv.second.smpl);
        }
    }
    if (ctx_) {
        llama_free(ctx_);
    }
    if (threadpool_) {
        ggml_threadpool_free(threadpool_);
    }
    if (threadpool_batch_) {
        ggml_threadpool_free(threadpool_batch_);
    }
    if (model_) {
        llama_model_free(model_);
    }
}

bool nak_stage::load(const nak_stage_params & params, std::string & err) {
    params_ = params;
    if (params.max_sessions == 0 || params.n_ctx_session == 0) {
        err = "--max-sessions and --ctx must be at least 1";
        return false;
    }
    ggml_type type_k, type_v;
    if (!nak_parse_cache_type(params.cache_type_k, type_k) || !nak_parse_cache_type(params.cache_type_v, type_v)) {
        err = "unknown cache type '" + params.cache_type_k + "'/'" + params.cache_type_v +
              "': use one of f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1";
        return false;
    }

    llama_model_params mp = llama_model_default_params();
    mp.n_gpu_layers = params.n_gpu_layers;
    model_ = llama_model_load_from_file(params.model_path.c_str(), mp);
    if (!model_) {
        err = "llama.cpp could not load " + params.model_path + " (see its log above)";
        return false;
    }
    vocab_ = llama_model_get_vocab(model_);
    arch_  = meta_str(model_, "general.architecture");
    n_embd_ = (uint32_t) llama_model_n_embd(model_);

    const std::string s_start = meta_str(model_, "nakshatra.layer_range_start");
    const std::string s_end   = meta_str(model_, "nakshatra.layer_range_end");
    const std::string s_full  = meta_str(model_, "nakshatra.n_layer_full");
    if (!s_start.empty() && !s_end.empty() && !s_full.empty()) {
        layer_start_  = (uint32_t) std::stoul(s_start);
        layer_end_    = (uint32_t) std::stoul(s_end);
        n_layer_full_ = (uint32_t) std::stoul(s_full);
    } else {
        layer_start_  = 0;
        layer_end_    = (uint32_t) llama_model_n_layer(model_);
        n_layer_full_ = layer_end_;
    }
    if (params_.model_sha256.empty()) {
        params_.model_sha256 = meta_str(model_, "nakshatra.model_sha256");
    }

    llama_context_params cp = llama_context_default_params();
    cp.n_ctx           = params.n_ctx_session * params.max_sessions;
    cp.n_seq_max       = params.max_sessions;
    cp.n_batch         = params.n_batch;
    cp.n_ubatch        = params.n_ubatch;
    // each session its own KV stream: a session's attention never spans other sessions' cells
    cp.kv_unified      = false;
    // at this commit seq_rm on a pruned sliding-window cache reports success and corrupts later output
    cp.swa_full        = true;
    cp.type_k          = type_k;
    cp.type_v          = type_v;
    cp.flash_attn_type = params.flash_attn < 0 ? LLAMA_FLASH_ATTN_TYPE_AUTO
                       : params.flash_attn == 0 ? LLAMA_FLASH_ATTN_TYPE_DISABLED : LLAMA_FLASH_ATTN_TYPE_ENABLED;
    const int32_t n_threads = params.n_threads > 0 ? params.n_threads
                            : (int32_t) std::max(1u, std::thread::hardware_concurrency());
    const int32_t n_threads_batch = params.n_threads_batch > 0 ? params.n_threads_batch : n_threads;
    cp.n_threads       = n_threads;
    cp.n_threads_batch = n_threads_batch;
    cp.no_perf         = true;
    if (!is_last()) {
        // hidden states of every row go to the next stage
        cp.embeddings            = true;
        cp.pooling_type          = LLAMA_POOLING_TYPE_NONE;
        cp.n_outputs_max_per_seq = 0;
    }
    ctx_ = llama_init_from_model(model_, cp);
    if (!ctx_) {
        err = "llama.cpp could not create a context of " + std::to_string(cp.n_ctx) +
              " tokens (--ctx x --max-sessions); lower them";
        return false;
    }
    // workers that sleep as soon as a decode ends (poll = 0): an idle stage costs no CPU, and
    // stages sharing a machine do not steal each other's cores; barriers inside a graph still spin
    threadpool_       = new_sleeping_pool(n_threads);
    threadpool_batch_ = n_threads_batch == n_threads ? nullptr : new_sleeping_pool(n_threads_batch);
    if (!threadpool_ || (n_threads_batch != n_threads && !threadpool_batch_)) {
        err = "could not create a thread pool of " + std::to_string(n_threads) + " threads";
        return false;
    }
    llama_attach_threadpool(ctx_, threadpool_, threadpool_batch_ ? threadpool_batch_ : threadpool_);
    slot_used_.assign(params.max_sessions, false);
    t_start_ms_ = nak_now_ms();
    return true;
}

nak_health nak_stage::health() const {
    nak_health h;
    h.sessions_active = (uint32_t) sessions_.size();
    h.max_sessions    = params_.max_sessions;
    h.queue_depth     = queue_depth;
    h.n_ctx_session   = params_.n_ctx_session;
    for (const auto & kv : sessions_) {
        h.kv_tokens_used += kv.second.n_past;
    }
    h.rss_bytes = nak_rss_bytes();
    h.uptime_ms = (uint64_t) (nak_now_ms() - t_start_ms_);
    h.tokens_in = tokens_in_;
    return h;
}

nak_hello_ok nak_stage::info() const {
    nak_hello_ok m;
    m.caps = NAK_CAP_F32_WIRE | NAK_CAP_VOCAB | (is_last() ? NAK_CAP_SAMPLING : 0);
    std::random_device rd;
    for (int i = 0; i < NAK_NONCE_SIZE; i++) {
        m.nonce[i] = (uint8_t) rd();
    }
    m.model_sha256 = params_.model_sha256;
    m.arch         = arch_;
    m.layer_start  = layer_start_;
    m.layer_end    = layer_end_;
    m.n_layer_full = n_layer_full_;
    m.n_embd       = n_embd_;
    m.n_vocab      = (uint32_t) llama_vocab_n_tokens(vocab_);
    m.backend      = NAK_BACKEND_NAME;
    m.health       = health();
    return m;
}

std::string nak_stage::stats_json() const {
    const nak_health h = health();
    std::string out;
    char buf[512];
    snprintf(buf, sizeof(buf),
             "{\"layer_start\": %u, \"layer_end\": %u, \"sessions_active\": %u, \"max_sessions\": %u, "
             "\"tokens_in\": %" PRIu64 ", \"n_decode\": %" PRIu64 ", \"compute_us\": %" PRIu64 ", "
             "\"bytes_in\": %" PRIu64 ", \"bytes_out\": %" PRIu64 ", \"rss_bytes\": %" PRIu64 ", "
             "\"kv_tokens_used\": %" PRIu64 ", \"uptime_ms\": %" PRIu64 ", \"sessions\": {",
             layer_start_, layer_end_, h.sessions_active, h.max_sessions, tokens_in_, n_decode_, compute_us_,
             bytes_in_, bytes_out_, h.rss_bytes, h.kv_tokens_used, h.uptime_ms);
    out += buf;
    bool first = true;
    for (const auto & kv : sessions_) {
        const nak_session & s = kv.second;
        snprintf(buf, sizeof(buf), "%s\"%" PRIu64 "\": {\"n_past\": %u, \"tokens_in\": %" PRIu64
                 ", \"compute_us\": %" PRIu64 ", \"next_step\": %" PRIu64 "}",
                 first ? "" : ", ", s.id, s.n_past, s.tokens_in, s.compute_us, s.next_step);
        out += buf;
        first = false;
    }
    out += "}}";
    return out;
}

nak_session * nak_stage::find_session(uint64_t id) {
    auto it = sessions_.find(id);
    return it == sessions_.end() ? nullptr : &it->second;
}

void nak_stage::free_session(nak_session & s) {
    llama_memory_seq_rm(llama_get_memory(ctx_), s.seq, -1, -1);
    if (s.smpl) {
        llama_sampler_free(s.smpl);
    }
    slot_used_[s.seq] = false;
    sessions_.erase(s.id);
}

void nak_stage::on_disconnect(int32_t conn) {
    std::vector<uint64_t> ids;
    for (const auto & kv : sessions_) {
        if (kv.second.conn == conn) {
            ids.push_back(kv.first);
        }
    }
    for (uint64_t id : ids) {
        free_session(sessions_.at(id));
    }
}

void nak_stage::expire_idle(int64_t now) {
    std::vector<uint64_t> ids;
    for (const auto & kv : sessions_) {
        if (now - kv.second.last_used_ms > (int64_t) params_.idle_timeout_s * 1000) {
            ids.push_back(kv.first);
        }
    }
    for (uint64_t id : ids) {
        free_session(sessions_.at(id));
    }
}

void nak_stage::rebuild_sampler(nak_session & s) {
    if (!is_last()) {
        return;
    }
    if (s.smpl) {
        llama_sampler_free(s.smpl);
    }
    s.smpl = nak_sampler_build(vocab_, s.sp);
    for (llama_token t : s.history) {
        llama_sampler_accept(s.smpl, t);
    }
}

// ---- request handlers ----------------------------------------------------------------------

struct nak_reject {
    uint16_t    code;
    std::string message;
};

void nak_stage::handle(const nak_frame & req, int32_t conn, bool & close_conn, std::vector<nak_send> & out) {
    bytes_in_ += NAK_HEADER_SIZE + req.payload.size();
    nak_header h;
    h.request_id = req.hdr.request_id;
    h.session_id = req.hdr.session_id;
    nak_writer w;
    close_conn = false;
    // a FORWARD is answered to whoever opened the session: with forwarding, the request came from
    // the previous stage but the client waits for the token (or an error)
    int32_t reply_conn = conn;
    if (req.hdr.type == NAK_MSG_FORWARD) {
        if (const nak_session * s = find_session(req.hdr.session_id)) {
            reply_conn = s->conn;
        }
    }
    std::string forward_to;
    std::vector<uint8_t> reply;
    extra_.clear();
    try {
        switch (req.hdr.type) {
            case NAK_MSG_HELLO: {
                nak_hello m;
                if (!nak_decode(req.payload, m)) {
                    throw nak_reject{ NAK_ERR_BAD_REQUEST, "malformed HELLO payload" };
                }
                if (!m.want_model_sha256.empty() && m.want_model_sha256 != params_.model_sha256) {
                    throw nak_reject{ NAK_ERR_WRONG_MODEL, "this stage serves model " + params_.model_sha256.substr(0, 12) +
                                      ", not " + m.want_model_sha256.substr(0, 12) };
                }
                h.type = NAK_MSG_HELLO_OK;
                nak_encode(w, info());
            } break;
            case NAK_MSG_OPEN:       on_open(req, conn, w, h);   break;
            case NAK_MSG_FORWARD:    on_forward(req, w, h, forward_to); break;
            case NAK_MSG_TRUNCATE:   on_truncate(req, w, h);     break;
            case NAK_MSG_CLOSE:      on_close(req, w, h);        break;
            case NAK_MSG_TOKENIZE:   on_tokenize(req, w, h);     break;
            case NAK_MSG_DETOKENIZE: on_detokenize(req, w, h);   break;
            case NAK_MSG_TEMPLATE:   on_template(req, w, h);     break;
            case NAK_MSG_STATS:
                h.type = NAK_MSG_STATS_OK;
                w.str(stats_json());
                break;
            default:
                throw nak_reject{ NAK_ERR_BAD_REQUEST,
                    std::string("unexpected message type ") + std::to_string(req.hdr.type) + " (" +
                    nak_msg_type_name(req.hdr.type) + ")" };
        }
        reply = nak_frame_bytes(h, w.buf);
    } catch (const nak_reject & e) {
        reply = nak_error_frame(req.hdr, e.code, e.message);
        forward_to.clear();
    } catch (const std::exception & e) {
        reply = nak_error_frame(req.hdr, NAK_ERR_INTERNAL, e.what());
        forward_to.clear();
    }
    bytes_out_ += reply.size();
    nak_send s;
    s.conn       = reply_conn;
    s.address    = forward_to;
    s.error_conn = reply_conn;
    s.req        = req.hdr;
    s.frame      = std::move(reply);
    out.push_back(std::move(s));
    for (auto & e : extra_) {
        out.push_back(std::move(e));
    }
    extra_.clear();
}

void nak_stage::on_open(const nak_frame & req, int32_t conn, nak_writer & w, nak_header & h) {
    nak_open m;
    if (!nak_decode(req.payload, m)) {
        throw nak_reject{ NAK_ERR_BAD_REQUEST, "malformed OPEN payload" };
    }
    if (req.hdr.session_id == 0) {
        throw nak_reject{ NAK_ERR_BAD_REQUEST, "session id 0 is reserved" };
    }
    if (sessions_.count(req.hdr.session_id)) {
        throw nak_reject{ NAK_ERR_BAD_REQUEST, "session " + std::to_string(req.hdr.session_id) + " is already open" };
    }
    if (!(m.sampler.temp == m.sampler.temp) || !(m.sampler.repeat_penalty > 0.0f) ||
        m.sampler.top_p < 0.0f || m.sampler.top_p > 1.0f || m.sampler.min_p < 0.0f || m.sampler.min_p > 1.0f) {
        throw nak_reject{ NAK_ERR_BAD_REQUEST, "sampler parameters out of range (temp >= 0, top_p and min_p in [0, 1], repeat_penalty > 0)" };
    }
    int32_t slot = -1;
    for (uint32_t i = 0; i < slot_used_.size(); i++) {
        if (!slot_used_[i]) {
            slot = (int32_t) i;
            break;
        }
    }
    if (slot < 0) {
        throw nak_reject{ NAK_ERR_OVERLOADED, "all " + std::to_string(params_.max_sessions) +
                          " sessions of this stage are in use (--max-sessions)" };
    }
    slot_used_[slot] = true;
    llama_memory_seq_rm(llama_get_memory(ctx_), slot, -1, -1);
    nak_session & s = sessions_[req.hdr.session_id];
    s.id   = req.hdr.session_id;
    s.seq  = slot;
    s.conn = conn;
    s.sp   = m.sampler;
    s.stop_tokens = m.stop_tokens;
    s.n_predict   = m.n_predict;
    s.last_used_ms = nak_now_ms();
    rebuild_sampler(s);
    h.type = NAK_MSG_OPEN_OK;
    w.u32(params_.n_ctx_session);
}

void nak_stage::on_forward(const nak_frame & req, nak_writer & w, nak_header & h, std::string & forward_to) {
    nak_session * s = find_session(req.hdr.session_id);
    if (!s) {
        throw nak_reject{ NAK_ERR_NO_SESSION, "no open session " + std::to_string(req.hdr.session_id) + " on this stage" };
    }
    nak_forward f;
    if (!nak_decode(req.payload, f)) {
        throw nak_reject{ NAK_ERR_BAD_REQUEST, "malformed FORWARD payload" };
    }
    if (f.step != s->next_step) {
        throw nak_reject{ NAK_ERR_BAD_REQUEST, "step " + std::to_string(f.step) + " out of order: expected " +
                          std::to_string(s->next_step) };
    }
    const uint32_t n = f.n_tokens;
    if (n == 0 || n > params_.n_batch) {
        throw nak_reject{ NAK_ERR_BAD_REQUEST, "a FORWARD carries 1.." + std::to_string(params_.n_batch) +
                          " tokens, not " + std::to_string(n) };
    }
    for (uint32_t i = 0; i < n; i++) {
        if (f.pos[i] != (int32_t) (s->n_past + i)) {
            throw nak_reject{ NAK_ERR_BAD_REQUEST, "position " + std::to_string(f.pos[i]) + " does not continue the " +
                              std::to_string(s->n_past) + " cached positions; TRUNCATE first" };
        }
    }
    if ((uint64_t) s->n_past + n > params_.n_ctx_session) {
        throw nak_reject{ NAK_ERR_CTX_FULL, "session context full: " + std::to_string(s->n_past) + " + " +
                          std::to_string(n) + " tokens > --ctx " + std::to_string(params_.n_ctx_session) };
    }
    const bool sample = (f.flags & NAK_FWD_SAMPLE) != 0;
    if (sample && !is_last() && f.next_hop.empty()) {
        throw nak_reject{ NAK_ERR_BAD_REQUEST, "only the last stage samples (no route to it given)" };
    }
    if (is_last() && !f.next_hop.empty()) {
        throw nak_reject{ NAK_ERR_BAD_REQUEST, "the last stage has no next hop (route '" + f.next_hop + "')" };
    }
    const int32_t n_vocab = llama_vocab_n_tokens(vocab_);
    if (f.flags & NAK_FWD_TOKENS) {
        for (int32_t t : f.tokens) {
            if (t < 0 || t >= n_vocab) {
                throw nak_reject{ NAK_ERR_BAD_REQUEST, "token id " + std::to_string(t) + " outside the vocabulary [0, " +
                                  std::to_string(n_vocab) + ")" };
            }
        }
    }
    if (is_first()) {
        if (!(f.flags & NAK_FWD_TOKENS)) {
            throw nak_reject{ NAK_ERR_BAD_REQUEST, "the first stage takes token ids" };
        }
    } else {
        if (!(f.flags & NAK_FWD_EMBD) || req.hdr.dtype != NAK_DTYPE_F32) {
            throw nak_reject{ NAK_ERR_BAD_REQUEST, "this stage takes f32 hidden states (layers from " +
                              std::to_string(layer_start_) + ")" };
        }
        if (f.embd_bytes != (size_t) n * n_embd_ * sizeof(float)) {
            throw nak_reject{ NAK_ERR_BAD_REQUEST, "hidden state of " + std::to_string(f.embd_bytes) +
                              " bytes; expected n_tokens x n_embd x 4 = " + std::to_string((size_t) n * n_embd_ * 4) };
        }
    }

    llama_batch batch = llama_batch_init((int32_t) n, is_first() ? 0 : (int32_t) n_embd_, 1);
    batch.n_tokens = (int32_t) n;
    for (uint32_t i = 0; i < n; i++) {
        if (is_first()) {
            batch.token[i] = f.tokens[i];
        }
        batch.pos[i]       = f.pos[i];
        batch.n_seq_id[i]  = 1;
        batch.seq_id[i][0] = s->seq;
        batch.logits[i]    = is_last() ? (sample && i == n - 1) : 1;
    }
    if (!is_first()) {
        memcpy(batch.embd, f.embd, f.embd_bytes);
    }
    const int64_t t0 = now_us();
    const int32_t rc = llama_decode(ctx_, batch);
    llama_batch_free(batch);
    if (rc != 0) {
        // a failed multi-ubatch decode may have written part of the batch: drop it
        llama_memory_seq_rm(llama_get_memory(ctx_), s->seq, s->n_past, -1);
        throw nak_reject{ rc == 1 ? NAK_ERR_CTX_FULL : NAK_ERR_INTERNAL,
                          "llama_decode failed (" + std::to_string(rc) + ")" + (rc == 1 ? ": no KV slot" : "") };
    }

    nak_forward_ok out;
    if (f.flags & NAK_FWD_TOKENS) {
        for (uint32_t i = 0; i < n; i++) {
            if ((size_t) f.pos[i] == s->history.size()) {
                s->history.push_back(f.tokens[i]);
                // the sampler already accepted the token it sampled for this position
                if (s->smpl && !(s->pending_sampled && i == 0 && f.tokens[i] == s->last_sampled)) {
                    llama_sampler_accept(s->smpl, f.tokens[i]);
                }
            }
        }
    }
    s->pending_sampled = false;
    s->n_past += n;
    s->next_step++;
    s->tokens_in += n;
    s->last_used_ms = nak_now_ms();
    tokens_in_ += n;
    n_decode_++;

    if (is_last()) {
        if (sample) {
            const llama_token tok = llama_sampler_sample(s->smpl, ctx_, -1);
            out.token  = tok;
            const bool stop = std::find(s->stop_tokens.begin(), s->stop_tokens.end(), tok) != s->stop_tokens.end();
            out.is_eog = llama_vocab_is_eog(vocab_, tok) || stop ? 1 : 0;
            char buf[256];
            const int32_t k = llama_token_to_piece(vocab_, tok, buf, sizeof(buf), 0, false);
            out.piece = k > 0 ? std::string(buf, k) : std::string();
            s->pending_sampled = true;
            s->last_sampled    = tok;
            s->n_generated++;
            if ((f.flags & NAK_FWD_RING) && !out.is_eog) {
                ring_next(*s, req.hdr, f, tok);
            }
        }
    } else {
        const float * e = llama_get_embeddings(ctx_);
        if (!e) {
            throw nak_reject{ NAK_ERR_INTERNAL, "llama.cpp returned no hidden states (is the slice patched?)" };
        }
        out.embd       = (const uint8_t *) e;
        out.embd_bytes = (size_t) n * n_embd_ * sizeof(float);
        h.dtype        = NAK_DTYPE_F32;
        if (!f.next_hop.empty()) {
            // forwarding: the hidden state goes straight to the next stage with the rest of the
            // route; the token ids travel along for the last stage's sampler history
            nak_forward nf;
            nf.step       = f.step;
            nf.flags      = (f.flags & (NAK_FWD_TOKENS | NAK_FWD_SAMPLE | NAK_FWD_RING)) | NAK_FWD_EMBD;
            nf.ring       = f.ring;
            nf.n_tokens   = n;
            nf.pos        = f.pos;
            nf.tokens     = f.tokens;
            nf.embd       = out.embd;
            nf.embd_bytes = out.embd_bytes;
            const size_t comma = f.next_hop.find(',');
            forward_to  = f.next_hop.substr(0, comma);
            nf.next_hop = comma == std::string::npos ? std::string() : f.next_hop.substr(comma + 1);
            const int64_t dt = now_us() - t0;
            s->compute_us += dt;
            compute_us_   += dt;
            h.type = NAK_MSG_FORWARD;
            nak_encode(w, nf);
            return;
        }
    }
    const int64_t dt = now_us() - t0;
    s->compute_us += dt;
    compute_us_   += dt;
    out.step       = f.step;
    out.n_tokens   = n;
    out.n_past     = s->n_past;
    out.compute_us = (uint64_t) dt;
    h.type = NAK_MSG_FORWARD_OK;
    nak_encode(w, out);
}

// ring: start the next decode step at the first stage, as the client would have, while the
// session wants more tokens (the client applies the same rule to know when the stream ends)
void nak_stage::ring_next(const nak_session & s, const nak_header & req, const nak_forward & f, llama_token tok) {
    if ((s.n_predict >= 0 && s.n_generated >= s.n_predict) || s.n_past + 1 > params_.n_ctx_session || f.ring.empty()) {
        return;
    }
    nak_forward nf;
    nf.step     = f.step + 1;
    nf.flags    = NAK_FWD_TOKENS | NAK_FWD_SAMPLE | NAK_FWD_RING;
    nf.n_tokens = 1;
    nf.pos      = { (int32_t) s.n_past };
    nf.tokens   = { tok };
    nf.ring     = f.ring;
    const size_t comma = f.ring.find(',');
    nf.next_hop = comma == std::string::npos ? std::string() : f.ring.substr(comma + 1);
    nak_header h;
    h.type       = NAK_MSG_FORWARD;
    h.request_id = req.request_id;
    h.session_id = req.session_id;
    nak_writer w;
    nak_encode(w, nf);
    nak_send out;
    out.address    = f.ring.substr(0, comma);
    out.error_conn = s.conn;
    out.req        = req;
    out.frame      = nak_frame_bytes(h, w.buf);
    extra_.push_back(std::move(out));
}

void nak_stage::on_truncate(const nak_frame & req, nak_writer & w, nak_header & h) {
    nak_session * s = find_session(req.hdr.session_id);
    if (!s) {
        throw nak_reject{ NAK_ERR_NO_SESSION, "no open session " + std::to_string(req.hdr.session_id) + " on this stage" };
    }
    nak_reader r(req.payload);
    const int32_t pos = r.i32();
    if (!r.done()) {
        throw nak_reject{ NAK_ERR_BAD_REQUEST, "malformed TRUNCATE payload" };
    }
    if (pos < 0 || (uint32_t) pos > s->n_past) {
        throw nak_reject{ NAK_ERR_BAD_REQUEST, "cannot truncate to position " + std::to_string(pos) + ": the session holds " +
                          std::to_string(s->n_past) };
    }
    if (!llama_memory_seq_rm(llama_get_memory(ctx_), s->seq, pos, -1)) {
        throw nak_reject{ NAK_ERR_BAD_REQUEST, "this model's memory cannot roll back to a position (recurrent state)" };
    }
    s->n_past = (uint32_t) pos;
    if (s->history.size() > (size_t) pos) {
        s->history.resize(pos);
    }
    s->pending_sampled = false;
    rebuild_sampler(*s);
    s->last_used_ms = nak_now_ms();
    h.type = NAK_MSG_TRUNCATE_OK;
    w.u32(s->n_past);
    w.u64(s->next_step);
}

void nak_stage::on_close(const nak_frame & req, nak_writer & w, nak_header & h) {
    nak_session * s = find_session(req.hdr.session_id);
    if (s) {
        free_session(*s);
    }
    h.type = NAK_MSG_CLOSE_OK;
    w.u8(s ? 1 : 0);
}

void nak_stage::on_tokenize(const nak_frame & req, nak_writer & w, nak_header & h) {
    nak_reader r(req.payload);
    const std::string text = r.str();
    const bool add_special   = r.u8() != 0;
    const bool parse_special = r.u8() != 0;
    if (!r.done()) {
        throw nak_reject{ NAK_ERR_BAD_REQUEST, "malformed TOKENIZE payload" };
    }
    std::vector<llama_token> toks(text.size() + 8);
    int32_t n = llama_tokenize(vocab_, text.data(), (int32_t) text.size(), toks.data(), (int32_t) toks.size(),
                               add_special, parse_special);
    if (n < 0) {
        toks.resize(-n);
        n = llama_tokenize(vocab_, text.data(), (int32_t) text.size(), toks.data(), (int32_t) toks.size(),
                           add_special, parse_special);
    }
    if (n < 0) {
        throw nak_reject{ NAK_ERR_INTERNAL, "tokenization failed" };
    }
    toks.resize(n);
    h.type = NAK_MSG_TOKENIZE_OK;
    w.i32s(toks);
}

void nak_stage::on_detokenize(const nak_frame & req, nak_writer & w, nak_header & h) {
    nak_reader r(req.payload);
    const std::vector<int32_t> toks = r.i32s();
    const bool special = r.u8() != 0;
    if (!r.done()) {
        throw nak_reject{ NAK_ERR_BAD_REQUEST, "malformed DETOKENIZE payload" };
    }
    const int32_t n_vocab = llama_vocab_n_tokens(vocab_);
    for (int32_t t : toks) {
        if (t < 0 || t >= n_vocab) {
            throw nak_reject{ NAK_ERR_BAD_REQUEST, "token id " + std::to_string(t) + " outside the vocabulary" };
        }
    }
    std::string text(toks.size() * 8 + 16, '\0');
    int32_t n = llama_detokenize(vocab_, toks.data(), (int32_t) toks.size(), text.data(), (int32_t) text.size(), false, special);
    if (n < 0) {
        text.resize(-n);
        n = llama_detokenize(vocab_, toks.data(), (int32_t) toks.size(), text.data(), (int32_t) text.size(), false, special);
    }
    text.resize(std::max(0, n));
    h.type = NAK_MSG_DETOKENIZE_OK;
    w.str(text);
}

void nak_stage::on_template(const nak_frame & req, nak_writer & w, nak_header & h) {
    nak_reader r(req.payload);
    const uint32_t n_msg = r.u32();
    if (!r.ok || n_msg > 4096) {
        throw nak_reject{ NAK_ERR_BAD_REQUEST, "malformed TEMPLATE payload" };
    }
    std::vector<std::string> roles(n_msg), contents(n_msg);
    for (uint32_t i = 0; i < n_msg; i++) {
        roles[i]    = r.str();
        contents[i] = r.str();
    }
    const bool add_ass = r.u8() != 0;
    if (!r.done()) {
        throw nak_reject{ NAK_ERR_BAD_REQUEST, "malformed TEMPLATE payload" };
    }
    std::vector<llama_chat_message> msgs(n_msg);
    size_t total = 0;
    for (uint32_t i = 0; i < n_msg; i++) {
        msgs[i] = { roles[i].c_str(), contents[i].c_str() };
        total += roles[i].size() + contents[i].size();
    }
    const char * tmpl = llama_model_chat_template(model_, nullptr);
    if (!tmpl) {
        throw nak_reject{ NAK_ERR_BAD_REQUEST, "the model has no chat template; run without --chat" };
    }
    std::string out(total * 2 + 1024, '\0');
    int32_t n = llama_chat_apply_template(tmpl, msgs.data(), msgs.size(), add_ass, out.data(), (int32_t) out.size());
    if (n > (int32_t) out.size()) {
        out.resize(n);
        n = llama_chat_apply_template(tmpl, msgs.data(), msgs.size(), add_ass, out.data(), (int32_t) out.size());
    }
    if (n < 0) {
        throw nak_reject{ NAK_ERR_BAD_REQUEST, "llama.cpp does not know this model's chat template; run without --chat" };
    }
    out.resize(n);
    h.type = NAK_MSG_TEMPLATE_OK;
    w.str(out);
}
