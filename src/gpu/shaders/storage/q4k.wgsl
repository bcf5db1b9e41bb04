// GGML Q4_K with the 6-bit scales unpacked (148 bytes = 37 words per 256 values, 2.8% more than
// GGML's 144): word 0 holds d and dmin (f16); words 1-4 the eight sub-blocks' scale and min,
// one byte each (sub-block s: byte 2·s = sc, byte 2·s + 1 = m); words 5-36 GGML's 128 quant
// bytes. Values 64·g + l of a block (g < 4, l < 64) are the low (l < 32) or high (l ≥ 32)
// nibble of quant byte 32·g + l % 32, in sub-block 2·g + (l ≥ 32). Value = (d·sc)·q - dmin·m,
// as GGML computes it.
alias WeightWord = u32;

// Where element c of row r lives: its block's first word, and its sub-block's d·sc and dmin·m.
struct Q4kScale {
    base: u32,
    d: f32,
    m: f32,
}

fn q4k_scale(r: u32, c: u32) -> Q4kScale {
    let nb = (p.k + 255u) >> 8u;
    let base = (r * nb + (c >> 8u)) * 37u;
    let sub = (c & 255u) >> 5u;
    let scale_min = w[base + 1u + (sub >> 1u)] >> ((sub & 1u) * 16u);
    let dm = unpack2x16float(w[base]);
    return Q4kScale(base, dm.x * f32(scale_min & 255u), dm.y * f32((scale_min >> 8u) & 255u));
}

// The quant word holding element c (c a multiple of 4 for four elements), nibble-shifted.
fn q4k_word(base: u32, c: u32) -> u32 {
    let j = c & 255u;
    let word = w[base + 5u + ((32u * (j >> 6u) + (j & 31u)) >> 2u)];
    return select(word, word >> 4u, (j & 63u) >= 32u);
}

fn w_at(r: u32, c: u32) -> f32 {
    let s = q4k_scale(r, c);
    let q = (q4k_word(s.base, c & ~3u) >> ((c & 3u) * 8u)) & 15u;
    return s.d * f32(q) - s.m;
}

// Elements c .. c + 3 of row r (c a multiple of 4): one quant word, one scale word.
fn w4_at(r: u32, c: u32) -> vec4<f32> {
    let s = q4k_scale(r, c);
    let word = q4k_word(s.base, c);
    let q = vec4<f32>(f32(word & 15u), f32((word >> 8u) & 15u), f32((word >> 16u) & 15u), f32((word >> 24u) & 15u));
    return s.d * q - s.m;
}
