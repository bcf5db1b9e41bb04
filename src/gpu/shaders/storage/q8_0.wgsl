// GGML Q8_0 repacked for 4-byte loads: rows of kp = k rounded up to 32 (the padding holds zero
// blocks), all int8 quants of the chunk first (element r·kp + c is byte (r·kp + c) % 4 of word
// (r·kp + c) / 4), then one f16 scale per block of 32 (scale s in half s % 2 of word
// n·kp / 4 + s / 2). Value = q · d, exactly GGML's dequantization.
alias WeightWord = u32;

fn w_at(r: u32, c: u32) -> f32 {
    let kp = (p.k + 31u) & ~31u;
    let i = r * kp + c;
    let q = f32(extractBits(bitcast<i32>(w[i >> 2u]), (i & 3u) * 8u, 8u));
    let s = i >> 5u;
    let pair = unpack2x16float(w[p.n * kp / 4u + (s >> 1u)]);
    return q * select(pair.x, pair.y, (s & 1u) == 1u);
}

// Elements c .. c + 3 of row r (c a multiple of 4): one quant word, one scale.
fn w4_at(r: u32, c: u32) -> vec4<f32> {
    let kp = (p.k + 31u) & ~31u;
    let i = r * kp + c;
    let word = bitcast<i32>(w[i >> 2u]);
    let q = vec4<f32>(
        f32(extractBits(word, 0u, 8u)),
        f32(extractBits(word, 8u, 8u)),
        f32(extractBits(word, 16u, 8u)),
        f32(extractBits(word, 24u, 8u)),
    );
    let s = i >> 5u;
    let pair = unpack2x16float(w[p.n * kp / 4u + (s >> 1u)]);
    return q * select(pair.x, pair.y, (s & 1u) == 1u);
}
