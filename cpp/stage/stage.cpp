#include "stage.h"

#include "ggml-cpu.h"
#include "wire.h"

#include <algorithm>
#include <cerrno>
#include <fcntl.h>
#include <sys/file.h>
#include <sys/resource.h>
#include <unistd.h>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <random>
#include <signal.h>
#include <thread>

// JSON (STATS, --batch-log) through the library in llama.cpp's vendor/ tree; ordered_json keeps
// the keys in the order written
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

static int64_t now_us() {
    return nak_now_us();
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

// splitmix64 finaliser (Steele, Lea, Flood 2014) of seed and position
static uint32_t nak_seed_mix(uint32_t seed, int32_t pos) {
    uint64_t z = ((uint64_t) seed << 32 | (uint32_t) pos) + 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    z ^= z >> 31;
    // LLAMA_DEFAULT_SEED (0xFFFFFFFF) would ask llama.cpp for a random seed
    const uint32_t out = (uint32_t) z;
    return out == LLAMA_DEFAULT_SEED ? 0 : out;
}

void nak_sampler_seed_at(llama_sampler * chain, const nak_sampler_params & sp, int32_t pos) {
    if (sp.temp <= 0.0f) {
        return;
    }
    // nak_sampler_build puts the dist sampler last
    const int n = llama_sampler_chain_n(chain);
    llama_sampler_free(llama_sampler_chain_remove(chain, n - 1));
    llama_sampler_chain_add(chain, llama_sampler_init_dist(nak_seed_mix(sp.seed, pos)));
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

bool nak_stage::load(const nak_stage_params & params, std::string & err) {
    params_ = params;
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

    const llama_model_params mp = nak_stage_model_params(params);
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

// what the host could still give (MemAvailable on Linux, free + inactive pages on macOS), bytes
uint64_t nak_stage::mem_available_bytes() {
    return nak_mem_available_bytes();
}

// A short decode benchmark at start, so `nak plan` can weigh this host by measured speed: one
// warm-up step, then `steps` one-token steps on sequence 0 (zeros as hidden-state input past the
// first stage), cleared afterwards. layers_per_s_ = layers of this slice x steps / seconds.
void nak_stage::self_bench(int32_t steps) {
    const int32_t n_embd_in = is_first() ? 0 : (int32_t) n_embd_;
    llama_batch batch = llama_batch_init(1, n_embd_in, 1);
    int64_t t0 = 0;
    bool ok = true;
    for (int32_t i = 0; i <= steps && ok; i++) {
        if (i == 1) {
            t0 = now_us(); // step 0 warms up (first touch of the weights, graph allocation)
        }
        batch.n_tokens = 1;
        if (is_first()) {
            batch.token[0] = 0;
        } else {
            std::fill(batch.embd, batch.embd + n_embd_, 0.0f);
        }
        batch.pos[0]       = i;
        batch.n_seq_id[0]  = 1;
        batch.seq_id[0][0] = 0;
        batch.logits[0]    = 1;
        ok = llama_decode(ctx_, batch) == 0;
    }
    const int64_t dt = now_us() - t0;
    llama_batch_free(batch);
    llama_memory_seq_rm(llama_get_memory(ctx_), 0, -1, -1);
    if (ok && dt > 0) {
        layers_per_s_ = (float) ((double) (layer_end_ - layer_start_) * steps * 1e6 / (double) dt);
    }
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
    st->last_progress_us_.store(now_us(), std::memory_order_relaxed);
    return st->abort_.load(std::memory_order_relaxed);
}

void nak_stage::begin_work() {
    const int64_t now = now_us();
    last_progress_us_.store(now);
    busy_since_us_.store(now);
    progress_.fetch_add(1);
}

void nak_stage::end_work() {
    publish();
    progress_.fetch_add(1);
    busy_since_us_.store(0);
}

nak_health nak_stage::health() const {
    nak_health h;
    {
        std::lock_guard<std::mutex> lock(pub_mtx_);
        h.sessions_active = pub_sessions_active_;
        h.kv_tokens_used  = pub_kv_tokens_used_;
        h.tokens_in       = pub_tokens_in_;
    }
    h.max_sessions    = params_.max_sessions;
    h.queue_depth     = queue_depth;
    h.n_ctx_session   = params_.n_ctx_session;
    h.rss_bytes = nak_rss_bytes();
    nak_rss_split(h.rss_anon_bytes, h.rss_file_bytes);
    h.uptime_ms = (uint64_t) (nak_now_ms() - t_start_ms_);
    const int64_t busy = busy_since_us_.load();
    if (busy != 0) {
        const int64_t now = now_us();
        h.busy_ms    = (uint64_t) std::max<int64_t>(0, now - busy) / 1000;
        h.stalled_ms = (uint64_t) std::max<int64_t>(0, now - last_progress_us_.load()) / 1000;
    }
    h.progress = progress_.load();
    h.mem_available_bytes = mem_available_bytes();
    h.layers_per_s        = layers_per_s_;
    rusage ru;
    if (getrusage(RUSAGE_SELF, &ru) == 0) {
        h.cpu_ms = (uint64_t) (ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) * 1000 +
                   (uint64_t) (ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1000;
    }
    return h;
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

// a session's sampling settings and stop rule; its KV and token history stay
void nak_stage::reconfigure(nak_session & s, const nak_open & m) {
    s.sp           = m.sampler;
    s.stop_tokens  = m.stop_tokens;
    s.n_predict    = m.n_predict;
    s.ignore_eog   = m.ignore_eog != 0;
    s.n_generated  = 0; // n_predict counts from this generation
    s.last_used_ms = nak_now_ms();
    s.spec.reset(std::min<int32_t>(m.draft_max, NAK_STAGE_DRAFT_MAX));
    rebuild_sampler(s);
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

// ---- decode steps: FORWARD frames and BATCH frames ---------------------------------------------

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
                it->second.cycle_us = now_us() - it->second.sent_us;
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

// one llama_decode over every step's rows, in order; then each step's reply, or the batch onward
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
    const int64_t t0 = now_us();
    // stages sharing a machine take turns (--cpu-lock): each decodes with every core, and none
    // spins in ggml's barriers while another holds the cores
    if (cpu_lock_fd_ >= 0) {
        while (flock(cpu_lock_fd_, LOCK_EX) != 0 && errno == EINTR) {
        }
    }
    const int64_t t_locked = now_us();
    const int32_t rc = llama_decode(ctx_, batch);
    const int64_t t_decoded = now_us();
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
            reply_step(st, (uint64_t) (now_us() - t0) * st.e.n_tokens / n_rows, out);
        }
    } else if (!next_hop.empty()) {
        pass_on(steps, next_hop, batch_id, out);
    } else {
        for (auto & st : steps) {
            reply_step(st, (uint64_t) (now_us() - t0) * st.e.n_tokens / n_rows, out);
        }
    }
    const int64_t dt = now_us() - t0;
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

static std::string token_piece(const llama_vocab * vocab, llama_token tok) {
    char buf[256];
    const int32_t k = llama_token_to_piece(vocab, tok, buf, sizeof(buf), 0, false);
    return k > 0 ? std::string(buf, k) : std::string();
}

// whether the token sampled for position `pos` is the last one the session generates: an
// end-of-generation or stop token, n_predict reached, or no position left for the token after
// it (the client stops by the same rule: python/nakshatra/chain.py, Session._last)
bool nak_stage::ends_generation(const nak_session & s, llama_token tok, uint32_t pos) const {
    const bool stop = std::find(s.stop_tokens.begin(), s.stop_tokens.end(), tok) != s.stop_tokens.end();
    return (llama_vocab_is_eog(vocab_, tok) && !s.ignore_eog) || stop ||
           (s.n_predict >= 0 && s.n_generated >= s.n_predict) || pos + 1 > params_.n_ctx_session;
}

// The last stage's side of a speculative window. Row i holds the token at position pos0 + i: the
// token sampled last, then the drafts. Rows are sampled in order exactly as one-token steps would
// sample them (the draw keyed to the position the token takes, every token fed to the penalties
// before the next row), and sampling goes on while the token drawn equals the next draft: that
// draft's row was then computed from the right input. The rows after the first mismatch leave this
// stage's KV cache now; every other stage drops them when the session's next step arrives
// (roll_back), so a rejection costs no extra message.
void nak_stage::verify_step(nak_step & st, nak_forward_ok & ok) {
    nak_session * s = st.s;
    const int32_t n    = (int32_t) st.e.n_tokens;
    const int32_t pos0 = st.e.pos0;
    ok.spec = true;
    ok.drafts.assign(st.e.tokens.begin() + 1, st.e.tokens.end());
    int32_t kept = 0;
    for (int32_t i = 0; i < n; i++) {
        const uint32_t pos = (uint32_t) (pos0 + i + 1); // where the token sampled from row i goes
        nak_sampler_seed_at(s->smpl, s->sp, (int32_t) pos);
        const llama_token tok = llama_sampler_sample(s->smpl, ctx_, st.row0 + i); // and accepts it
        s->n_generated++;
        kept = i + 1;
        ok.tokens.push_back(tok);
        ok.pieces.push_back(token_piece(vocab_, tok));
        if (ends_generation(*s, tok, pos)) {
            const bool stop = std::find(s->stop_tokens.begin(), s->stop_tokens.end(), tok) != s->stop_tokens.end();
            ok.is_eog = (llama_vocab_is_eog(vocab_, tok) && !s->ignore_eog) || stop ? 1 : 0;
            break;
        }
        if (i + 1 >= n || tok != st.e.tokens[i + 1]) {
            break;
        }
        s->history.push_back(tok); // the draft at position pos was right: its row stays
    }
    if (kept < n) {
        llama_memory_seq_rm(llama_get_memory(ctx_), s->seq, pos0 + kept, -1);
    }
    s->n_past          = (uint32_t) (pos0 + kept);
    s->spec_tail       = 0;
    s->pending_sampled = true;
    s->last_sampled    = ok.tokens.back();
    s->spec.update(n - 1, kept - 1);
    spec_windows_++;
    spec_drafted_  += (uint64_t) (n - 1);
    spec_accepted_ += (uint64_t) (kept - 1);
    ok.token  = ok.tokens.back();
    ok.piece  = ok.pieces.back();
    ok.n_past = s->n_past;
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
                ok.piece = token_piece(vocab_, tok);
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
                t.sent_us = now_us();
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
