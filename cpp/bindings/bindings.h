// What the binding files of nakshatra._nakshatra share: one bind_* function per concept, called
// by module.cpp, and the helpers every binding needs (util.cpp).
#pragma once

#include "protocol.h"

#include <pybind11/pybind11.h>

#include <string>

namespace py = pybind11;

// build_info, set_log_level, is_loopback, hmac_sha256 (bind_misc.cpp)
void bind_misc(py::module_ & m);
// Stage and estimate_memory (bind_stage.cpp)
void bind_stage(py::module_ & m);
// StageClient and wait_forward_ok (bind_client.cpp)
void bind_client(py::module_ & m);
// Reference (bind_reference.cpp)
void bind_reference(py::module_ & m);

// llama.cpp's backends loaded and its log routed through set_log_level's threshold, once
void ensure_backend();
// the threshold below which llama.cpp's log lines are dropped (a ggml_log_level)
void set_log_level(int level);
// raise nakshatra.errors.StageError(msg, code)
[[noreturn]] void raise_stage_error(const std::string & msg, const std::string & code);
// HELLO_OK as a Python dict (health counters under "health")
py::dict hello_dict(const nak_hello_ok & ok);
