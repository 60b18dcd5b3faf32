// The stage executor: one layer-range slice of a model in one llama_context, serving sessions.
//
// A stage owns the KV cache of its layers. Each session gets its own KV sequence (seq id = slot),
// so sessions never see each other's cells. Requests arrive as protocol frames (see
// cpp/protocol/protocol.h) and are answered with frames; the event loop (server.cpp) owns I/O.
// The class's members are defined by concept: stage.cpp (loading, sessions, request dispatch),
// executor.cpp (decode steps), sampling.cpp, sysinfo.cpp (host figures), tokenize.cpp (text).
#pragma once

#include "platform.h" // nak_rss_bytes, nak_mem_available_bytes
#include "protocol.h"
#include "speculate.h"

#include "llama.h"

#include <atomic>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <map>
#include <mutex>
#include <string>
#include <vector>

// most draft tokens a speculative window holds on this stage: the last stage reserves logits for
// max_sessions x (1 + this) rows (llama.cpp asserts a decode never outputs more rows than its
// context was created for), and clamps a session's nak_open::draft_max to it
#define NAK_STAGE_DRAFT_MAX 8

#ifndef NAK_BACKEND_NAME
#define NAK_BACKEND_NAME "cpu"
#endif

struct nak_stage_params {
    std::string model_path;
    std::string model_sha256;       // of the whole model; read from the slice metadata when empty
    uint32_t    n_ctx_session = 4096; // KV positions per session
    uint32_t    max_sessions  = 8;
    uint32_t    n_batch       = 2048; // llama.cpp defaults: the chain must cut ubatches as the reference
    uint32_t    n_ubatch      = 512;
    int32_t     n_threads     = 0;    // decode (one-token ubatches); 0: hardware concurrency
    int32_t     n_threads_batch = 0;  // prefill (larger ubatches); 0: as n_threads
    int32_t     n_gpu_layers  = -1;   // -1: all (only meaningful with a GPU backend)
    // llama.cpp's --device: "" every GPU it finds, "none" the CPU alone (no offload, no GPU matmul
    // of CPU weights either), or comma-separated ggml device names ("CUDA0,CUDA1")
    std::string devices;
    int32_t     flash_attn    = -1;   // -1 auto, 0 off, 1 on
    std::string cache_type_k  = "f16";
    std::string cache_type_v  = "f16";
    uint32_t    idle_timeout_s = 600; // sessions idle longer are freed
    int32_t     poll          = 0;    // thread pool polling 0..100 (llama.cpp --poll); 0: idle stages sleep
    bool        cpu_strict    = false; // pin thread i to CPU i (llama.cpp --cpu-strict)
    std::string cpu_lock;             // a file every stage on this machine locks around llama_decode
    int32_t     self_bench_steps = 4; // decode steps timed at start for health.layers_per_s (0: none)
    uint32_t    max_batch     = 8;    // first stage: session steps per llama_decode (1: one at a time)
    uint32_t    batch_hold_ms = 0;    // first stage: hold a ring step this long at most for sessions due back (0: never)
    std::string wire          = "f32"; // hidden states sent as f32 | bf16 | q8r (see cpp/protocol/wire.h)
    std::string batch_log;            // file to append one JSON line per decoded batch (replay tests)
    bool        no_repack     = false; // llama.cpp use_extra_bufts = false: no repacked weight copy
    bool        mlock         = false; // lock the weights in RAM (llama.cpp's mmap + mlock load mode)
    // sliding-window layers keep the whole context's KV (llama.cpp swa_full) instead of the window
    // plus a ubatch; without it a rollback further back than the kept cells is refused (WINDOW_LOST)
    bool        swa_full      = false;
    // called while llama.cpp loads the weights with the fraction done (0..1); false cancels the
    // load (llama.cpp's progress_callback). Used only during load(), never kept.
    std::function<bool(float)> on_progress;
};

// the sampler chain in llama.cpp's default order (common/sampling): penalties, top-k, top-p,
// min-p, temperature, dist; greedy when temp <= 0
llama_sampler * nak_sampler_build(const llama_vocab * vocab, const nak_sampler_params & sp);
// Key the sampler's random draw to the position the sampled token will take: the dist sampler is
// replaced by one seeded with mix(seed, pos). Sampling is then a function of (seed, token history),
// so a step sampled again after a failover, a ring restart or a truncation draws the same token,
// and a replica rebuilt by replay continues an uninterrupted run's seeded output. No-op when greedy.
void nak_sampler_seed_at(llama_sampler * chain, const nak_sampler_params & sp, int32_t pos);

// llama.cpp model and context parameters of a stage (the stage and nak's memory estimate use
// the same ones); the context is the last stage's when is_last, else it outputs hidden states
llama_model_params   nak_stage_model_params(const nak_stage_params & params);
// `spec` as nak_stage_params::devices into the NULL-terminated list llama_model_params::devices
// points at (left empty for "": llama.cpp's default). False with `err` naming the devices there
// are, for a name ggml does not know: llama.cpp would abort on it.
bool nak_select_devices(const std::string & spec, std::vector<ggml_backend_dev_t> & devs, std::string & err);
llama_context_params nak_stage_context_params(const nak_stage_params & params, bool is_last);

// checks what llama.cpp would abort on: positive --ctx/--max-sessions/batch sizes, known cache types
bool nak_stage_check_params(const nak_stage_params & params, std::string & err);

// ggml type from a --cache-type name (f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1); false if unknown
bool nak_parse_cache_type(const std::string & name, ggml_type & out);

// A frame the event loop must send: to an accepted connection, or to the next stage by address
// (stage-to-stage forwarding). A frame that cannot reach `address` is answered with an error to
// `error_conn` (the session's owner), built from `req`.
struct nak_outgoing {
    int32_t              conn = -1;
    std::string          address;
    std::vector<std::pair<int32_t, nak_header>> fail_to; // (owner, request) of each step in the frame
    std::vector<uint8_t> frame;
};

struct nak_session {
    uint64_t                 id       = 0;
    int32_t                  seq      = 0;   // KV sequence id (the slot)
    int32_t                  conn     = -1;  // connection that opened it (freed when it goes away)
    uint64_t                 token    = 0;   // nak_open::token: what other connections must show
    uint32_t                 n_past   = 0;   // positions cached
    uint64_t                 next_step = 0;
    int64_t                  last_used_ms = 0;
    nak_sampler_params       sp;
    std::vector<int32_t>     stop_tokens;
    int32_t                  n_predict   = -1; // ring: tokens to generate (-1: until EOG or a full context)
    int32_t                  n_generated = 0;  // tokens sampled so far (last stage)
    bool                     ignore_eog  = false;
    llama_sampler *          smpl = nullptr; // last stage only
    std::vector<llama_token> history;        // tokens at positions [0, history.size()) (last stage: sampler history)
    bool                     pending_sampled = false; // last_sampled was accepted by the sampler already
    llama_token              last_sampled    = -1;
    uint64_t                 tokens_in  = 0;
    uint64_t                 compute_us = 0;
    uint64_t                 decode_us    = 0; // compute of one-token steps (decode), for per-token figures
    uint64_t                 decode_steps = 0;
    // where a decode step's time at this stage goes (one-token steps, us): inside llama_decode,
    // waiting for the CPU lock (--cpu-lock), and from the step's frame arriving at the event loop
    // to its frames ready to send (the rest of turn_us is queueing, thread hand-offs, wire
    // decoding, sampling and framing)
    uint64_t                 decode_llama_us = 0;
    uint64_t                 decode_lock_us  = 0;
    uint64_t                 decode_turn_us  = 0;
    uint64_t                 decode_turns    = 0;
    bool                     turn_open       = false; // its last step was a decode step not yet sent
    uint64_t                 decode_bytes_in = 0; // bytes of the frames that brought those steps
    // speculative decoding: the last stage's drafter and window (nak_open::draft_max)
    nak_spec_state           spec;
    // rows of the last step after its first that the session's next step may start at (the
    // rejected part of a speculative window leaves the KV cache then); 0 after an ordinary step
    uint32_t                 spec_tail = 0;
};

// one session's step inside the batch being decoded
struct nak_step {
    nak_batch_entry e;
    nak_session *   s          = nullptr;
    const uint8_t * embd       = nullptr; // input rows in `dtype` (stages after the first), a view
    size_t          embd_bytes = 0;
    uint8_t         dtype      = NAK_DTYPE_NONE;
    int32_t         row0       = 0;       // first row of this step in the llama_batch
    int32_t         reply_conn = -1;      // where an error goes when the session is unknown
    nak_header      req;                  // the frame it came in (for error replies)
    uint64_t        wire_in    = 0;       // bytes of that frame (a BATCH's shared among its steps)
};

class nak_stage {
  public:
    nak_stage() = default;
    ~nak_stage();
    nak_stage(const nak_stage &) = delete;
    nak_stage & operator=(const nak_stage &) = delete;

    // load the model and create the context; false with err set on failure
    bool load(const nak_stage_params & params, std::string & err);

    // answer one request frame that arrived on connection `conn`: `out` receives the frames to
    // send (a reply to `conn`, or for FORWARD/BATCH the reply to the session's owner or the batch
    // forwarded to the next stage named in the route)
    void handle(const nak_frame & req, int32_t conn, bool & close_conn, std::vector<nak_outgoing> & out);
    // several FORWARD frames of different sessions, with one route, decoded as one batch (the
    // first stage's continuous batching; the event loop picks them)
    void on_forwards(const std::vector<const nak_frame *> & reqs, const std::vector<int32_t> & conns,
                     std::vector<nak_outgoing> & out);
    // whether a FORWARD may join a batch (it names a next hop: the batch travels on unchanged);
    // `route` receives that route
    static bool batchable(const nak_frame & req, std::string & route);
    // first stage: ring sessions out on the chain now that are due back soon (their last trip
    // took cycle_us; due = sent + 1.5 x cycle + 1 ms), not counting `except`. The event loop
    // holds a batch for them, so sessions of a ring fall into step and travel as one batch.
    size_t ring_due(int64_t now_us, const std::vector<uint64_t> & except) const;
    // the connection went away: free the KV of the sessions it opened
    void on_disconnect(int32_t conn);
    // free sessions idle for longer than idle_timeout_s
    void expire_idle(int64_t now_ms);

    // HELLO_OK and health: safe to call from the network thread while the compute thread is in
    // handle() (they read only immutable fields, atomics and the state publish() copied)
    nak_hello_ok info() const;
    // the answer to a HELLO frame: HELLO_OK, or ERROR (malformed, another model); any thread
    std::vector<uint8_t> hello_reply(const nak_frame & req) const;
    nak_health   health() const;
    std::string  stats_json() const;

    // The compute thread runs handle() / on_forwards() / on_disconnect() / expire_idle(); the
    // network thread answers HELLO and sends PROGRESS meanwhile. begin_work / end_work bracket
    // each request on the compute thread (for health.busy_ms, health.stalled_ms).
    void     begin_work();
    void     end_work();
    // graph nodes computed since start: moves while llama_decode advances (the CPU backend's
    // abort callback runs once per node)
    uint64_t progress() const { return progress_.load(std::memory_order_relaxed); }
    // the connection that owns `session` (opened it), or -1; safe from any thread
    int32_t  owner_conn(uint64_t session) const;
    // the event loop collected a finished job: the decode step of `session` in it, whose frame
    // arrived at `t_arrival_us`, has its frames ready to send at `t_ready_us` (steady clock, us).
    // Called only while the compute thread is idle, which alone otherwise touches the sessions.
    void     note_done(uint64_t session, int64_t t_arrival_us, int64_t t_ready_us);
    // make a running llama_decode return early (shutdown): it fails with "aborted"
    void     request_abort() { abort_.store(true); }

    uint32_t layer_start() const { return layer_start_; }
    uint32_t layer_end()   const { return layer_end_; }
    bool     is_first()    const { return layer_start_ == 0; }
    bool     is_last()     const { return layer_end_ == n_layer_full_; }
    uint32_t n_embd()      const { return n_embd_; }
    const nak_stage_params & params() const { return params_; }

    std::atomic<uint32_t> queue_depth{ 0 }; // set by the event loop, reported in health

  private:
    void on_open    (const nak_frame & req, int32_t conn, nak_writer & w, nak_header & h);
    void on_batch   (const nak_frame & req, int32_t conn, std::vector<nak_outgoing> & out);
    void check_step (nak_step & st, const std::string & next_hop);
    void reject_step(const nak_step & st, int32_t conn, uint16_t code, const std::string & msg, std::vector<nak_outgoing> & out);
    void run_steps  (std::vector<nak_step> & steps, const std::string & next_hop, uint64_t batch_id, std::vector<nak_outgoing> & out);
    void advance    (nak_step & st);
    void reply_step (nak_step & st, uint64_t compute_us, std::vector<nak_outgoing> & out);
    void verify_step(nak_step & st, nak_forward_ok & ok);
    void roll_back  (nak_step & st);
    bool ends_generation(const nak_session & s, llama_token tok, uint32_t n_past) const;
    void pass_on    (const std::vector<nak_step> & steps, const std::string & next_hop, uint64_t batch_id, std::vector<nak_outgoing> & out);
    void log_batch  (const std::vector<nak_step> & steps, uint64_t batch_id, int64_t t_start_us, int64_t t_locked_us,
                     int64_t t_end_us);
    void on_truncate(const nak_frame & req, int32_t conn, nak_writer & w, nak_header & h);
    void on_close   (const nak_frame & req, int32_t conn, nak_writer & w, nak_header & h);
    void check_owner(const nak_session & s, int32_t conn, const char * what) const;
    void on_tokenize  (const nak_frame & req, nak_writer & w, nak_header & h);
    void on_detokenize(const nak_frame & req, nak_writer & w, nak_header & h);
    void on_template  (const nak_frame & req, nak_writer & w, nak_header & h);

    void ring_next(const nak_session & s, const nak_step & st, llama_token tok, const std::vector<int32_t> & drafts,
                   std::vector<nak_outgoing> & out);
    nak_session * find_session(uint64_t id);
    void free_session(nak_session & s);
    void rebuild_sampler(nak_session & s);
    bool window_kept(const nak_session & s, int32_t pos) const;
    void self_bench(int32_t steps);
    static uint64_t mem_available_bytes();
    void reconfigure(nak_session & s, const nak_open & m);
    // copy what health() and owner_conn() report out of sessions_ (compute thread, after each change)
    void publish();
    static bool on_graph_node(void * data); // llama.cpp's abort callback: counts progress

    nak_stage_params      params_;
    llama_model *         model_ = nullptr;
    llama_context *       ctx_   = nullptr;
    ggml_threadpool *     threadpool_ = nullptr;
    ggml_threadpool *     threadpool_batch_ = nullptr;
    const llama_vocab *   vocab_ = nullptr;
    std::string           arch_;
    uint32_t              layer_start_  = 0;
    uint32_t              layer_end_    = 0;
    uint32_t              n_layer_full_ = 0;
    uint32_t              n_embd_       = 0;
    int64_t               t_start_ms_   = 0;
    uint64_t              tokens_in_    = 0;
    float                 layers_per_s_ = 0.0f; // from self_bench
    uint64_t              n_decode_     = 0;
    uint64_t              compute_us_   = 0;
    uint64_t              bytes_in_     = 0;
    uint64_t              bytes_out_    = 0;
    std::map<uint64_t, nak_session> sessions_;
    std::vector<bool>     slot_used_;
    std::vector<float>    embd_out_;
    uint8_t               wire_dtype_ = NAK_DTYPE_F32;
    FILE *                batch_log_  = nullptr;
    int                   cpu_lock_fd_ = -1;
    struct ring_trip { int64_t sent_us = 0; int64_t cycle_us = 0; bool out = false; };
    std::map<uint64_t, ring_trip> ring_trips_; // first stage: ring sessions' trips around the chain
    uint64_t              n_batches_formed_  = 0; // batch ids of the first stage
    uint64_t              n_batch_entries_   = 0; // steps decoded, over all batches
    uint64_t              max_batch_entries_ = 0;
    uint64_t              seq_mismatches_    = 0; // BATCH entries whose sequence id differs here
    uint64_t              spec_windows_  = 0; // speculative windows verified (last stage)
    uint64_t              spec_drafted_  = 0; // draft tokens in them
    uint64_t              spec_accepted_ = 0; // draft tokens the sampler agreed with
    uint64_t              spec_rolled_back_ = 0; // rows dropped from the KV cache by a next step (any stage)

    // liveness, read by the network thread
    std::atomic<uint64_t> progress_{ 0 };
    std::atomic<int64_t>  busy_since_us_{ 0 };     // 0: idle
    std::atomic<int64_t>  last_progress_us_{ 0 };
    std::atomic<bool>     abort_{ false };
    // published by the compute thread (publish()), guarded by pub_mtx_
    mutable std::mutex           pub_mtx_;
    uint32_t                     pub_sessions_active_ = 0;
    uint64_t                     pub_kv_tokens_used_  = 0;
    uint64_t                     pub_tokens_in_       = 0;
    std::map<uint64_t, int32_t>  pub_owners_;
};

// error reply helper (also used by the event loop for transport-level errors)
std::vector<uint8_t> nak_error_frame(const nak_header & req, uint16_t code, const std::string & message);

int64_t nak_now_ms();
int64_t nak_now_us();
