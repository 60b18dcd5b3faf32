// Reference: the unsplit model on llama.cpp's stock path, the baseline the chain's outputs are
// compared with. Every call that computes releases the GIL.
#include "bindings.h"

#include "reference.h"

#include "llama.h"

#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include <algorithm>

namespace {

struct py_reference {
    nak_reference ref;

    py_reference(const std::string & path, uint32_t n_ctx, uint32_t n_batch, uint32_t n_ubatch, int32_t n_threads,
                 const std::vector<int> & capture_layers, uint32_t n_seq_max, bool swa_full, int32_t poll,
                 int32_t n_gpu_layers, const std::string & devices) {
        ensure_backend();
        std::string err;
        bool ok;
        {
            py::gil_scoped_release nogil;
            ok = ref.load(path, n_ctx, n_batch, n_ubatch, n_threads, capture_layers, err, n_seq_max, swa_full, poll,
                          n_gpu_layers, devices);
        }
        if (!ok) {
            raise_stage_error(err, "load");
        }
    }

    std::vector<int32_t> generate(const std::vector<int32_t> & prompt, int32_t n_predict, float temp, int32_t top_k,
                                  float top_p, float min_p, float repeat_penalty, int32_t repeat_last_n, uint32_t seed) {
        nak_sampler_params sp{ temp, top_k, top_p, min_p, repeat_penalty, repeat_last_n, seed };
        std::string err;
        std::vector<int32_t> out;
        {
            py::gil_scoped_release nogil;
            out = ref.generate(prompt, n_predict, sp, err);
        }
        if (!err.empty()) {
            raise_stage_error(err, "internal");
        }
        return out;
    }

    std::vector<int32_t> decode_batch(const std::vector<int32_t> & seq, const std::vector<int32_t> & pos,
                                      const std::vector<int32_t> & tokens, const std::vector<int32_t> & sample) {
        if (seq.size() != pos.size() || pos.size() != tokens.size() || tokens.size() != sample.size()) {
            throw py::value_error("seq, pos, tokens and sample must have one entry per row");
        }
        std::string err;
        std::vector<int32_t> out;
        {
            py::gil_scoped_release nogil;
            out = ref.decode_batch(seq, pos, tokens, sample, err);
        }
        if (!err.empty()) {
            raise_stage_error(err, "internal");
        }
        return out;
    }

    py::array_t<float> last_logits() const {
        const py::ssize_t n_vocab = llama_vocab_n_tokens(ref.vocab);
        const py::ssize_t n_rows  = (py::ssize_t) (ref.last_logits.size() / (size_t) n_vocab);
        return py::array_t<float>({ n_rows, n_vocab }, ref.last_logits.data()); // a copy
    }

    py::array_t<float> step_logits(const std::vector<int32_t> & prompt, const std::vector<int32_t> & continuation) {
        auto * rows = new std::vector<float>();
        // owns the rows once the array exists; frees them on every error path before that
        py::capsule owner(rows, [](void * p) { delete (std::vector<float> *) p; });
        std::string err;
        bool bad_input = false;
        bool ok;
        {
            py::gil_scoped_release nogil;
            ok = ref.step_logits(prompt, continuation, *rows, bad_input, err);
        }
        if (!ok) {
            if (bad_input) {
                throw py::value_error(err);
            }
            raise_stage_error(err, "internal");
        }
        const py::ssize_t n_vocab = llama_vocab_n_tokens(ref.vocab);
        const py::ssize_t n_rows  = (py::ssize_t) (rows->size() / (size_t) n_vocab);
        return py::array_t<float>({ n_rows, n_vocab }, rows->data(), owner);
    }

    py::tuple time_run(const std::vector<int32_t> & prompt, int32_t n_decode) {
        int64_t prefill_us = 0, decode_us = 0;
        std::string err;
        bool ok;
        {
            py::gil_scoped_release nogil;
            ok = ref.time_run(prompt, n_decode, prefill_us, decode_us, err);
        }
        if (!ok) {
            raise_stage_error(err, "internal");
        }
        return py::make_tuple(prefill_us, decode_us);
    }

    py::bytes captured(int layer) const {
        auto it = ref.captured.find(layer);
        if (it == ref.captured.end()) {
            return py::bytes();
        }
        return py::bytes((const char *) it->second.data(), it->second.size() * sizeof(float));
    }

    std::vector<int32_t> tokenize(const std::string & text, bool add_special, bool parse_special) const {
        std::vector<llama_token> toks(text.size() + 8);
        int32_t n = llama_tokenize(ref.vocab, text.data(), (int32_t) text.size(), toks.data(), (int32_t) toks.size(),
                                   add_special, parse_special);
        if (n < 0) {
            toks.resize(-n);
            n = llama_tokenize(ref.vocab, text.data(), (int32_t) text.size(), toks.data(), (int32_t) toks.size(),
                               add_special, parse_special);
        }
        toks.resize(std::max(0, n));
        return toks;
    }
};

} // namespace

void bind_reference(py::module_ & m) {
    const nak_sampler_params sd;
    py::class_<py_reference>(m, "Reference", "The unsplit model on llama.cpp's stock path (see cpp/stage/reference.h).")
        .def(py::init<const std::string &, uint32_t, uint32_t, uint32_t, int32_t, const std::vector<int> &, uint32_t, bool, int32_t,
                      int32_t, const std::string &>(),
             py::arg("model_path"), py::arg("n_ctx") = 4096, py::arg("n_batch") = 2048, py::arg("n_ubatch") = 512,
             py::arg("n_threads") = 0, py::arg("capture_layers") = std::vector<int>{}, py::arg("n_seq_max") = 1, py::arg("swa_full") = false, py::arg("poll") = -1,
             py::arg("n_gpu_layers") = -1, py::arg("devices") = "",
             "n_seq_max > 1: that many KV sequences of n_ctx / n_seq_max positions each, one stream per\n"
             "sequence, as a stage with --max-sessions n_seq_max (for decode_batch replays). swa_full: keep the\n"
             "whole context in sliding-window layers, as a stage with --swa-full. poll: the thread pool's polling\n"
             "level (llama.cpp's --poll; -1: its default, 50; 0: as stages run, workers sleep between graphs).\n"
             "n_gpu_layers, devices: as a stage's --n-gpu-layers and --device (\"none\": the CPU alone).")
        // the sampler's defaults (nak_sampler_params) except temp: a reference run is greedy unless asked
        .def("generate", &py_reference::generate, py::arg("prompt"), py::arg("n_predict"), py::arg("temp") = 0.0f,
             py::arg("top_k") = sd.top_k, py::arg("top_p") = sd.top_p, py::arg("min_p") = sd.min_p,
             py::arg("repeat_penalty") = sd.repeat_penalty, py::arg("repeat_last_n") = sd.repeat_last_n,
             py::arg("seed") = sd.seed)
        .def("decode_batch", &py_reference::decode_batch, py::arg("seq"), py::arg("pos"), py::arg("tokens"),
             py::arg("sample"),
             "One llama_decode of the given rows (one entry per row); returns the greedy token of every row "
             "whose sample flag is set, in row order. Replays a stage's --batch-log. A row at a position its "
             "sequence holds drops that position and the ones after it first (a speculative window's roll-back).")
        .def("last_logits", &py_reference::last_logits,
             "Logits of the rows the last decode_batch sampled: float32 [n_sampled, n_vocab] (a copy).")
        .def("step_logits", &py_reference::step_logits, py::arg("prompt"), py::arg("continuation"),
             "Teacher-forced logits: prefill prompt (n_batch chunks, as generate), then decode each\n"
             "continuation token one per llama_decode. float32 array [1 + len(continuation), n_vocab]:\n"
             "the logits of the last prompt row, then after each continuation token. ValueError for an\n"
             "empty prompt, a token id outside the vocabulary, or more tokens than a sequence holds.")
        .def("time_run", &py_reference::time_run, py::arg("prompt"), py::arg("n_decode"),
             "Prefill then n_decode greedy one-token steps from an empty cache: (prefill_us, decode_us).")
        .def("captured", &py_reference::captured, py::arg("layer"),
             "l_out of a global layer over every decoded row: [n_rows, n_embd] float32 bytes.")
        .def("tokenize", &py_reference::tokenize, py::arg("text"), py::arg("add_special") = true,
             py::arg("parse_special") = false);
}
