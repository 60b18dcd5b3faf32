// The module's functions that belong to no class: what was built, llama.cpp's log level, and the
// address and authentication helpers the Python side checks with.
#include "bindings.h"

#include "auth.h"
#include "llama_log.h"
#include "net.h"
#include "stage.h" // NAK_BACKEND_NAME

#include "ggml-backend.h"
#include "llama.h"

#include <pybind11/stl.h>

#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#ifndef NAK_LLAMA_COMMIT
#define NAK_LLAMA_COMMIT "unknown"
#endif
#ifndef NAK_PATCHES
#define NAK_PATCHES ""
#endif
#ifndef NAK_PATCH_HASH
#define NAK_PATCH_HASH "unknown"
#endif

namespace {

py::dict build_info() {
    ensure_backend();
    py::dict d;
    d["backend"]          = NAK_BACKEND_NAME;
    d["llama_commit"]     = NAK_LLAMA_COMMIT;
    d["patch_hash"]       = NAK_PATCH_HASH;
    d["patches"]          = std::string(NAK_PATCHES);
    d["protocol_version"] = NAK_PROTO_VERSION;
    py::list regs;
    for (size_t i = 0; i < ggml_backend_reg_count(); i++) {
        regs.append(ggml_backend_reg_name(ggml_backend_reg_get(i)));
    }
    d["ggml_backends"] = regs;
    // the GPUs (and other accelerators) this build sees now: none on a GPU build without a GPU
    py::list devs;
    for (size_t i = 0; i < ggml_backend_dev_count(); i++) {
        ggml_backend_dev_t dev = ggml_backend_dev_get(i);
        if (ggml_backend_dev_type(dev) != GGML_BACKEND_DEVICE_TYPE_CPU) {
            size_t free = 0, total = 0;
            ggml_backend_dev_memory(dev, &free, &total);
            py::dict e;
            e["name"]        = ggml_backend_dev_name(dev);
            e["description"] = ggml_backend_dev_description(dev);
            e["memory_bytes"] = total;
            e["free_bytes"]   = free; // now: a model swap checks a new slice's GPU buffers against it
            devs.append(e);
        }
    }
    d["devices"] = devs;
    d["system_info"]   = llama_print_system_info();
    return d;
}

// Load path's metadata and tensor list as llama.cpp would, allocating nothing, and report what the
// loader asked for: llama.cpp logs each tensor it creates ("loading tensor X", at DEBUG level,
// required or optional) before checking it, and throws at the first one that is missing or has
// the wrong shape. Returns (why the load failed, or "" when it succeeded; tensor names in order).
std::pair<std::string, std::vector<std::string>> probe_load(const std::string & path) {
    ensure_backend();
    llama_model_params mp = llama_model_default_params();
    mp.no_alloc     = true;
    mp.load_mode    = LLAMA_LOAD_MODE_NONE; // nothing is read, so nothing is mapped
    mp.n_gpu_layers = 0;
    std::string err;
    std::vector<std::string> asked;
    {
        py::gil_scoped_release nogil;
        nak_log_capture capture;
        nak_log_clear_errors();
        llama_model * model = llama_model_load_from_file(path.c_str(), mp);
        if (model) {
            llama_model_free(model);
        } else {
            err = nak_log_load_error();
            if (err.empty()) {
                err = "llama.cpp could not load " + path;
            }
        }
        static const char * marker = "loading tensor ";
        for (const auto & [level, text] : capture.lines) {
            const size_t at = text.find(marker);
            if (level == GGML_LOG_LEVEL_DEBUG && at != std::string::npos) {
                asked.push_back(text.substr(at + strlen(marker)));
            }
        }
    }
    return { err, asked };
}

} // namespace

void bind_misc(py::module_ & m) {
    m.def("build_info", &build_info, "Compiled backend, llama.cpp commit, patch-set hash, protocol version, and\n"
          "devices: the GPUs this build sees now (name, description, memory_bytes, free_bytes), [] for none.");
    m.def("set_log_level", [](int level) { set_log_level(level); },
          "llama.cpp log threshold: 1 debug, 2 info, 3 warn (default), 4 error.");
    m.def("probe_load", &probe_load, py::arg("path"),
          "Load a GGUF's metadata and tensor list as llama.cpp would, allocating and reading no tensor data.\n"
          "Returns (error, tensors): llama.cpp's reason for refusing the file ('' when it loads) and the names\n"
          "of the tensors its loader asked for, in order, required or optional (the missing or misshapen one\n"
          "that stopped it last). Used to derive the tensors a synthetic model must hold.");
    m.def("is_loopback", &nak_is_loopback, "Whether a host name or address is loopback.");
    m.def("hmac_sha256", [](const py::bytes & key, const py::bytes & data) {
              const std::string k = key, d = data;
              uint8_t out[32];
              nak_hmac_sha256((const uint8_t *) k.data(), k.size(), (const uint8_t *) d.data(), d.size(), out);
              return py::bytes((const char *) out, 32);
          }, py::arg("key"), py::arg("data"), "HMAC-SHA256 as the handshake computes it (tests).");
}
