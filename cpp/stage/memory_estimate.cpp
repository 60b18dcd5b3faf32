#include "memory_estimate.h"
#include "llama_log.h"

#include "ggml-backend.h"
#include "llama-ext.h" // llama_get_memory_breakdown: staging API, not installed (private include)

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <memory>

namespace {

struct model_deleter { void operator()(llama_model * m)   const { llama_model_free(m); } };
struct ctx_deleter   { void operator()(llama_context * c) const { llama_free(c); } };

std::string meta_str(const llama_model * model, const char * key) {
    char buf[256];
    const int32_t n = llama_model_meta_val_str(model, key, buf, sizeof(buf));
    return n >= 0 ? std::string(buf) : std::string();
}

bool parse_u32(const std::string & s, uint32_t & out) {
    if (s.empty() || s.size() > 9 || !std::all_of(s.begin(), s.end(), [](char c) { return c >= '0' && c <= '9'; })) {
        return false;
    }
    out = (uint32_t) std::stoul(s);
    return true;
}

// llama.cpp aborts on some malformed files instead of failing: refuse what is plainly not a GGUF
// before handing it over
bool check_gguf_file(const std::string & path, std::string & err) {
    FILE * f = fopen(path.c_str(), "rb");
    if (!f) {
        err = path + ": " + std::strerror(errno) + "; give a slice from `nak slice` or a whole GGUF";
        return false;
    }
    char magic[4] = {};
    const size_t n = fread(magic, 1, sizeof(magic), f);
    fclose(f);
    if (n != sizeof(magic) || std::memcmp(magic, "GGUF", 4) != 0) {
        err = path + " is not a GGUF file (no GGUF magic)";
        return false;
    }
    return true;
}

// Whether weights of `buft` are used in place from the mmap'd file when the model is loaded with
// mmap: the condition llama_model_base::load_tensors applies (the device's default buffer type,
// and the device can wrap a host pointer). Other buffer types (CPU_REPACK, a GPU's) get a copy.
bool buft_mapped(ggml_backend_buffer_type_t buft, bool use_mmap) {
    if (!use_mmap) {
        return false;
    }
    ggml_backend_dev_t dev = ggml_backend_buft_get_device(buft);
    if (!dev) {
        // the CPU buffer type has no device at this commit (llama.cpp works around it the same way)
        dev = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU);
    }
    if (!dev) {
        return false;
    }
    ggml_backend_dev_props props;
    ggml_backend_dev_get_props(dev, &props);
    return props.caps.buffer_from_host_ptr && buft == ggml_backend_dev_buffer_type(dev);
}

} // namespace

bool nak_estimate_memory(const nak_stage_params & params, nak_memory_estimate & out, std::string & err) {
    out = nak_memory_estimate();
    if (!nak_stage_check_params(params, err)) {
        return false;
    }
    if (!check_gguf_file(params.model_path, err)) {
        return false;
    }

    llama_model_params mp = nak_stage_model_params(params);
    std::vector<ggml_backend_dev_t> devs; // outlives the load: mp.devices points into it
    if (!nak_select_devices(params.devices, devs, err)) {
        return false;
    }
    mp.devices = devs.empty() ? nullptr : devs.data();
    // whether the stage maps the file: decided on the stage's own load mode, before it is
    // overridden below
    const bool use_mmap = mp.load_mode == LLAMA_LOAD_MODE_AUTO || mp.load_mode == LLAMA_LOAD_MODE_MMAP ||
                          mp.load_mode == LLAMA_LOAD_MODE_MMAP_MLOCK;
    mp.no_alloc = true;
    // llama.cpp's own memory-fit pass (common/fit.cpp) loads so: with no_alloc there is nothing
    // to map, and load_tensors asserts !no_alloc on its mmap path
    mp.load_mode = LLAMA_LOAD_MODE_NONE;
    uint64_t heap_before = 0;
    const bool heap_known = nak_private_resident_bytes(heap_before);
    nak_log_clear_errors();
    std::unique_ptr<llama_model, model_deleter> model(llama_model_load_from_file(params.model_path.c_str(), mp));
    if (!model) {
        err = nak_log_explain("llama.cpp could not read " + params.model_path);
        return false;
    }

    out.arch = meta_str(model.get(), "general.architecture");
    uint32_t start = 0, end = 0, full = 0;
    if (parse_u32(meta_str(model.get(), "nakshatra.layer_range_start"), start) &&
        parse_u32(meta_str(model.get(), "nakshatra.layer_range_end"), end) &&
        parse_u32(meta_str(model.get(), "nakshatra.n_layer_full"), full)) {
        out.layer_start  = start;
        out.layer_end    = end;
        out.n_layer_full = full;
    } else {
        out.layer_start  = 0;
        out.layer_end    = (uint32_t) llama_model_n_layer(model.get());
        out.n_layer_full = out.layer_end;
    }
    out.is_first = out.layer_start == 0;
    out.is_last  = out.layer_end == out.n_layer_full; // as nak_stage::is_last

    const llama_context_params cp = nak_stage_context_params(params, out.is_last);
    std::unique_ptr<llama_context, ctx_deleter> ctx(llama_init_from_model(model.get(), cp));
    if (!ctx) {
        err = "llama.cpp could not create a context of " + std::to_string(cp.n_ctx) +
              " tokens (--ctx x --max-sessions) for " + params.model_path + " (see its log above)";
        return false;
    }

    out.n_ctx      = llama_n_ctx(ctx.get());
    out.n_seq_max  = llama_n_seq_max(ctx.get());
    out.n_batch    = llama_n_batch(ctx.get());
    out.n_ubatch   = llama_n_ubatch(ctx.get());
    out.n_embd     = (uint32_t) llama_model_n_embd(model.get());
    out.n_embd_out = (uint32_t) llama_model_n_embd_out(model.get());
    out.n_vocab    = (uint32_t) llama_vocab_n_tokens(llama_model_get_vocab(model.get()));

    for (const auto & [buft, mb] : llama_get_memory_breakdown(ctx.get())) {
        nak_memory_buffer b;
        b.name    = ggml_backend_buft_name(buft);
        // the CPU's extra buffer types (CPU_REPACK) are not "host" to ggml (their layout cannot be
        // read directly) but live in RAM all the same
        ggml_backend_dev_t dev = ggml_backend_buft_get_device(buft);
        b.host    = ggml_backend_buft_is_host(buft) || !dev || ggml_backend_dev_type(dev) == GGML_BACKEND_DEVICE_TYPE_CPU;
        b.mapped  = b.host && buft_mapped(buft, use_mmap);
        b.model   = mb.model;
        b.context = mb.context;
        b.compute = mb.compute;
        out.buffers.push_back(b);
    }

    // llama_context::output_reserve allocates the output buffer outside the breakdown: one row of
    // logits (a stage with the LM head) or of hidden states (embeddings, every other stage) per
    // output, for max(outputs of a decode, n_seq_max) outputs. The last stage asks for one output
    // per sampled step, or every row of a speculative window, one step per session; every other stage
    // marks every row an output, and a decode holds at most n_batch rows and never more than the KV
    // cache takes.
    const uint32_t rows = out.is_last ? std::max(out.n_seq_max, cp.n_outputs_max)
                                      : std::max(out.n_seq_max, std::min(out.n_batch, out.n_ctx));
    const uint64_t per_row = (cp.embeddings ? out.n_embd_out : 0) + (out.is_last ? out.n_vocab : 0);
    out.output_rows_max = rows;
    out.output_bytes    = (uint64_t) rows * per_row * sizeof(float);

    // the context allocated and zeroed the output buffer for n_seq_max rows already (for real,
    // even with no_alloc): it is counted in output_bytes, so it is taken out of the heap figure
    uint64_t heap_after = 0;
    if (heap_known && nak_private_resident_bytes(heap_after)) {
        const uint64_t initial_output = (uint64_t) out.n_seq_max * per_row * sizeof(float);
        const uint64_t grown = heap_after > heap_before ? heap_after - heap_before : 0;
        out.heap_bytes = grown > initial_output ? grown - initial_output : 0;
        out.heap_known = true;
    }
    return true;
}
