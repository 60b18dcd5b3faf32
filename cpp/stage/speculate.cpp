#include "speculate.h"

#include "ngram-map.h" // llama.cpp common/: compiled from the fetched tree (cpp/drafters)

#include <algorithm>

// n-gram sizes tried, longest first: a longer match predicts better; prompt lookup decoding
// (Saxena 2023, and llama.cpp's lookup example with ngram sizes 1..4) falls back to shorter ones
static const uint16_t NAK_SPEC_NGRAMS[] = { 4, 3, 2 };
static const int32_t  NAK_SPEC_WINDOW0  = 4;  // first window: most texts repeat a few tokens at a time
static const int32_t  NAK_SPEC_BACKOFF_MAX = 64;

void nak_spec_state::reset(int32_t max) {
    *this      = nak_spec_state();
    draft_max  = std::max(0, max);
    window     = std::min(NAK_SPEC_WINDOW0, draft_max);
}

std::vector<llama_token> nak_spec_state::draft(const std::vector<llama_token> & history, llama_token sampled,
                                               int32_t limit) {
    const int32_t n = std::min(window, limit);
    if (draft_max <= 0 || n < 1) {
        return {};
    }
    if (cooldown > 0) {
        cooldown--;
        return {};
    }
    for (uint16_t size : NAK_SPEC_NGRAMS) {
        // common_ngram_simple_draft copies at least size_ngram tokens or none: a window shorter
        // than the n-gram asks for a shorter n-gram
        if (size > std::max<int32_t>(n, 2)) {
            continue;
        }
        const common_ngram_simple_config config = { size, (uint16_t) std::max<int32_t>(n, size) };
        std::vector<llama_token> d = common_ngram_simple_draft(config, history, sampled);
        if (!d.empty()) {
            d.resize(std::min<size_t>(d.size(), (size_t) n));
            return d;
        }
    }
    return {};
}

void nak_spec_state::update(int32_t drafted, int32_t accepted) {
    if (drafted <= 0) {
        return;
    }
    n_windows++;
    n_drafted  += (uint64_t) drafted;
    n_accepted += (uint64_t) accepted;
    accept_ema = 0.7f * accept_ema + 0.3f * (float) accepted / (float) drafted;
    if (accepted == drafted) {
        window  = std::min(draft_max, std::max(window, 1) * 2);
        backoff = 1;
        return;
    }
    window = std::max(1, std::min(draft_max, accepted + 1));
    if (accepted == 0 && accept_ema < 0.25f) {
        // mostly wrong lately: every rejected row was compute spent for nothing on every stage
        cooldown = backoff;
        backoff  = std::min(NAK_SPEC_BACKOFF_MAX, backoff * 2);
    }
}
