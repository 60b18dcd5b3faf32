// Speculative decoding without a second model, the last stage's side: llama.cpp's n-gram drafter
// (common/ngram-map.h, common_ngram_simple_draft: prompt lookup over the session's tokens)
// proposes the tokens that follow, and the window [sampled, draft...] travels the chain as one
// step of k+1 rows. The last stage samples every row and keeps the rows up to the first draft
// that differs from what the sampler drew there (see nak_stage::verify_step).
//
// The window adapts to what was accepted (nak_spec_state::update): it doubles after a fully
// accepted draft and shrinks to the accepted length plus one otherwise, and drafting stands down
// (for a number of trips that doubles each time) while drafts are mostly rejected, so text the
// drafter cannot predict costs one failed window now and then, not a wider batch every trip.
#pragma once

#include "llama.h"

#include <cstdint>
#include <vector>

struct nak_spec_state {
    int32_t  draft_max = 0;   // most draft tokens in a window (0: speculation off)
    int32_t  window    = 0;   // draft tokens to propose next, 1..draft_max
    float    accept_ema = 1.0f; // recent accepted / drafted, exponentially weighted (alpha 0.3)
    int32_t  cooldown  = 0;   // trips left without drafting
    int32_t  backoff   = 1;   // trips of the next cooldown
    // totals for stats and the benchmark
    uint64_t n_windows  = 0;  // verify steps (windows with at least one draft token)
    uint64_t n_drafted  = 0;  // draft tokens sent
    uint64_t n_accepted = 0;  // draft tokens the sampler agreed with

    // start (or restart) with at most draft_max draft tokens per window
    void reset(int32_t draft_max);
    // Draft at most min(window, limit) tokens to follow `history` (tokens at positions
    // [0, history.size())) and `sampled` (the token for position history.size()). Empty when off,
    // cooling down, limit < 1 or no n-gram of the recent tokens recurs.
    std::vector<llama_token> draft(const std::vector<llama_token> & history, llama_token sampled, int32_t limit);
    // a window of `drafted` draft tokens came back with `accepted` of them kept
    void update(int32_t drafted, int32_t accepted);
};
