// nakshatra._nakshatra: the stage (executor + event loop), the protocol client, and the reference
// runner, bound for Python. Every call that computes or waits on the network releases the GIL.
// One file per concept (bind_*.cpp, declared in bindings.h); this one makes the module.
#include "bindings.h"

#include "stage.h" // NAK_STAGE_DRAFT_MAX

PYBIND11_MODULE(_nakshatra, m) {
    m.doc() = "Nakshatra core: stage executor and event loop, protocol client, reference runner";

    m.attr("PROTOCOL_VERSION") = NAK_PROTO_VERSION;
    m.attr("STAGE_DRAFT_MAX") = NAK_STAGE_DRAFT_MAX; // most draft tokens a stage verifies per window
    m.attr("HEADER_SIZE")      = NAK_HEADER_SIZE;
    m.attr("MAX_PAYLOAD")      = NAK_MAX_PAYLOAD_DEFAULT;

    bind_misc(m);
    bind_stage(m);
    bind_client(m);
    bind_reference(m);
}
