// f16 weights, two per u32: element i = r·k + c of the chunk in the low half of word i / 2 when
// i is even, the high half when odd. Core WGSL (no shader-f16 feature); arithmetic stays f32.
alias WeightWord = u32;

fn w_at(r: u32, c: u32) -> f32 {
    let i = r * p.k + c;
    let pair = unpack2x16float(w[i >> 1u]);
    return select(pair.x, pair.y, (i & 1u) == 1u);
}

// Elements c .. c + 3 of row r: two words when they start on an even element.
fn w4_at(r: u32, c: u32) -> vec4<f32> {
    let i = r * p.k + c;
    if ((i & 1u) == 0u) {
        return vec4<f32>(unpack2x16float(w[i >> 1u]), unpack2x16float(w[(i >> 1u) + 1u]));
    }
    return vec4<f32>(w_at(r, c), w_at(r, c + 1u), w_at(r, c + 2u), w_at(r, c + 3u));
}
