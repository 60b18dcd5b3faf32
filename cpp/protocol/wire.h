// Hidden-state wire formats: how [n_rows, n_embd] float32 rows travel between stages.
//
//   f32  (NAK_DTYPE_F32)  4 bytes per value, exact: the default.
//   bf16 (NAK_DTYPE_BF16) 2 bytes per value: f32 with the low 16 mantissa bits rounded away
//                         (round to nearest even). Keeps f32's exponent range: hidden states reach
//                         ~25,000 even on a 135M model, past f16's 65,504 on larger ones.
//   q8r  (NAK_DTYPE_Q8R)  per row: | scale f32 | int8[n_embd] |, value = scale * q,
//                         scale = max|x| / 127 (one scale per row), q = round(x / scale).
//
// Encoding is lossy for bf16 and q8r; `nak bench --wire` measures what that costs (greedy
// agreement and the largest difference of the states).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

// bytes of one row of n_embd values in dtype; 0 for a dtype that carries no hidden state
size_t nak_wire_row_bytes(uint8_t dtype, uint32_t n_embd);

// append n_rows rows of n_embd floats to out in dtype
void nak_wire_encode(uint8_t dtype, const float * src, uint32_t n_rows, uint32_t n_embd, std::vector<uint8_t> & out);

// n_rows rows in dtype (nak_wire_row_bytes(dtype) each) to floats
void nak_wire_decode(uint8_t dtype, const uint8_t * src, uint32_t n_rows, uint32_t n_embd, float * dst);

// NAK_DTYPE_* from a name (f32, bf16, q8r); false if unknown
bool nak_wire_parse(const std::string & name, uint8_t & dtype);
const char * nak_wire_name(uint8_t dtype);
