// Stage: one slice loaded into a llama_context and served by the event loop (nak_serve), and
// estimate_memory, what such a stage would allocate. Loading and serving release the GIL.
#include "bindings.h"

#include "auth.h"
#include "memory_estimate.h"
#include "server.h"
#include "stage.h"

#include <pybind11/functional.h>
#include <pybind11/stl.h>

#include <atomic>
#include <memory>

namespace {

// the llama.cpp-facing part of a stage's parameters (what its model and context are built from),
// shared by a stage and its memory estimate
static nak_stage_params llama_params(const std::string & path, uint32_t n_ctx, uint32_t max_sessions, uint32_t n_batch,
                                     uint32_t n_ubatch, int32_t n_gpu_layers, int32_t flash_attn,
                                     const std::string & cache_type_k, const std::string & cache_type_v,
                                     bool no_repack, bool mlock, bool swa_full) {
    nak_stage_params p;
    p.model_path    = path;
    p.n_ctx_session = n_ctx;
    p.max_sessions  = max_sessions;
    p.n_batch       = n_batch;
    p.n_ubatch      = n_ubatch;
    p.n_gpu_layers  = n_gpu_layers;
    p.flash_attn    = flash_attn;
    p.cache_type_k  = cache_type_k;
    p.cache_type_v  = cache_type_v;
    p.no_repack     = no_repack;
    p.mlock         = mlock;
    p.swa_full      = swa_full;
    return p;
}

struct py_stage {
    std::unique_ptr<nak_stage> st;

    // loads the slice; StageError (code 'load') when it cannot
    explicit py_stage(const nak_stage_params & p) {
        ensure_backend();
        st = std::make_unique<nak_stage>();
        std::string err;
        bool ok;
        {
            py::gil_scoped_release nogil;
            ok = st->load(p, err);
        }
        if (!ok) {
            raise_stage_error(err, "load");
        }
    }

    // serve until a signal handler raises (SIGINT -> KeyboardInterrupt) or stop() is called
    void serve(const std::string & host, int port, const std::function<void(int)> & on_ready, uint32_t max_payload,
               const py::bytes & key, bool insecure) {
        nak_server_params sp;
        sp.insecure = insecure;
        const std::string k = key;
        if (!k.empty() && k.size() != NAK_KEY_SIZE) {
            throw py::value_error("a cluster key is " + std::to_string(NAK_KEY_SIZE) + " bytes");
        }
        sp.key.assign(k.begin(), k.end());
        sp.host        = host;
        sp.port        = port;
        sp.max_payload = max_payload;
        bool interrupted = false;
        std::string err;
        bool ok;
        {
            py::gil_scoped_release nogil;
            auto should_stop = [&]() {
                py::gil_scoped_acquire gil;
                if (PyErr_CheckSignals() != 0) {
                    interrupted = true;
                    return true;
                }
                return stop_flag.load();
            };
            auto ready = [&](int p) {
                py::gil_scoped_acquire gil;
                on_ready(p);
            };
            ok = nak_serve(*st, sp, should_stop, ready, err);
        }
        if (interrupted) {
            throw py::error_already_set();
        }
        if (!ok) {
            raise_stage_error(err, "listen");
        }
    }

    std::atomic<bool> stop_flag{ false };
};

// nak_estimate_memory as a dict (bytes; buffers: one dict per llama.cpp buffer type)
py::dict estimate_memory(const std::string & model_path, uint32_t n_ctx, uint32_t max_sessions, uint32_t n_batch,
                         uint32_t n_ubatch, int32_t n_gpu_layers, int32_t flash_attn, const std::string & cache_type_k,
                         const std::string & cache_type_v, bool no_repack, bool mlock, bool swa_full) {
    ensure_backend();
    nak_stage_params p = llama_params(model_path, n_ctx, max_sessions, n_batch, n_ubatch, n_gpu_layers, flash_attn,
                                      cache_type_k, cache_type_v, no_repack, mlock, swa_full);
    // one thread: the estimate computes nothing, and the thread count changes no buffer size
    p.n_threads       = 1;
    p.n_threads_batch = 1;
    nak_memory_estimate e;
    std::string err;
    bool ok;
    {
        py::gil_scoped_release nogil;
        ok = nak_estimate_memory(p, e, err);
    }
    if (!ok) {
        raise_stage_error(err, "load");
    }
    py::dict d;
    d["arch"]            = e.arch;
    d["layer_start"]     = e.layer_start;
    d["layer_end"]       = e.layer_end;
    d["n_layer_full"]    = e.n_layer_full;
    d["is_first"]        = e.is_first;
    d["is_last"]         = e.is_last;
    d["n_ctx"]           = e.n_ctx;
    d["n_seq_max"]       = e.n_seq_max;
    d["n_batch"]         = e.n_batch;
    d["n_ubatch"]        = e.n_ubatch;
    d["n_embd"]          = e.n_embd;
    d["n_embd_out"]      = e.n_embd_out;
    d["n_vocab"]         = e.n_vocab;
    d["output_bytes"]    = e.output_bytes;
    d["output_rows_max"] = e.output_rows_max;
    d["heap_bytes"]      = e.heap_bytes;
    d["heap_known"]      = e.heap_known;
    py::list bufs;
    for (const auto & b : e.buffers) {
        py::dict bd;
        bd["name"]    = b.name;
        bd["host"]    = b.host;
        bd["mapped"]  = b.mapped;
        bd["model"]   = b.model;
        bd["context"] = b.context;
        bd["compute"] = b.compute;
        bufs.append(bd);
    }
    d["buffers"] = bufs;
    return d;
}

} // namespace

void bind_stage(py::module_ & m) {
    m.def("estimate_memory", &estimate_memory, py::arg("model_path"), py::arg("n_ctx") = 4096,
          py::arg("max_sessions") = 8, py::arg("n_batch") = 2048, py::arg("n_ubatch") = 512,
          py::arg("n_gpu_layers") = -1, py::arg("flash_attn") = -1, py::arg("cache_type_k") = "f16",
          py::arg("cache_type_v") = "f16", py::arg("no_repack") = false, py::arg("mlock") = false,
          py::arg("swa_full") = false,
          "What llama.cpp allocates for a stage serving model_path with these parameters, without "
          "allocating it (cpp/stage/memory_estimate.h): a dict of bytes. Raises StageError (code "
          "'load') for a missing or non-GGUF file, bad parameters, or a model llama.cpp cannot load.");

    py::class_<py_stage>(m, "Stage", "One loaded slice and its llama_context (see cpp/stage/stage.h).")
        // the keyword arguments, Python's names and defaults, fill one nak_stage_params
        .def(py::init([](const std::string & model_path, const std::string & model_sha256, uint32_t n_ctx,
                         uint32_t max_sessions, int32_t n_threads, int32_t n_threads_batch, int32_t n_gpu_layers,
                         int32_t flash_attn, const std::string & cache_type_k, const std::string & cache_type_v,
                         uint32_t n_batch, uint32_t n_ubatch, uint32_t idle_timeout_s, uint32_t max_batch,
                         const std::string & wire, const std::string & batch_log, int32_t poll, bool cpu_strict,
                         const std::string & cpu_lock, uint32_t batch_hold_ms, bool no_repack, bool mlock,
                         bool swa_full) {
                 nak_stage_params p = llama_params(model_path, n_ctx, max_sessions, n_batch, n_ubatch, n_gpu_layers,
                                                   flash_attn, cache_type_k, cache_type_v, no_repack, mlock, swa_full);
                 p.model_sha256    = model_sha256;
                 p.n_threads       = n_threads;
                 p.n_threads_batch = n_threads_batch;
                 p.idle_timeout_s  = idle_timeout_s;
                 p.max_batch       = max_batch;
                 p.wire            = wire;
                 p.batch_log       = batch_log;
                 p.poll            = poll;
                 p.cpu_strict      = cpu_strict;
                 p.cpu_lock        = cpu_lock;
                 p.batch_hold_ms   = batch_hold_ms;
                 return std::make_unique<py_stage>(p);
             }),
             py::arg("model_path"), py::arg("model_sha256") = "", py::arg("n_ctx") = 4096, py::arg("max_sessions") = 8,
             py::arg("n_threads") = 0, py::arg("n_threads_batch") = 0, py::arg("n_gpu_layers") = -1, py::arg("flash_attn") = -1,
             py::arg("cache_type_k") = "f16", py::arg("cache_type_v") = "f16", py::arg("n_batch") = 2048,
             py::arg("n_ubatch") = 512, py::arg("idle_timeout_s") = 600, py::arg("max_batch") = 8,
             py::arg("wire") = "f32", py::arg("batch_log") = "", py::arg("poll") = 0, py::arg("cpu_strict") = false,
             py::arg("cpu_lock") = "", py::arg("batch_hold_ms") = 0, py::arg("no_repack") = false,
             py::arg("mlock") = false, py::arg("swa_full") = false)
        .def("serve", &py_stage::serve, py::arg("host"), py::arg("port"), py::arg("on_ready"),
             py::arg("max_payload") = NAK_MAX_PAYLOAD_DEFAULT, py::arg("key") = py::bytes(), py::arg("insecure") = false,
             "Run the event loop until SIGINT/SIGTERM raises or stop() is called; on_ready(port) once listening. "
             "Without a key the stage forwards only to loopback addresses unless insecure.")
        .def("stop", [](py_stage & s) { s.stop_flag = true; })
        .def_property_readonly("layer_start", [](const py_stage & s) { return s.st->layer_start(); })
        .def_property_readonly("layer_end", [](const py_stage & s) { return s.st->layer_end(); })
        .def_property_readonly("n_embd", [](const py_stage & s) { return s.st->n_embd(); })
        .def_property_readonly("is_first", [](const py_stage & s) { return s.st->is_first(); })
        .def_property_readonly("is_last", [](const py_stage & s) { return s.st->is_last(); })
        .def("info", [](const py_stage & s) { return hello_dict(s.st->info()); },
             "What this stage answers to HELLO (layer range, model, health).");
}
