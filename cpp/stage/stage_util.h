// What the stage's source files share beyond the class (stage.h): how a handler refuses a request,
// and a token's text. Not part of the stage's interface: included by cpp/stage/*.cpp only.
#pragma once

#include "llama.h"

#include <cstdint>
#include <string>

// A request refused: thrown by a handler, answered to the sender as an ERROR frame with this code
// (NAK_ERR_*) and message (nak_stage::handle; a decode step's by nak_stage::reject_step).
struct nak_reject {
    uint16_t    code;
    std::string message;
};

// the text of a sampled token as FORWARD_OK carries it: llama.cpp's piece, special tokens giving
// none (empty as well past 256 bytes)
std::string nak_token_piece(const llama_vocab * vocab, llama_token tok);
