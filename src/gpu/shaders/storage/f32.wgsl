// f32 weights: row r of the chunk is w[r·k .. (r+1)·k].
alias WeightWord = f32;

fn w_at(r: u32, c: u32) -> f32 {
    return w[r * p.k + c];
}
