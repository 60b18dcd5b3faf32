// The three logging symbols llama.cpp's n-gram drafters (common/ngram-map.cpp) call. common/log.cpp
// would bring llama.cpp's whole common library (json, a logger thread); the drafters only log at
// debug level, which a stage does not show, so the threshold keeps them silent and anything above
// it goes to stderr.
#include "log.h"

#include <cstdarg>
#include <cstdio>

int common_log_get_verbosity_thold(void) {
    return LOG_LEVEL_ERROR;
}

struct common_log * common_log_main() {
    return nullptr;
}

void common_log_add(struct common_log * /*log*/, enum ggml_log_level /*level*/, const char * fmt, ...) {
    va_list args;
    va_start(args, fmt);
    vfprintf(stderr, fmt, args);
    va_end(args);
}
