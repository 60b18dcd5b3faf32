// The reference: the unsplit model in one process on llama.cpp's stock code path, with the same
// context parameters a stage uses. Tests demand that a chain of stages reproduces its tokens and,
// at every stage boundary, its layer outputs (`l_out-<il>`, captured with cb_eval) byte for byte.
#pragma once

#include "protocol.h"

#include "llama.h"

#include <map>
#include <set>
#include <string>
#include <vector>

struct nak_reference {
    llama_model *       model = nullptr;
    llama_context *     ctx   = nullptr;
    ggml_threadpool *   threadpool = nullptr; // llama.cpp's tools' default: poll = 50
    const llama_vocab * vocab = nullptr;
    llama_sampler *     greedy = nullptr;
    uint32_t            n_batch = 2048;
    int32_t             n_embd  = 0;
    std::set<int>       capture;                     // global layer indices whose l_out to keep
    std::map<int, std::vector<float>> captured;      // layer -> rows [n_rows, n_embd], batch order

    ~nak_reference();
    bool load(const std::string & path, uint32_t n_ctx, uint32_t n_batch, uint32_t n_ubatch,
              int32_t n_threads, const std::vector<int> & capture_layers, std::string & err,
              uint32_t n_seq_max = 1, bool swa_full = false, int32_t poll = -1, int32_t n_gpu_layers = -1,
              const std::string & devices = "");
    // one llama_decode of the given rows; the greedy token of each row flagged in `sample`, in row
    // order (a replay of a stage's batch log: same rows, same sequence ids, same ubatch cuts)
    // logits of the rows the last decode_batch sampled, [n_sampled, n_vocab] row-major
    std::vector<float> last_logits;
    std::vector<llama_token> decode_batch(const std::vector<int32_t> & seq, const std::vector<int32_t> & pos,
                                          const std::vector<int32_t> & tokens, const std::vector<int32_t> & sample,
                                          std::string & err);
    // prefill `prompt` (cut in n_batch chunks), then sample up to n_predict tokens, one per decode,
    // stopping at an end-of-generation token (not included). Returns the sampled tokens.
    std::vector<llama_token> generate(const std::vector<llama_token> & prompt, int32_t n_predict,
                                      const nak_sampler_params & sp, std::string & err);
    // teacher-forced logits, for tests that check a sampler against the unsplit model: prefill
    // `prompt` in n_batch chunks exactly as generate does, then decode each token of `continuation`
    // one per llama_decode. `out` gets 1 + continuation.size() rows of n_vocab floats: the logits
    // of the last prompt row, then those after each continuation token. Returns false with `err`
    // set; `bad_input` tells a caller's mistake (empty prompt, token id out of range, more
    // positions than a sequence holds) from a llama_decode failure.
    bool step_logits(const std::vector<llama_token> & prompt, const std::vector<llama_token> & continuation,
                     std::vector<float> & out, bool & bad_input, std::string & err);
    // timing for `nak bench`: prefill `prompt` from an empty cache, then n_decode greedy steps of
    // one token each (end-of-generation ignored). Times in microseconds; false on a decode error.
    bool time_run(const std::vector<llama_token> & prompt, int32_t n_decode,
                  int64_t & prefill_us, int64_t & decode_us, std::string & err);
};
