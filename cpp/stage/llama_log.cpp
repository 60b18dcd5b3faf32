#include "llama_log.h"

#include "llama.h"

#include <atomic>
#include <cstdio>
#include <cstring>

namespace {

std::atomic<int> g_log_level{ GGML_LOG_LEVEL_WARN };

// per thread: a load runs on the caller's thread, so its lines never mix with another load's
thread_local std::string       t_errors;
thread_local bool              t_last_error   = false; // whether the previous line was an error
thread_local bool              t_last_shown   = false;
thread_local nak_log_capture * t_capture      = nullptr;

void capture_line(ggml_log_level level, const char * text) {
    auto & lines = t_capture->lines;
    // CONT continues the previous line; a line that ended with a newline is complete
    if (level == GGML_LOG_LEVEL_CONT && !lines.empty()) {
        lines.back().second += text;
    } else {
        lines.emplace_back((int) level, text);
    }
    std::string & last = lines.back().second;
    while (!last.empty() && last.back() == '\n') {
        last.pop_back();
    }
}

void log_callback(ggml_log_level level, const char * text, void *) {
    if (t_capture) {
        capture_line(level, text);
    }
    const bool is_error = level == GGML_LOG_LEVEL_CONT ? t_last_error : level == GGML_LOG_LEVEL_ERROR;
    t_last_error = is_error;
    if (is_error && t_errors.size() < 16384) {
        t_errors += text;
    }
    // CONT continues the previous line: keep it when that line was shown. A capture is quiet:
    // its caller reads the lines (probe loads expect errors)
    const bool show = !t_capture && (level == GGML_LOG_LEVEL_CONT ? t_last_shown : (int) level >= g_log_level.load());
    t_last_shown = show;
    if (show) {
        fputs(text, stderr);
    }
}

} // namespace

void nak_log_install() {
    llama_log_set(log_callback, nullptr);
}

void nak_log_set_level(int level) {
    g_log_level = level;
}

void nak_log_clear_errors() {
    t_errors.clear();
    t_last_error = false;
}

std::string nak_log_load_error() {
    static const char * marker = "error loading model: ";
    std::string line;
    const size_t at = t_errors.find(marker);
    if (at != std::string::npos) {
        line = t_errors.substr(at + strlen(marker));
    } else {
        line = t_errors;
    }
    line = line.substr(0, line.find('\n'));
    return line;
}

std::string nak_log_explain(const std::string & err) {
    const std::string why = nak_log_load_error();
    return why.empty() ? err : err + ": " + why;
}

nak_log_capture::nak_log_capture() {
    t_capture = this;
}

nak_log_capture::~nak_log_capture() {
    t_capture = nullptr;
}
