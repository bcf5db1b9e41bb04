// f32 weights: row r of the chunk is w[r·k .. (r+1)·k].
alias WeightWord = f32;

fn w_at(r: u32, c: u32) -> f32 {
    return w[r * p.k + c];
}

// Elements c .. c + 3 of row r.
fn w4_at(r: u32, c: u32) -> vec4<f32> {
    let i = r * p.k + c;
    return vec4<f32>(w[i], w[i + 1u], w[i + 2u], w[i + 3u]);
}
