// The module's functions that belong to no class: what was built, llama.cpp's log level, and the
// address and authentication helpers the Python side checks with.
#include "bindings.h"

#include "auth.h"
#include "net.h"
#include "stage.h" // NAK_BACKEND_NAME

#include "ggml-backend.h"
#include "llama.h"

#include <cstdint>

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
    d["system_info"]   = llama_print_system_info();
    return d;
}

} // namespace

void bind_misc(py::module_ & m) {
    m.def("build_info", &build_info, "Compiled backend, llama.cpp commit, patch-set hash, protocol version.");
    m.def("set_log_level", [](int level) { set_log_level(level); },
          "llama.cpp log threshold: 1 debug, 2 info, 3 warn (default), 4 error.");
    m.def("is_loopback", &nak_is_loopback, "Whether a host name or address is loopback.");
    m.def("hmac_sha256", [](const py::bytes & key, const py::bytes & data) {
              const std::string k = key, d = data;
              uint8_t out[32];
              nak_hmac_sha256((const uint8_t *) k.data(), k.size(), (const uint8_t *) d.data(), d.size(), out);
              return py::bytes((const char *) out, 32);
          }, py::arg("key"), py::arg("data"), "HMAC-SHA256 as the handshake computes it (tests).");
}
