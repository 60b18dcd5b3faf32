// What a stage reports of its host and process: memory, CPU time, liveness (health), and the
// decode speed it measured at start (self_bench). The OS-specific readers are in cpp/platform/.
#include "stage.h"

#include <algorithm>
#include <sys/resource.h>

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
            t0 = nak_now_us(); // step 0 warms up (first touch of the weights, graph allocation)
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
    llama_synchronize(ctx_); // a GPU backend may still be computing the last step
    const int64_t dt = nak_now_us() - t0;
    llama_batch_free(batch);
    llama_memory_seq_rm(llama_get_memory(ctx_), 0, -1, -1);
    if (ok && dt > 0) {
        layers_per_s_ = (float) ((double) (layer_end_ - layer_start_) * steps * 1e6 / (double) dt);
    }
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
        const int64_t now = nak_now_us();
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
