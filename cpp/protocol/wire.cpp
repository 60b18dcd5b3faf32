#include "wire.h"

#include "protocol.h"

#include <cmath>
#include <cstring>

size_t nak_wire_row_bytes(uint8_t dtype, uint32_t n_embd) {
    switch (dtype) {
        case NAK_DTYPE_F32:  return (size_t) n_embd * 4;
        case NAK_DTYPE_BF16: return (size_t) n_embd * 2;
        case NAK_DTYPE_Q8R:  return 4 + (size_t) n_embd;
        default:             return 0;
    }
}

// f32 -> bf16, round to nearest even; a NaN stays a (quiet) NaN
static uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        return (uint16_t) ((u >> 16) | 0x40);
    }
    u += 0x7fffu + ((u >> 16) & 1);
    return (uint16_t) (u >> 16);
}

static float bf16_to_f32(uint16_t h) {
    const uint32_t u = (uint32_t) h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

void nak_wire_encode(uint8_t dtype, const float * src, uint32_t n_rows, uint32_t n_embd, std::vector<uint8_t> & out) {
    const size_t row_bytes = nak_wire_row_bytes(dtype, n_embd);
    const size_t base = out.size();
    out.resize(base + row_bytes * n_rows);
    uint8_t * dst = out.data() + base;
    if (dtype == NAK_DTYPE_F32) {
        memcpy(dst, src, row_bytes * n_rows);
        return;
    }
    for (uint32_t r = 0; r < n_rows; r++, src += n_embd, dst += row_bytes) {
        if (dtype == NAK_DTYPE_BF16) {
            for (uint32_t i = 0; i < n_embd; i++) {
                const uint16_t h = f32_to_bf16(src[i]);
                memcpy(dst + 2 * i, &h, 2);
            }
            continue;
        }
        float amax = 0.0f;
        for (uint32_t i = 0; i < n_embd; i++) {
            amax = std::fmax(amax, std::fabs(src[i]));
        }
        const float scale = amax / 127.0f;
        const float inv   = scale > 0.0f ? 1.0f / scale : 0.0f;
        memcpy(dst, &scale, 4);
        for (uint32_t i = 0; i < n_embd; i++) {
            dst[4 + i] = (uint8_t) (int8_t) std::lrintf(src[i] * inv);
        }
    }
}

void nak_wire_decode(uint8_t dtype, const uint8_t * src, uint32_t n_rows, uint32_t n_embd, float * dst) {
    const size_t row_bytes = nak_wire_row_bytes(dtype, n_embd);
    if (dtype == NAK_DTYPE_F32) {
        memcpy(dst, src, row_bytes * n_rows);
        return;
    }
    for (uint32_t r = 0; r < n_rows; r++, src += row_bytes, dst += n_embd) {
        if (dtype == NAK_DTYPE_BF16) {
            for (uint32_t i = 0; i < n_embd; i++) {
                uint16_t h;
                memcpy(&h, src + 2 * i, 2);
                dst[i] = bf16_to_f32(h);
            }
            continue;
        }
        float scale;
        memcpy(&scale, src, 4);
        for (uint32_t i = 0; i < n_embd; i++) {
            dst[i] = scale * (float) (int8_t) src[4 + i];
        }
    }
}

bool nak_wire_parse(const std::string & name, uint8_t & dtype) {
    if (name == "f32") {
        dtype = NAK_DTYPE_F32;
    } else if (name == "bf16") {
        dtype = NAK_DTYPE_BF16;
    } else if (name == "q8r" || name == "q8") {
        dtype = NAK_DTYPE_Q8R;
    } else {
        return false;
    }
    return true;
}

const char * nak_wire_name(uint8_t dtype) {
    switch (dtype) {
        case NAK_DTYPE_F32:  return "f32";
        case NAK_DTYPE_BF16: return "bf16";
        case NAK_DTYPE_Q8R:  return "q8r";
        default:             return "none";
    }
}
