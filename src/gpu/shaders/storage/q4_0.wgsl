// GGML Q4_0 repacked for 4-byte loads: the 16 quant bytes of every block of 32 first (block b at
// bytes 16·b ..; element j < 16 is the low nibble of byte j, element j ≥ 16 the high nibble of
// byte j - 16, as in GGML), then one f16 scale per block (scale b in half b % 2 of word
// 4·blocks + b / 2). Rows have kp = k rounded up to 32 values. Value = (q - 8) · d.
alias WeightWord = u32;

fn w_at(r: u32, c: u32) -> f32 {
    let nb = (p.k + 31u) >> 5u;
    let b = r * nb + (c >> 5u);
    let j = c & 31u;
    let byte = b * 16u + (j & 15u);
    let q = extractBits(w[byte >> 2u], (byte & 3u) * 8u + (j >> 4u) * 4u, 4u);
    let pair = unpack2x16float(w[p.n * nb * 4u + (b >> 1u)]);
    return (f32(q) - 8.0) * select(pair.x, pair.y, (b & 1u) == 1u);
}

// Elements c .. c + 3 of row r (c a multiple of 4): four nibbles of one word, one scale.
fn w4_at(r: u32, c: u32) -> vec4<f32> {
    let nb = (p.k + 31u) >> 5u;
    let b = r * nb + (c >> 5u);
    let j = c & 31u;
    let word = w[(b * 16u + (j & 15u)) >> 2u] >> ((j >> 4u) * 4u);
    let q = vec4<f32>(
        f32(word & 15u),
        f32((word >> 8u) & 15u),
        f32((word >> 16u) & 15u),
        f32((word >> 24u) & 15u),
    );
    let pair = unpack2x16float(w[p.n * nb * 4u + (b >> 1u)]);
    return (q - 8.0) * select(pair.x, pair.y, (b & 1u) == 1u);
}
