// The helpers every binding shares: llama.cpp's backend and log, StageError, HELLO_OK as a dict.
#include "bindings.h"

#include "llama.h"
#include "llama_log.h"

void set_log_level(int level) {
    nak_log_set_level(level);
}

void ensure_backend() {
    static bool done = false;
    if (!done) {
        nak_log_install();
        llama_backend_init();
        done = true;
    }
}

[[noreturn]] void raise_stage_error(const std::string & msg, const std::string & code) {
    py::object cls = py::module_::import("nakshatra.errors").attr("StageError");
    py::object exc = cls(msg, code);
    PyErr_SetObject(cls.ptr(), exc.ptr());
    throw py::error_already_set();
}

// HELLO_OK as a Python dict (health counters under "health")
py::dict hello_dict(const nak_hello_ok & ok) {
    py::dict d;
    d["version"]      = ok.version;
    d["caps"]         = ok.caps;
    d["model_sha256"] = ok.model_sha256;
    d["arch"]         = ok.arch;
    d["layer_start"]  = ok.layer_start;
    d["layer_end"]    = ok.layer_end;
    d["n_layer_full"] = ok.n_layer_full;
    d["n_embd"]       = ok.n_embd;
    d["n_vocab"]      = ok.n_vocab;
    d["backend"]      = ok.backend;
    py::dict hd;
    hd["sessions_active"] = ok.health.sessions_active;
    hd["max_sessions"]    = ok.health.max_sessions;
    hd["queue_depth"]     = ok.health.queue_depth;
    hd["n_ctx_session"]   = ok.health.n_ctx_session;
    hd["kv_tokens_used"]  = ok.health.kv_tokens_used;
    hd["rss_bytes"]       = ok.health.rss_bytes;
    hd["uptime_ms"]       = ok.health.uptime_ms;
    hd["tokens_in"]       = ok.health.tokens_in;
    hd["cpu_ms"]          = ok.health.cpu_ms;
    hd["mem_available_bytes"] = ok.health.mem_available_bytes;
    hd["layers_per_s"]    = ok.health.layers_per_s;
    hd["busy_ms"]         = ok.health.busy_ms;
    hd["stalled_ms"]      = ok.health.stalled_ms;
    hd["progress"]        = ok.health.progress;
    hd["rss_anon_bytes"]  = ok.health.rss_anon_bytes;
    hd["rss_file_bytes"]  = ok.health.rss_file_bytes;
    d["health"] = hd;
    d["rss_bytes"] = ok.health.rss_bytes;
    return d;
}
