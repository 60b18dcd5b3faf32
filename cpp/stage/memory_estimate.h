// What llama.cpp will allocate for a stage, without allocating it: the slice (or whole model) is
// loaded with llama_model_params.no_alloc (metadata only, simulated allocations) and a context is
// created with exactly the stage's parameters (nak_stage_model_params, nak_stage_context_params),
// then llama.cpp's own breakdown is read. `nak inspect` and `nak plan` build their prediction of a
// stage's footprint on it (python/nakshatra/gguf/memory.py adds what llama.cpp does not allocate).
#pragma once

#include "stage.h"

#include <cstdint>
#include <string>
#include <vector>

// bytes of one buffer type, as llama_get_memory_breakdown reports them
struct nak_memory_buffer {
    std::string name;         // buffer type name: "CPU", "CPU_REPACK", "CUDA0", ...
    bool        host   = false; // lives in host memory (RAM): a CPU buffer type, repacked ones included
    // weights of this buffer type are used in place from the mmap'd file at run time (the
    // device's default buffer type, mmap on): file pages, not an anonymous copy
    bool        mapped = false;
    uint64_t    model   = 0;  // weights
    uint64_t    context = 0;  // KV cache (llama.cpp's "context" memory)
    uint64_t    compute = 0;  // the scheduler's compute buffers, at their reserved (worst-case) size
};

struct nak_memory_estimate {
    std::string arch;
    uint32_t    layer_start  = 0;  // global, half-open
    uint32_t    layer_end    = 0;
    uint32_t    n_layer_full = 0;
    bool        is_first     = false;
    bool        is_last      = false;
    uint32_t    n_ctx        = 0;  // KV positions in all (ctx per session x max sessions)
    uint32_t    n_seq_max    = 0;
    uint32_t    n_batch      = 0;
    uint32_t    n_ubatch     = 0;
    uint32_t    n_embd       = 0;
    uint32_t    n_embd_out   = 0;
    uint32_t    n_vocab      = 0;
    std::vector<nak_memory_buffer> buffers;
    // llama.cpp's output buffer (logits or hidden states of the output rows), host memory; not in
    // the breakdown. Sized for the most rows a stage ever asks for (see output_rows_max).
    uint64_t    output_bytes    = 0;
    uint32_t    output_rows_max = 0;
    // heap llama.cpp keeps, and has written, for the model and the context beyond their buffers:
    // the vocabulary (token strings, maps, merges), tensor and graph metadata, the scheduler's
    // tables. Measured as this process's private resident memory after loading and creating the
    // context minus before (nak_private_resident_bytes), less the output buffer (counted above);
    // 0 with heap_known false where the OS does not tell. Other threads of the process allocating
    // meanwhile would add to it.
    uint64_t    heap_bytes = 0;
    bool        heap_known = false;
};

// Fill `out` for the stage `params` would load (params.model_path: a slice or a whole model).
// Returns false with `err` set when the file is missing, unreadable or not a GGUF, a parameter is
// out of range, or llama.cpp cannot load the model or create the context; nothing is leaked.
bool nak_estimate_memory(const nak_stage_params & params, nak_memory_estimate & out, std::string & err);
