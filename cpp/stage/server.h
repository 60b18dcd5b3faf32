// The stage's event loop: one thread, non-blocking sockets, poll(). Frames are cut as they
// arrive and queued; the scheduler hands the compute thread one request, or at the first stage
// the steps of several sessions as one batch, per llama_decode. An idle stage sleeps in poll().
#pragma once

#include "stage.h"

#include <functional>
#include <string>
#include <vector>

// The handler of CONTROL frames (the in-place model swap; python/nakshatra/server/swap.py):
// takes the request's JSON, returns the reply's JSON. It may set `next` to the stage to serve
// from then on; the caller keeps both stages alive. Runs on the event loop's thread while no
// request computes, so it must return quickly (a load runs on a thread of its own).
using nak_control_fn = std::function<std::string(const std::string & request, nak_stage *& next)>;

struct nak_server_params {
    std::string host = "127.0.0.1";
    int         port = 7071;            // 0: any free port (reported to on_ready)
    uint32_t    max_payload = NAK_MAX_PAYLOAD_DEFAULT;
    int         max_conns = 256;
    int         handshake_timeout_ms = 10000; // a connection must say HELLO within this time
    int         conn_idle_timeout_s  = 3600;  // a connection silent for longer is closed
    std::vector<uint8_t> key;                 // cluster key (auth.h): empty = no authentication
    bool        insecure = false;             // without a key, forward to non-loopback addresses too
    nak_control_fn control;                   // CONTROL frames; empty: refused (bad_request)
};

// Serve until should_stop() returns true (checked about every 50 ms). on_ready(port) is called
// once the socket listens. Returns false with err set when the socket cannot be opened. After a
// swap (params.control) the loop serves the stage the handler named, not `stage`.
bool nak_serve(nak_stage & stage, const nak_server_params & params,
               const std::function<bool()> & should_stop,
               const std::function<void(int)> & on_ready, std::string & err);
