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

// a stage's parameters: the defaults of nak_stage_params (stage.h, the one place they are
// written), then every keyword argument set through StageParams' attributes, so a name that is
// not a parameter, or a value of the wrong type, raises TypeError naming it
static nak_stage_params stage_params(const std::string & model_path, const py::kwargs & kw) {
    py::object obj = py::cast(nak_stage_params{});
    for (const auto & item : kw) {
        const std::string key = py::str(item.first);
        if (key.empty() || key[0] == '_' || !py::hasattr(obj, key.c_str())) {
            throw py::type_error("unknown stage parameter '" + key + "' (the fields of StageParams are the parameters)");
        }
        try {
            py::setattr(obj, key.c_str(), item.second);
        } catch (py::error_already_set & e) {
            if (!e.matches(PyExc_TypeError)) {
                throw;
            }
            // pybind's own message lists overloads; name the parameter and the value instead
            throw py::type_error("stage parameter '" + key + "' cannot be " + std::string(py::repr(item.second)) +
                                 " (wrong type, or a negative value for a count)");
        }
    }
    nak_stage_params p = obj.cast<nak_stage_params>();
    p.model_path = model_path;
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
               const py::bytes & key, bool insecure, const py::object & control) {
        nak_server_params sp;
        sp.insecure = insecure;
        if (!control.is_none()) {
            sp.control = [this, control](const std::string & request, nak_stage *& next) {
                return run_control(control, request, next);
            };
        }
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

    // control(request) -> (reply, Stage or None), with the GIL (the event loop's thread). A Stage
    // given back trades its slice with this one's: this object serves it from then on, and the
    // other keeps the old one (alive, so a second swap goes back). An exception is answered as
    // {"ok": false, "error": ...}, never thrown into the event loop.
    std::string run_control(const py::object & control, const std::string & request, nak_stage *& next) {
        py::gil_scoped_acquire gil;
        try {
            py::tuple r = control(request);
            if (r.size() != 2) {
                throw py::value_error("control must return (reply, Stage or None)");
            }
            if (!r[1].is_none()) {
                py_stage & other = r[1].cast<py_stage &>();
                if (&other != this && other.st) {
                    std::swap(st, other.st);
                    next = st.get();
                }
            }
            return r[0].cast<std::string>();
        } catch (py::error_already_set & e) {
            py::dict d;
            d["ok"]    = false;
            d["error"] = std::string("the stage's control handler failed: ") + e.what();
            return py::module_::import("json").attr("dumps")(d).cast<std::string>();
        } catch (const std::exception & e) {
            py::dict d;
            d["ok"]    = false;
            d["error"] = std::string("the stage's control handler failed: ") + e.what();
            return py::module_::import("json").attr("dumps")(d).cast<std::string>();
        }
    }

    std::atomic<bool> stop_flag{ false };
};

// nak_estimate_memory as a dict (bytes; buffers: one dict per llama.cpp buffer type)
py::dict estimate_memory(const std::string & model_path, const py::kwargs & kw) {
    ensure_backend();
    nak_stage_params p = stage_params(model_path, kw);
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

// StageParams: nak_stage_params under Python's names. A default-constructed one holds the
// defaults every layer above derives from (nakshatra.server.serve.ServeOptions, nak serve, python
// -m nakshatra.server.serve, nak up's stage options).
void bind_stage_params(py::module_ & m) {
    using P = nak_stage_params;
    py::class_<P>(m, "StageParams", "A stage's parameters (cpp/stage/stage.h: nak_stage_params); the defaults "
                                     "of a new one are every stage's defaults.")
        .def(py::init<>())
        .def_readwrite("model_path", &P::model_path)
        .def_readwrite("model_sha256", &P::model_sha256, "of the whole model; read from the slice when empty")
        .def_readwrite("n_ctx", &P::n_ctx_session, "KV positions per session")
        .def_readwrite("max_sessions", &P::max_sessions)
        .def_readwrite("n_batch", &P::n_batch)
        .def_readwrite("n_ubatch", &P::n_ubatch)
        .def_readwrite("n_threads", &P::n_threads, "decode threads; 0: hardware concurrency")
        .def_readwrite("n_threads_batch", &P::n_threads_batch, "prefill threads; 0: as n_threads")
        .def_readwrite("n_gpu_layers", &P::n_gpu_layers, "-1: all")
        .def_readwrite("devices", &P::devices, "'' every GPU, 'none' the CPU alone, or names: 'CUDA0,CUDA1'")
        .def_readwrite("flash_attn", &P::flash_attn, "-1 auto, 0 off, 1 on")
        .def_readwrite("cache_type_k", &P::cache_type_k)
        .def_readwrite("cache_type_v", &P::cache_type_v)
        .def_readwrite("idle_timeout_s", &P::idle_timeout_s)
        .def_readwrite("poll", &P::poll, "thread-pool polling 0..100 (llama.cpp --poll)")
        .def_readwrite("cpu_strict", &P::cpu_strict)
        .def_readwrite("cpu_lock", &P::cpu_lock)
        .def_readwrite("self_bench_steps", &P::self_bench_steps)
        .def_readwrite("max_batch", &P::max_batch)
        .def_readwrite("batch_hold_ms", &P::batch_hold_ms)
        .def_readwrite("wire", &P::wire)
        .def_readwrite("batch_log", &P::batch_log)
        .def_readwrite("no_repack", &P::no_repack)
        .def_readwrite("mlock", &P::mlock)
        .def_readwrite("swa_full", &P::swa_full);
}

} // namespace

void bind_stage(py::module_ & m) {
    bind_stage_params(m);

    m.def("estimate_memory", &estimate_memory, py::arg("model_path"),
          "What llama.cpp allocates for a stage serving model_path with these parameters (keyword "
          "arguments: StageParams fields), without allocating it (cpp/stage/memory_estimate.h): a dict of "
          "bytes. Raises TypeError for an unknown parameter, StageError (code 'load') for a missing or "
          "non-GGUF file, bad parameters, or a model llama.cpp cannot load.");

    py::class_<py_stage>(m, "Stage", "One loaded slice and its llama_context (see cpp/stage/stage.h).")
        .def(py::init([](const std::string & model_path, const py::object & on_progress, const py::kwargs & kw) {
                 nak_stage_params p = stage_params(model_path, kw);
                 if (!on_progress.is_none()) {
                     p.on_progress = on_progress.cast<std::function<bool(float)>>();
                 }
                 return std::make_unique<py_stage>(p);
             }),
             py::arg("model_path"), py::kw_only(), py::arg("on_progress") = py::none(),
             "Load model_path (a slice or a whole GGUF); keyword arguments are StageParams fields (their "
             "defaults otherwise). on_progress(fraction) is called while the weights load (0..1, from the "
             "loading thread, with the GIL); returning False cancels the load. Raises TypeError for an "
             "unknown parameter, StageError (code 'load') when the slice cannot be loaded or the load was cancelled.")
        .def("serve", &py_stage::serve, py::arg("host"), py::arg("port"), py::arg("on_ready"),
             py::arg("max_payload") = NAK_MAX_PAYLOAD_DEFAULT, py::arg("key") = py::bytes(), py::arg("insecure") = false,
             py::arg("control") = py::none(),
             "Run the event loop until SIGINT/SIGTERM raises or stop() is called; on_ready(port) once listening. "
             "Without a key the stage forwards only to loopback addresses unless insecure. control(request_json) "
             "-> (reply_json, Stage or None) answers CONTROL frames (model swaps, nakshatra.server.swap); a Stage "
             "returned trades slices with this one, which serves the new slice from then on.")
        .def("stop", [](py_stage & s) { s.stop_flag = true; })
        .def_property_readonly("layer_start", [](const py_stage & s) { return s.st->layer_start(); })
        .def_property_readonly("layer_end", [](const py_stage & s) { return s.st->layer_end(); })
        .def_property_readonly("n_embd", [](const py_stage & s) { return s.st->n_embd(); })
        .def_property_readonly("is_first", [](const py_stage & s) { return s.st->is_first(); })
        .def_property_readonly("is_last", [](const py_stage & s) { return s.st->is_last(); })
        .def("info", [](const py_stage & s) { return hello_dict(s.st->info()); },
             "What this stage answers to HELLO (layer range, model, health).");
}
