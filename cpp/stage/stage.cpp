// The stage's life and its requests: loading the slice, sessions (open, truncate, close, expiry),
// the request dispatch (handle), and what it reports (HELLO_OK, STATS). Decode steps run in
// executor.cpp, sampling in sampling.cpp, host figures in sysinfo.cpp, text in tokenize.cpp.
#include "stage.h"
#include "llama_log.h"
#include "stage_util.h"

#include "ggml-cpu.h"
#include "wire.h"

#include <algorithm>
#include <fcntl.h>
#include <unistd.h>
#include <chrono>
#include <cstdio>
#include <random>
#include <thread>

// JSON (STATS) through the library in llama.cpp's vendor/ tree; ordered_json keeps the keys in the
// order written
#include <nlohmann/json.hpp>
using json = nlohmann::ordered_json;

// most draft tokens a session may ask for per window (nak_open::draft_max; the client checks the
// same bound, chain.py DRAFT_MAX_LIMIT). A stage then drafts at most NAK_STAGE_DRAFT_MAX (stage.h),
// what its output buffers were sized for: the request is a ceiling, the stage's own limit the
// window it actually runs.
#define NAK_DRAFT_MAX_LIMIT 64

int64_t nak_now_ms() {
    using namespace std::chrono;
    return duration_cast<milliseconds>(steady_clock::now().time_since_epoch()).count();
}

int64_t nak_now_us() {
    using namespace std::chrono;
    return duration_cast<microseconds>(steady_clock::now().time_since_epoch()).count();
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

// `poll`: llama.cpp's --poll (0: workers sleep as soon as a graph ends). `strict`: as its
// --cpu-strict, thread i pinned to CPU i: the scheduler then never stacks two threads of one
// graph on a core, where each spin barrier would wait for a time slice
static ggml_threadpool * new_pool(int32_t n_threads, int32_t poll, bool strict) {
    ggml_threadpool_params tpp = ggml_threadpool_params_default(n_threads);
    tpp.poll = poll;
    if (strict) {
        tpp.strict_cpu = true;
        const int32_t n_cpu = (int32_t) std::max(1u, std::thread::hardware_concurrency());
        for (int32_t i = 0; i < n_cpu && i < GGML_MAX_N_THREADS; i++) {
            tpp.cpumask[i] = true;
        }
    }
    return ggml_threadpool_new(&tpp);
}

nak_stage::~nak_stage() {
    if (cpu_lock_fd_ >= 0) {
        close(cpu_lock_fd_);
    }
    if (batch_log_) {
        fclose(batch_log_);
    }
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

llama_model_params nak_stage_model_params(const nak_stage_params & params) {
    llama_model_params mp = llama_model_default_params();
    mp.n_gpu_layers = params.n_gpu_layers;
    // CPU repacking copies weights into an extra buffer while their mmap'd pages stay resident
    // (reclaimable): --no-repack keeps one copy, at some decode speed (nak bench --no-repack)
    mp.use_extra_bufts = !params.no_repack;
    if (params.mlock) {
        mp.load_mode = LLAMA_LOAD_MODE_MMAP_MLOCK; // llama.cpp's --mlock: never swapped or compressed
    }
    return mp;
}

bool nak_select_devices(const std::string & spec, std::vector<ggml_backend_dev_t> & devs, std::string & err) {
    devs.clear();
    if (spec.empty()) {
        return true;
    }
    if (spec != "none") {
        size_t start = 0;
        while (start <= spec.size()) {
            const size_t end = std::min(spec.find(',', start), spec.size());
            const std::string name = spec.substr(start, end - start);
            ggml_backend_dev_t dev = ggml_backend_dev_by_name(name.c_str());
            // as llama.cpp's --device: the CPU is always used and is not a device to name
            if (!dev || ggml_backend_dev_type(dev) == GGML_BACKEND_DEVICE_TYPE_CPU) {
                std::string known;
                for (size_t i = 0; i < ggml_backend_dev_count(); i++) {
                    ggml_backend_dev_t d = ggml_backend_dev_get(i);
                    if (ggml_backend_dev_type(d) != GGML_BACKEND_DEVICE_TYPE_CPU) {
                        known += std::string(known.empty() ? "" : ", ") + ggml_backend_dev_name(d);
                    }
                }
                err = "no GPU device '" + name + "' in this build (" + NAK_BACKEND_NAME + "); devices: " +
                      (known.empty() ? "none" : known) + "; use --device none for the CPU alone";
                devs.clear();
                return false;
            }
            devs.push_back(dev);
            start = end + 1;
        }
    }
    devs.push_back(nullptr); // "none": the empty list, no GPU at all
    return true;
}

llama_context_params nak_stage_context_params(const nak_stage_params & params, bool is_last) {
    ggml_type type_k = GGML_TYPE_F16;
    ggml_type type_v = GGML_TYPE_F16;
    nak_parse_cache_type(params.cache_type_k, type_k); // checked by the caller
    nak_parse_cache_type(params.cache_type_v, type_v);
    llama_context_params cp = llama_context_default_params();
    cp.n_ctx           = params.n_ctx_session * params.max_sessions;
    cp.n_seq_max       = params.max_sessions;
    cp.n_batch         = params.n_batch;
    cp.n_ubatch        = params.n_ubatch;
    // each session its own KV stream: a session's attention never spans other sessions' cells
    cp.kv_unified      = false;
    // sliding-window layers keep n_swa + n_ubatch cells per session (llama.cpp's default) unless
    // --swa-full; rollback checks what is left first (window_kept), since seq_rm does not
    cp.swa_full        = params.swa_full;
    cp.type_k          = type_k;
    cp.type_v          = type_v;
    cp.flash_attn_type = params.flash_attn < 0 ? LLAMA_FLASH_ATTN_TYPE_AUTO
                       : params.flash_attn == 0 ? LLAMA_FLASH_ATTN_TYPE_DISABLED : LLAMA_FLASH_ATTN_TYPE_ENABLED;
    cp.n_threads       = params.n_threads > 0 ? params.n_threads
                       : (int32_t) std::max(1u, std::thread::hardware_concurrency());
    cp.n_threads_batch = params.n_threads_batch > 0 ? params.n_threads_batch : cp.n_threads;
    cp.no_perf         = true;
    if (!is_last) {
        // hidden states of every row go to the next stage
        cp.embeddings            = true;
        cp.pooling_type          = LLAMA_POOLING_TYPE_NONE;
        cp.n_outputs_max_per_seq = 0;
    } else {
        // the last stage samples one row per step, or every row of a speculative window (at most
        // 1 + NAK_STAGE_DRAFT_MAX), and a batch holds one step per session: reserve the compute
        // buffer for that many rows of logits, not n_batch (the default): n_vocab x n_ubatch
        // floats never used, 96 MiB for SmolLM2 at 512, device memory on a GPU. The memory
        // estimate reads this.
        cp.n_outputs_max = std::min<uint32_t>(params.n_batch, params.max_sessions * (1 + NAK_STAGE_DRAFT_MAX));
    }
    return cp;
}

bool nak_stage_check_params(const nak_stage_params & params, std::string & err) {
    if (params.max_sessions == 0 || params.n_ctx_session == 0) {
        err = "--ctx and --max-sessions must be at least 1";
        return false;
    }
    if ((uint64_t) params.n_ctx_session * params.max_sessions > UINT32_MAX) {
        err = "--ctx x --max-sessions exceeds 2^32 positions";
        return false;
    }
    if (params.n_batch == 0 || params.n_ubatch == 0) {
        err = "n_batch and n_ubatch must be at least 1";
        return false;
    }
    ggml_type type_k, type_v;
    if (!nak_parse_cache_type(params.cache_type_k, type_k) || !nak_parse_cache_type(params.cache_type_v, type_v)) {
        err = "unknown cache type '" + params.cache_type_k + "'/'" + params.cache_type_v +
              "': use one of f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1";
        return false;
    }
    return true;
}

// llama.cpp's progress_callback: the fraction of the weights loaded, to nak_stage_params::on_progress
static bool on_load_progress(float progress, void * data) {
    return (*(const std::function<bool(float)> *) data)(progress);
}

bool nak_stage::load(const nak_stage_params & params, std::string & err) {
    params_ = params;
    params_.on_progress = nullptr; // the caller's callback lives as long as this call, no longer
    if (!nak_stage_check_params(params, err)) {
        return false;
    }

    if (!nak_wire_parse(params.wire, wire_dtype_)) {
        err = "unknown wire format '" + params.wire + "': use f32 (exact), bf16 or q8r";
        return false;
    }
    if (params.max_batch == 0) {
        err = "--max-batch must be at least 1 (1 turns batching off)";
        return false;
    }
    if (!params.cpu_lock.empty()) {
        cpu_lock_fd_ = open(params.cpu_lock.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600);
        if (cpu_lock_fd_ < 0) {
            err = "cannot open the CPU lock file " + params.cpu_lock;
            return false;
        }
    }
    if (!params.batch_log.empty()) {
        batch_log_ = fopen(params.batch_log.c_str(), "a");
        if (!batch_log_) {
            err = "cannot open the batch log " + params.batch_log + " for appending";
            return false;
        }
    }

    llama_model_params mp = nak_stage_model_params(params);
    std::vector<ggml_backend_dev_t> devs; // outlives the load: mp.devices points into it
    if (!nak_select_devices(params.devices, devs, err)) {
        return false;
    }
    mp.devices = devs.empty() ? nullptr : devs.data();
    if (params.on_progress) {
        mp.progress_callback           = on_load_progress;
        mp.progress_callback_user_data = (void *) &params.on_progress;
    }
    nak_log_clear_errors();
    model_ = llama_model_load_from_file(params.model_path.c_str(), mp);
    if (!model_) {
        err = nak_log_explain("llama.cpp could not load " + params.model_path);
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

    const llama_context_params cp = nak_stage_context_params(params, is_last());
    const int32_t n_threads = cp.n_threads;
    const int32_t n_threads_batch = cp.n_threads_batch;
    ctx_ = llama_init_from_model(model_, cp);
    if (!ctx_) {
        err = "llama.cpp could not create a context of " + std::to_string(cp.n_ctx) +
              " tokens (--ctx x --max-sessions); lower them";
        return false;
    }
    // workers that sleep as soon as a decode ends (poll = 0): an idle stage costs no CPU, and
    // stages sharing a machine do not steal each other's cores; barriers inside a graph still spin
    threadpool_       = new_pool(n_threads, params.poll, params.cpu_strict);
    threadpool_batch_ = n_threads_batch == n_threads ? nullptr : new_pool(n_threads_batch, params.poll, params.cpu_strict);
    if (!threadpool_ || (n_threads_batch != n_threads && !threadpool_batch_)) {
        err = "could not create a thread pool of " + std::to_string(n_threads) + " threads";
        return false;
    }
    llama_attach_threadpool(ctx_, threadpool_, threadpool_batch_ ? threadpool_batch_ : threadpool_);
    // called once per graph node on the CPU backend: health.progress and PROGRESS frames move
    // while a long prefill computes, and shutdown can stop a decode half-way
    llama_set_abort_callback(ctx_, on_graph_node, this);
    slot_used_.assign(params.max_sessions, false);
    if (params.self_bench_steps > 0) {
        self_bench(params.self_bench_steps);
    }
    t_start_ms_ = nak_now_ms();
    publish();
    return true;
}

void nak_stage::publish() {
    std::lock_guard<std::mutex> lock(pub_mtx_);
    pub_sessions_active_ = (uint32_t) sessions_.size();
    pub_kv_tokens_used_  = 0;
    pub_owners_.clear();
    for (const auto & kv : sessions_) {
        pub_kv_tokens_used_ += kv.second.n_past;
        pub_owners_[kv.first] = kv.second.conn;
    }
    pub_tokens_in_ = tokens_in_;
}

int32_t nak_stage::owner_conn(uint64_t session) const {
    std::lock_guard<std::mutex> lock(pub_mtx_);
    const auto it = pub_owners_.find(session);
    return it == pub_owners_.end() ? -1 : it->second;
}

bool nak_stage::on_graph_node(void * data) {
    nak_stage * st = (nak_stage *) data;
    st->progress_.fetch_add(1, std::memory_order_relaxed);
    st->last_progress_us_.store(nak_now_us(), std::memory_order_relaxed);
    return st->abort_.load(std::memory_order_relaxed);
}

void nak_stage::begin_work() {
    const int64_t now = nak_now_us();
    last_progress_us_.store(now);
    busy_since_us_.store(now);
    progress_.fetch_add(1);
}

void nak_stage::end_work() {
    publish();
    progress_.fetch_add(1);
    busy_since_us_.store(0);
}

nak_hello_ok nak_stage::info() const {
    nak_hello_ok m;
    m.caps = 0; // the server adds NAK_CAP_AUTH when this stage has a cluster key
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
    json sessions = json::object();
    for (const auto & kv : sessions_) {
        const nak_session & s = kv.second;
        sessions[std::to_string(s.id)] = {
            { "n_past", s.n_past },                   { "tokens_in", s.tokens_in },
            { "compute_us", s.compute_us },           { "next_step", s.next_step },
            { "decode_us", s.decode_us },             { "decode_steps", s.decode_steps },
            { "decode_bytes_in", s.decode_bytes_in }, { "decode_llama_us", s.decode_llama_us },
            { "decode_lock_us", s.decode_lock_us },   { "decode_turn_us", s.decode_turn_us },
            { "decode_turns", s.decode_turns },
        };
    }
    const json j = {
        { "layer_start", layer_start_ },             { "layer_end", layer_end_ },
        { "sessions_active", h.sessions_active },    { "max_sessions", h.max_sessions },
        { "tokens_in", tokens_in_ },                 { "n_decode", n_decode_ },
        { "compute_us", compute_us_ },               { "bytes_in", bytes_in_ },
        { "bytes_out", bytes_out_ },                 { "rss_bytes", h.rss_bytes },
        { "kv_tokens_used", h.kv_tokens_used },      { "uptime_ms", h.uptime_ms },
        { "batch_entries", n_batch_entries_ },       { "max_batch_entries", max_batch_entries_ },
        { "seq_mismatches", seq_mismatches_ },       { "wire", nak_wire_name(wire_dtype_) },
        { "spec_windows", spec_windows_ },           { "spec_drafted", spec_drafted_ },
        { "spec_accepted", spec_accepted_ },         { "spec_rolled_back", spec_rolled_back_ },
        { "sessions", std::move(sessions) },
    };
    return j.dump();
}

void nak_stage::note_done(uint64_t session, int64_t t_arrival_us, int64_t t_ready_us) {
    nak_session * s = find_session(session);
    if (s && s->turn_open && t_ready_us >= t_arrival_us) {
        s->decode_turn_us += (uint64_t) (t_ready_us - t_arrival_us);
        s->decode_turns++;
        s->turn_open = false;
    }
}

nak_session * nak_stage::find_session(uint64_t id) {
    auto it = sessions_.find(id);
    return it == sessions_.end() ? nullptr : &it->second;
}

void nak_stage::free_session(nak_session & s) {
    ring_trips_.erase(s.id);
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
    if (!ids.empty()) {
        publish();
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
    if (!ids.empty()) {
        publish();
    }
}

// ---- request handlers ----------------------------------------------------------------------

std::vector<uint8_t> nak_stage::hello_reply(const nak_frame & req) const {
    nak_hello m;
    if (!nak_decode(req.payload, m)) {
        return nak_error_frame(req.hdr, NAK_ERR_BAD_REQUEST, "malformed HELLO payload");
    }
    if (!m.want_model_sha256.empty() && m.want_model_sha256 != params_.model_sha256) {
        return nak_error_frame(req.hdr, NAK_ERR_WRONG_MODEL, "this stage serves model " +
                               params_.model_sha256.substr(0, 12) + ", not " + m.want_model_sha256.substr(0, 12));
    }
    nak_header h;
    h.request_id = req.hdr.request_id;
    h.session_id = req.hdr.session_id;
    h.type       = NAK_MSG_HELLO_OK;
    nak_writer w;
    nak_encode(w, info());
    return nak_frame_bytes(h, w.buf);
}

void nak_stage::handle(const nak_frame & req, int32_t conn, bool & close_conn, std::vector<nak_outgoing> & out) {
    close_conn = false;
    if (req.hdr.type == NAK_MSG_FORWARD) {
        on_forwards({ &req }, { conn }, out);
        return;
    }
    if (req.hdr.type == NAK_MSG_BATCH) {
        on_batch(req, conn, out);
        return;
    }
    bytes_in_ += NAK_HEADER_SIZE + req.payload.size();
    nak_header h;
    h.request_id = req.hdr.request_id;
    h.session_id = req.hdr.session_id;
    nak_writer w;
    std::vector<uint8_t> reply;
    try {
        switch (req.hdr.type) {
            case NAK_MSG_HELLO:
                reply = hello_reply(req);
                break;
            case NAK_MSG_OPEN:       on_open(req, conn, w, h);   break;
            case NAK_MSG_TRUNCATE:   on_truncate(req, conn, w, h); break;
            case NAK_MSG_CLOSE:      on_close(req, conn, w, h);    break;
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
        if (reply.empty()) {
            reply = nak_frame_bytes(h, w.buf);
        }
    } catch (const nak_reject & e) {
        reply = nak_error_frame(req.hdr, e.code, e.message);
    } catch (const std::exception & e) {
        reply = nak_error_frame(req.hdr, NAK_ERR_INTERNAL, e.what());
    }
    bytes_out_ += reply.size();
    nak_outgoing s;
    s.conn  = conn;
    s.frame = std::move(reply);
    out.push_back(std::move(s));
}

void nak_stage::on_open(const nak_frame & req, int32_t conn, nak_writer & w, nak_header & h) {
    nak_open m;
    if (!nak_decode(req.payload, m)) {
        throw nak_reject{ NAK_ERR_BAD_REQUEST, "malformed OPEN payload" };
    }
    if (req.hdr.session_id == 0) {
        throw nak_reject{ NAK_ERR_BAD_REQUEST, "session id 0 is reserved" };
    }
    if (!(m.sampler.temp == m.sampler.temp) || !(m.sampler.repeat_penalty > 0.0f) ||
        m.sampler.top_p < 0.0f || m.sampler.top_p > 1.0f || m.sampler.min_p < 0.0f || m.sampler.min_p > 1.0f) {
        throw nak_reject{ NAK_ERR_BAD_REQUEST, "sampler parameters out of range (temp >= 0, top_p and min_p in [0, 1], repeat_penalty > 0)" };
    }
    if (m.draft_max < 0 || (uint32_t) m.draft_max >= params_.n_batch || m.draft_max > NAK_DRAFT_MAX_LIMIT) {
        throw nak_reject{ NAK_ERR_BAD_REQUEST, "draft_max " + std::to_string(m.draft_max) + " out of range: 0 (off) to " +
                          std::to_string(std::min<int64_t>(NAK_DRAFT_MAX_LIMIT, (int64_t) params_.n_batch - 1)) };
    }
    if (m.draft_max > 0 && (llama_model_is_recurrent(model_) || llama_model_is_hybrid(model_))) {
        throw nak_reject{ NAK_ERR_BAD_REQUEST, "speculative decoding needs a KV cache that can drop rejected rows; " +
                          arch_ + " keeps a recurrent state: open the session with draft_max 0" };
    }
    auto it = sessions_.find(req.hdr.session_id);
    if (m.reuse) {
        if (it == sessions_.end()) {
            throw nak_reject{ NAK_ERR_NO_SESSION, "session " + std::to_string(req.hdr.session_id) + " is not open here (expired?): open it anew" };
        }
        check_owner(it->second, conn, "reopen");
        reconfigure(it->second, m);
        h.type = NAK_MSG_OPEN_OK;
        w.u32(params_.n_ctx_session);
        w.i32(it->second.seq);
        return;
    }
    if (it != sessions_.end()) {
        throw nak_reject{ NAK_ERR_BAD_REQUEST, "session " + std::to_string(req.hdr.session_id) + " is already open" };
    }
    int32_t slot = -1;
    // the sequence id the first stage gave this session, when free here: then every stage cuts a
    // batch into the same ubatches (a busy or missing one only costs that, not correctness)
    if (m.seq >= 0 && (uint32_t) m.seq < slot_used_.size() && !slot_used_[m.seq]) {
        slot = m.seq;
    }
    for (uint32_t i = 0; slot < 0 && i < slot_used_.size(); i++) {
        if (!slot_used_[i]) {
            slot = (int32_t) i;
        }
    }
    if (slot < 0) {
        throw nak_reject{ NAK_ERR_OVERLOADED, "all " + std::to_string(params_.max_sessions) +
                          " sessions of this stage are in use (--max-sessions)" };
    }
    slot_used_[slot] = true;
    llama_memory_seq_rm(llama_get_memory(ctx_), slot, -1, -1);
    nak_session & s = sessions_[req.hdr.session_id];
    s.id    = req.hdr.session_id;
    s.seq   = slot;
    s.conn  = conn;
    s.token = m.token;
    reconfigure(s, m);
    h.type = NAK_MSG_OPEN_OK;
    w.u32(params_.n_ctx_session);
    w.i32(slot);
}

// TRUNCATE, CLOSE and a reopen come only from the connection that opened the session: the client
// (a stage on the route never sends them)
void nak_stage::check_owner(const nak_session & s, int32_t conn, const char * what) const {
    if (conn != s.conn) {
        throw nak_reject{ NAK_ERR_UNAUTHORIZED, std::string("cannot ") + what + " session " + std::to_string(s.id) +
                          ": it belongs to another connection (only the client that opened it may)" };
    }
}

void nak_stage::on_truncate(const nak_frame & req, int32_t conn, nak_writer & w, nak_header & h) {
    nak_session * s = find_session(req.hdr.session_id);
    if (!s) {
        throw nak_reject{ NAK_ERR_NO_SESSION, "no open session " + std::to_string(req.hdr.session_id) + " on this stage" };
    }
    check_owner(*s, conn, "truncate");
    nak_reader r(req.payload);
    const int32_t pos = r.i32();
    // optional: the step number the session continues with (a client that replayed a session
    // onto a replica aligns every stage's step counter with it)
    const size_t rest = r.ok ? r.n - r.off : 0;
    const bool set_step = rest == 8 || rest == 12;
    const uint64_t next_step = set_step ? r.u64() : 0;
    // and the tokens the session has generated (a ring stops after n_predict of them)
    const bool set_generated = rest == 12;
    const int32_t n_generated = set_generated ? r.i32() : 0;
    if (!r.done()) {
        throw nak_reject{ NAK_ERR_BAD_REQUEST, "malformed TRUNCATE payload" };
    }
    if (pos < 0 || (uint32_t) pos > s->n_past) {
        throw nak_reject{ NAK_ERR_BAD_REQUEST, "cannot truncate to position " + std::to_string(pos) + ": the session holds " +
                          std::to_string(s->n_past) };
    }
    if (!window_kept(*s, pos)) {
        throw nak_reject{ NAK_ERR_WINDOW_LOST, "cannot roll back to position " + std::to_string(pos) +
                          ": the sliding-window KV cache no longer holds the " + std::to_string(llama_model_n_swa(model_)) +
                          " positions before it (it keeps the window plus one ubatch; a stage started with --swa-full "
                          "keeps the whole context); truncate to 0 and feed the session again" };
    }
    if (!llama_memory_seq_rm(llama_get_memory(ctx_), s->seq, pos, -1)) {
        throw nak_reject{ NAK_ERR_BAD_REQUEST, "this model's memory cannot roll back to a position (recurrent state)" };
    }
    s->n_past = (uint32_t) pos;
    if (set_step) {
        s->next_step = next_step;
    }
    if (set_generated) {
        s->n_generated = std::max(0, n_generated);
    }
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

void nak_stage::on_close(const nak_frame & req, int32_t conn, nak_writer & w, nak_header & h) {
    nak_session * s = find_session(req.hdr.session_id);
    if (s) {
        check_owner(*s, conn, "close");
        free_session(*s);
    }
    h.type = NAK_MSG_CLOSE_OK;
    w.u8(s ? 1 : 0);
}
