// GGML Q4_0 (blocks32.wgsl is prepended): the 16 quant bytes of a block in 4 words (element
// j < 16 of a block is the low nibble of byte j, element j ≥ 16 the high nibble of byte j - 16,
// as in GGML). Value = (q - 8) · d.
alias WeightWord = u32;
const QUANT_WORDS: u32 = 4u;

// The word holding elements c .. c + 3 (c a multiple of 4), shifted to their nibbles.
fn q4_0_word(row: Row32, c: u32) -> u32 {
    let j = c & 31u;
    return w[row.first + 4u * (c >> 5u) + ((j & 15u) >> 2u)] >> ((j >> 4u) * 4u);
}

fn w_at(r: u32, c: u32) -> f32 {
    let row = row32(r);
    let q = (q4_0_word(row, c & ~3u) >> ((c & 3u) * 8u)) & 15u;
    return (f32(q) - 8.0) * scale32(row, c);
}

// Elements c .. c + 3 of row r (c a multiple of 4): four nibbles of one word, one scale.
fn w4_at(r: u32, c: u32) -> vec4<f32> {
    let row = row32(r);
    let word = q4_0_word(row, c);
    let q = vec4<f32>(f32(word & 15u), f32((word >> 8u) & 15u), f32((word >> 16u) & 15u), f32((word >> 24u) & 15u));
    return (q - 8.0) * scale32(row, c);
}
