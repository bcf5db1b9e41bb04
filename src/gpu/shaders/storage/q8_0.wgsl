// GGML Q8_0, row after row: a row of k values (nb = ⌈k / 32⌉ blocks, the padding zero) is its
// 32·nb int8 quants (element c is byte c % 4 of word c / 4), then the nb f16 scales two per word
// (block b in half b % 2 of word 8·nb + b / 2). Value = q · d, exactly GGML's dequantization.
alias WeightWord = u32;

// First word of row r, and the row's blocks.
fn q8_row(r: u32) -> vec2<u32> {
    let nb = (p.k + 31u) >> 5u;
    return vec2<u32>(r * (8u * nb + ((nb + 1u) >> 1u)), nb);
}

fn q8_scale(row: vec2<u32>, c: u32) -> f32 {
    let b = c >> 5u;
    let pair = unpack2x16float(w[row.x + 8u * row.y + (b >> 1u)]);
    return select(pair.x, pair.y, (b & 1u) == 1u);
}

fn w_at(r: u32, c: u32) -> f32 {
    let row = q8_row(r);
    let q = extractBits(bitcast<i32>(w[row.x + (c >> 2u)]), (c & 3u) * 8u, 8u);
    return f32(q) * q8_scale(row, c);
}

// Elements c .. c + 3 of row r (c a multiple of 4): one quant word, one scale.
fn w4_at(r: u32, c: u32) -> vec4<f32> {
    let row = q8_row(r);
    let word = bitcast<i32>(w[row.x + (c >> 2u)]);
    let q = vec4<f32>(
        f32(extractBits(word, 0u, 8u)),
        f32(extractBits(word, 8u, 8u)),
        f32(extractBits(word, 16u, 8u)),
        f32(extractBits(word, 24u, 8u)),
    );
    return q * q8_scale(row, c);
}
