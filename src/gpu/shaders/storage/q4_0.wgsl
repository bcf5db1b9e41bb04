// GGML Q4_0, row after row: a row of k values (nb = ⌈k / 32⌉ blocks, the padding zero) is the 16
// quant bytes of each block (element j < 16 of a block is the low nibble of its byte j, element
// j ≥ 16 the high nibble of byte j - 16, as in GGML), then the nb f16 scales two per word (block
// b in half b % 2 of word 4·nb + b / 2). Value = (q - 8) · d.
alias WeightWord = u32;

// First word of row r, and the row's blocks.
fn q4_0_row(r: u32) -> vec2<u32> {
    let nb = (p.k + 31u) >> 5u;
    return vec2<u32>(r * (4u * nb + ((nb + 1u) >> 1u)), nb);
}

// The word holding elements c .. c + 3 (c a multiple of 4), shifted to their nibbles.
fn q4_0_word(row: vec2<u32>, c: u32) -> u32 {
    let j = c & 31u;
    return w[row.x + 4u * (c >> 5u) + ((j & 15u) >> 2u)] >> ((j >> 4u) * 4u);
}

fn q4_0_scale(row: vec2<u32>, c: u32) -> f32 {
    let b = c >> 5u;
    let pair = unpack2x16float(w[row.x + 4u * row.y + (b >> 1u)]);
    return select(pair.x, pair.y, (b & 1u) == 1u);
}

fn w_at(r: u32, c: u32) -> f32 {
    let row = q4_0_row(r);
    let q = (q4_0_word(row, c & ~3u) >> ((c & 3u) * 8u)) & 15u;
    return (f32(q) - 8.0) * q4_0_scale(row, c);
}

// Elements c .. c + 3 of row r (c a multiple of 4): four nibbles of one word, one scale.
fn w4_at(r: u32, c: u32) -> vec4<f32> {
    let row = q4_0_row(r);
    let word = q4_0_word(row, c);
    let q = vec4<f32>(f32(word & 15u), f32((word >> 8u) & 15u), f32((word >> 16u) & 15u), f32((word >> 24u) & 15u));
    return (q - 8.0) * q4_0_scale(row, c);
}
