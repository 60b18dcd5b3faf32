// llama.cpp's log, routed through one callback: lines below a threshold are dropped, and the
// error lines of the current thread are kept, so a failed load can say why llama.cpp refused the
// file (llama_model_load_from_file only returns null; its reason is a log line).
#pragma once

#include "ggml.h"

#include <string>
#include <vector>

// install the callback (llama_log_set); call once, before llama_backend_init
void nak_log_install();
// the ggml_log_level below which lines are not printed (default GGML_LOG_LEVEL_WARN)
void nak_log_set_level(int level);

// forget this thread's error lines; call before a load whose failure should be explained
void nak_log_clear_errors();
// why the last load on this thread failed, from llama.cpp's error lines since the last clear:
// the text after "error loading model: " when present, else the first error line ("" if none)
std::string nak_log_load_error();
// err + ": " + nak_log_load_error(), or err when llama.cpp logged no reason
std::string nak_log_explain(const std::string & err);

// every line (any level) this thread logs while a capture is active; none of them is printed
struct nak_log_capture {
    std::vector<std::pair<int, std::string>> lines; // (ggml_log_level, text without the newline)

    nak_log_capture();
    ~nak_log_capture();
    nak_log_capture(const nak_log_capture &)             = delete;
    nak_log_capture & operator=(const nak_log_capture &) = delete;
};
