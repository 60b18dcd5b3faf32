// Text on a stage: TOKENIZE, DETOKENIZE and TEMPLATE (the model's chat template), with the
// model's own vocabulary, so that a client needs no tokenizer of its own.
#include "stage.h"
#include "stage_util.h"

#include <algorithm>

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
        // a GGUF without tokenizer.chat_template (Gemma 3 270M's): llama.cpp's built-in template
        // of the model's family where it has one, else ChatML, the default llama-server falls back to
        tmpl = arch_.rfind("gemma", 0) == 0 ? "gemma" : "chatml";
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
