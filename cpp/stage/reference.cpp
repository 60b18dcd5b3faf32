#include "reference.h"
#include "llama_log.h"

#include "stage.h"

#include "ggml-cpu.h"

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <thread>

// cb_eval: ask == true asks whether we want tensor t; ask == false hands it over computed
static bool reference_eval_cb(ggml_tensor * t, bool ask, void * user_data) {
    auto * ref = (nak_reference *) user_data;
    int il = -1;
    if (sscanf(ggml_get_name(t), "l_out-%d", &il) != 1 || !ref->capture.count(il)) {
        return !ask ? true : false;
    }
    if (ask) {
        return true;
    }
    if (t->type != GGML_TYPE_F32 || t->ne[0] != ref->n_embd || !ggml_is_contiguous(t)) {
        return true;
    }
    std::vector<float> & dst = ref->captured[il];
    const size_t off = dst.size();
    dst.resize(off + (size_t) ggml_nelements(t));
    ggml_backend_tensor_get(t, dst.data() + off, 0, ggml_nbytes(t));
    return true;
}

nak_reference::~nak_reference() {
    if (greedy) {
        llama_sampler_free(greedy);
    }
    if (ctx) {
        llama_free(ctx);
    }
    if (threadpool) {
        ggml_threadpool_free(threadpool);
    }
    if (model) {
        llama_model_free(model);
    }
}

bool nak_reference::load(const std::string & path, uint32_t n_ctx, uint32_t n_batch_, uint32_t n_ubatch,
                         int32_t n_threads, const std::vector<int> & capture_layers, std::string & err,
                         uint32_t n_seq_max, bool swa_full, int32_t poll, int32_t n_gpu_layers,
                         const std::string & devices) {
    llama_model_params mp = llama_model_default_params();
    mp.n_gpu_layers = n_gpu_layers; // as a stage's (nak_stage_params::n_gpu_layers, devices)
    std::vector<ggml_backend_dev_t> devs;
    if (!nak_select_devices(devices, devs, err)) {
        return false;
    }
    mp.devices = devs.empty() ? nullptr : devs.data();
    nak_log_clear_errors();
    model = llama_model_load_from_file(path.c_str(), mp);
    if (!model) {
        err = nak_log_explain("llama.cpp could not load " + path);
        return false;
    }
    vocab  = llama_model_get_vocab(model);
    n_embd = llama_model_n_embd(model);
    capture.insert(capture_layers.begin(), capture_layers.end());
    n_batch = n_batch_;

    llama_context_params cp = llama_context_default_params();
    cp.n_ctx    = n_ctx;
    cp.n_batch  = n_batch_;
    cp.n_ubatch = n_ubatch;
    // as a stage: one KV stream per sequence (see nak_stage::load)
    cp.n_seq_max  = std::max(1u, n_seq_max);
    cp.kv_unified = false;
    cp.swa_full   = swa_full; // as the stages (nak_stage_params::swa_full)
    const int32_t nt = n_threads > 0 ? n_threads : (int32_t) std::max(1u, std::thread::hardware_concurrency());
    cp.n_threads       = nt;
    cp.n_threads_batch = nt;
    if (!capture.empty()) {
        cp.cb_eval           = reference_eval_cb;
        cp.cb_eval_user_data = this;
    }
    ctx = llama_init_from_model(model, cp);
    if (!ctx) {
        err = "llama.cpp could not create a context";
        return false;
    }
    // as llama-cli and llama-bench do: a persistent pool, with the default polling unless `poll` >= 0
    // (0: workers sleep as soon as a graph ends, as stages sharing a machine's cores run)
    ggml_threadpool_params tpp = ggml_threadpool_params_default(nt);
    if (poll >= 0) {
        tpp.poll = poll;
    }
    threadpool = ggml_threadpool_new(&tpp);
    if (threadpool) {
        llama_attach_threadpool(ctx, threadpool, threadpool);
    }
    return true;
}

static bool decode_tokens(llama_context * ctx, const llama_token * toks, int32_t n, int32_t pos0, bool want_last) {
    llama_batch batch = llama_batch_init(n, 0, 1);
    batch.n_tokens = n;
    for (int32_t i = 0; i < n; i++) {
        batch.token[i]     = toks[i];
        batch.pos[i]       = pos0 + i;
        batch.n_seq_id[i]  = 1;
        batch.seq_id[i][0] = 0;
        batch.logits[i]    = want_last && i == n - 1;
    }
    const int32_t rc = llama_decode(ctx, batch);
    llama_batch_free(batch);
    return rc == 0;
}

bool nak_reference::time_run(const std::vector<llama_token> & prompt, int32_t n_decode,
                             int64_t & prefill_us, int64_t & decode_us, std::string & err) {
    llama_memory_seq_rm(llama_get_memory(ctx), 0, -1, -1);
    llama_sampler * smpl = llama_sampler_init_greedy();
    const int64_t t0 = ggml_time_us();
    int32_t pos = 0;
    bool ok = true;
    for (size_t i = 0; ok && i < prompt.size(); i += n_batch) {
        const int32_t n = (int32_t) std::min<size_t>(n_batch, prompt.size() - i);
        ok = decode_tokens(ctx, prompt.data() + i, n, pos, i + n == prompt.size());
        pos += n;
    }
    llama_token tok = ok ? llama_sampler_sample(smpl, ctx, -1) : 0;
    const int64_t t1 = ggml_time_us();
    for (int32_t k = 0; ok && k < n_decode; k++) {
        ok = decode_tokens(ctx, &tok, 1, pos++, true);
        tok = ok ? llama_sampler_sample(smpl, ctx, -1) : 0;
    }
    const int64_t t2 = ggml_time_us();
    llama_sampler_free(smpl);
    prefill_us = t1 - t0;
    decode_us  = t2 - t1;
    if (!ok) {
        err = "llama_decode failed (context too small for the prompt and steps?)";
    }
    return ok;
}

std::vector<llama_token> nak_reference::generate(const std::vector<llama_token> & prompt, int32_t n_predict,
                                                 const nak_sampler_params & sp, std::string & err) {
    std::vector<llama_token> out;
    if (prompt.empty()) {
        err = "empty prompt";
        return out;
    }
    llama_memory_seq_rm(llama_get_memory(ctx), 0, -1, -1);
    captured.clear();
    llama_sampler * smpl = nak_sampler_build(vocab, sp);
    for (llama_token t : prompt) {
        llama_sampler_accept(smpl, t);
    }
    int32_t pos = 0;
    for (size_t i = 0; i < prompt.size(); i += n_batch) {
        const int32_t n = (int32_t) std::min<size_t>(n_batch, prompt.size() - i);
        if (!decode_tokens(ctx, prompt.data() + i, n, pos, i + n == prompt.size())) {
            err = "llama_decode failed on the prompt";
            llama_sampler_free(smpl);
            return out;
        }
        pos += n;
    }
    for (int32_t k = 0; n_predict < 0 || k < n_predict; k++) {
        nak_sampler_seed_at(smpl, sp, pos); // as the last stage does (stage.h)
        const llama_token tok = llama_sampler_sample(smpl, ctx, -1);
        if (llama_vocab_is_eog(vocab, tok)) {
            break;
        }
        out.push_back(tok);
        if (n_predict >= 0 && k + 1 == n_predict) {
            break;
        }
        if (!decode_tokens(ctx, &tok, 1, pos, true)) {
            err = "llama_decode failed while generating";
            break;
        }
        pos++;
    }
    llama_sampler_free(smpl);
    return out;
}

bool nak_reference::step_logits(const std::vector<llama_token> & prompt, const std::vector<llama_token> & continuation,
                                std::vector<float> & out, bool & bad_input, std::string & err) {
    out.clear();
    bad_input = true;
    if (prompt.empty()) {
        err = "empty prompt";
        return false;
    }
    // llama.cpp asserts on some bad ids and reads out of bounds on others: refuse them here
    const int32_t n_vocab = llama_vocab_n_tokens(vocab);
    for (size_t i = 0; i < prompt.size() + continuation.size(); i++) {
        const llama_token t = i < prompt.size() ? prompt[i] : continuation[i - prompt.size()];
        if (t < 0 || t >= n_vocab) {
            err = std::string(i < prompt.size() ? "prompt" : "continuation") + " token " +
                  std::to_string(t) + " at index " +
                  std::to_string(i < prompt.size() ? i : i - prompt.size()) + " is not in [0, " +
                  std::to_string(n_vocab) + ")";
            return false;
        }
    }
    // every continuation token is decoded too (its logits are the last row), so all of them
    // need a cell in sequence 0
    const size_t n_pos  = prompt.size() + continuation.size();
    const uint32_t n_seq_ctx = llama_n_ctx_seq(ctx);
    if (n_pos > n_seq_ctx) {
        err = std::to_string(prompt.size()) + " prompt + " + std::to_string(continuation.size()) +
              " continuation tokens do not fit a sequence of " + std::to_string(n_seq_ctx) + " positions";
        return false;
    }
    bad_input = false;

    llama_memory_seq_rm(llama_get_memory(ctx), 0, -1, -1);
    captured.clear();
    out.reserve((continuation.size() + 1) * (size_t) n_vocab);
    // copy the row llama.cpp marked as output of the last decode (one per decode here)
    auto take_last = [&]() {
        const float * logits = llama_get_logits_ith(ctx, -1);
        if (!logits) {
            err = "llama.cpp returned no logits";
            return false;
        }
        out.insert(out.end(), logits, logits + n_vocab);
        return true;
    };
    // same chunks and output flags as generate: the kernels are not batch-invariant, so other
    // cuts could change the logits in the last bits
    int32_t pos = 0;
    for (size_t i = 0; i < prompt.size(); i += n_batch) {
        const int32_t n = (int32_t) std::min<size_t>(n_batch, prompt.size() - i);
        if (!decode_tokens(ctx, prompt.data() + i, n, pos, i + n == prompt.size())) {
            err = "llama_decode failed on the prompt";
            return false;
        }
        pos += n;
    }
    if (!take_last()) {
        return false;
    }
    for (llama_token tok : continuation) {
        if (!decode_tokens(ctx, &tok, 1, pos, true)) {
            err = "llama_decode failed at position " + std::to_string(pos);
            return false;
        }
        pos++;
        if (!take_last()) {
            return false;
        }
    }
    return true;
}

std::vector<llama_token> nak_reference::decode_batch(const std::vector<int32_t> & seq, const std::vector<int32_t> & pos,
                                                     const std::vector<int32_t> & tokens, const std::vector<int32_t> & sample,
                                                     std::string & err) {
    std::vector<llama_token> out;
    const int32_t n = (int32_t) tokens.size();
    const int32_t n_vocab = llama_vocab_n_tokens(vocab);
    const uint32_t n_seq = llama_n_seq_max(ctx);
    for (int32_t i = 0; i < n; i++) {
        if (tokens[i] < 0 || tokens[i] >= n_vocab || seq[i] < 0 || (uint32_t) seq[i] >= n_seq) {
            err = "row " + std::to_string(i) + ": token or sequence id out of range";
            return out;
        }
    }
    if (n == 0 || (uint32_t) n > n_batch) {
        err = "a batch holds 1.." + std::to_string(n_batch) + " rows";
        return out;
    }
    // a row at a position the sequence already holds replays a stage's roll-back of a rejected
    // speculative window: those positions and everything after leave the sequence first
    std::map<int32_t, int32_t> first_pos;
    for (int32_t i = 0; i < n; i++) {
        auto it = first_pos.find(seq[i]);
        first_pos[seq[i]] = it == first_pos.end() ? pos[i] : std::min(it->second, pos[i]);
    }
    for (const auto & sp : first_pos) {
        llama_memory_seq_rm(llama_get_memory(ctx), sp.first, sp.second, -1);
    }
    llama_batch batch = llama_batch_init(n, 0, 1);
    batch.n_tokens = n;
    for (int32_t i = 0; i < n; i++) {
        batch.token[i]     = tokens[i];
        batch.pos[i]       = pos[i];
        batch.n_seq_id[i]  = 1;
        batch.seq_id[i][0] = seq[i];
        batch.logits[i]    = sample[i] != 0;
    }
    const int32_t rc = llama_decode(ctx, batch);
    llama_batch_free(batch);
    if (rc != 0) {
        err = "llama_decode failed (" + std::to_string(rc) + ")";
        return out;
    }
    if (!greedy) {
        greedy = llama_sampler_init_greedy();
    }
    last_logits.clear();
    for (int32_t i = 0; i < n; i++) {
        if (sample[i]) {
            const float * l = llama_get_logits_ith(ctx, i);
            last_logits.insert(last_logits.end(), l, l + n_vocab);
            out.push_back(llama_sampler_sample(greedy, ctx, i));
        }
    }
    return out;
}
