// GGML Q4_K blocks as they are (144 bytes = 36 words per 256 values): word 0 holds d and dmin
// (f16), words 1-3 the twelve 6-bit scale/min bytes, words 4-35 the 128 quant bytes. Values
// 64·g + l of a block (g < 4, l < 64) are the low (l < 32) or high (l ≥ 32) nibble of quant
// byte 32·g + l % 32, with sub-block scale index 2·g + (l ≥ 32). Value = d·sc·q - dmin·m, as
// GGML computes it.
alias WeightWord = u32;

fn q4k_byte(base: u32, i: u32) -> u32 {
    return extractBits(w[base + (i >> 2u)], (i & 3u) * 8u, 8u);
}

fn w_at(r: u32, c: u32) -> f32 {
    let nb = (p.k + 255u) >> 8u;
    let base = (r * nb + (c >> 8u)) * 36u;
    let j = c & 255u;
    let g = j >> 6u;
    let high = (j & 63u) >= 32u;
    let is = 2u * g + select(0u, 1u, high);
    var sc: u32;
    var m: u32;
    if (is < 4u) {
        sc = q4k_byte(base + 1u, is) & 63u;
        m = q4k_byte(base + 1u, is + 4u) & 63u;
    } else {
        sc = (q4k_byte(base + 1u, is + 4u) & 15u) | ((q4k_byte(base + 1u, is - 4u) >> 6u) << 4u);
        m = (q4k_byte(base + 1u, is + 4u) >> 4u) | ((q4k_byte(base + 1u, is) >> 6u) << 4u);
    }
    let qb = q4k_byte(base + 4u, 32u * g + (j & 31u));
    let q = select(qb & 15u, qb >> 4u, high);
    let dm = unpack2x16float(w[base]);
    return (dm.x * f32(sc)) * f32(q) - dm.y * f32(m);
}
