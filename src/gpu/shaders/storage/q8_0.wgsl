// GGML Q8_0 (blocks32.wgsl is prepended): the 32 int8 quants of a block in 8 words (element j of
// the block is byte j % 4 of word j / 4). Value = q · d, exactly GGML's dequantization.
alias WeightWord = u32;
const QUANT_WORDS: u32 = 8u;

fn w_at(r: u32, c: u32) -> f32 {
    let row = row32(r);
    let q = extractBits(bitcast<i32>(w[row.first + (c >> 2u)]), (c & 3u) * 8u, 8u);
    return f32(q) * scale32(row, c);
}

// Elements c .. c + 3 of row r (c a multiple of 4): one quant word, one scale.
fn w4_at(r: u32, c: u32) -> vec4<f32> {
    let row = row32(r);
    let word = bitcast<i32>(w[row.first + (c >> 2u)]);
    let q = vec4<f32>(
        f32(extractBits(word, 0u, 8u)),
        f32(extractBits(word, 8u, 8u)),
        f32(extractBits(word, 16u, 8u)),
        f32(extractBits(word, 24u, 8u)),
    );
    return q * scale32(row, c);
}
