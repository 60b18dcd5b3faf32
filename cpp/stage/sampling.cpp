// Sampling on the last stage: the sampler chain, its draw keyed to positions, a session's sampling
// settings, the end-of-generation rule, and the verification of a speculative window.
#include "stage.h"
#include "stage_util.h"

#include <algorithm>

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

std::string nak_token_piece(const llama_vocab * vocab, llama_token tok) {
    char buf[256];
    const int32_t k = llama_token_to_piece(vocab, tok, buf, sizeof(buf), 0, false);
    return k > 0 ? std::string(buf, k) : std::string();
}

// whether the token sampled for position `pos` is the last one the session generates: an
// end-of-generation or stop token, n_predict reached, or no position left for the token after
// it (the client stops by the same rule: python/nakshatra/client/chain.py, Session._last)
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
        ok.pieces.push_back(nak_token_piece(vocab_, tok));
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
