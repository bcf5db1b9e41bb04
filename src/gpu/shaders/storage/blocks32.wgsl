// Rows of GGML blocks of 32 values with one f16 scale each (Q8_0, Q4_0), row after row: a row of
// k values (nb = ⌈k / 32⌉ blocks, the padding zero) is QUANT_WORDS words of quants per block
// (declared by the storage), then the nb scales two per word (block b in half b % 2 of word
// QUANT_WORDS·nb + b / 2).

struct Row32 {
    first: u32,
    blocks: u32,
}

fn row32(r: u32) -> Row32 {
    let nb = (p.k + 31u) >> 5u;
    return Row32(r * (QUANT_WORDS * nb + ((nb + 1u) >> 1u)), nb);
}

// The scale of element c's block.
fn scale32(row: Row32, c: u32) -> f32 {
    let b = c >> 5u;
    let pair = unpack2x16float(w[row.first + QUANT_WORDS * row.blocks + (b >> 1u)]);
    return select(pair.x, pair.y, (b & 1u) == 1u);
}
