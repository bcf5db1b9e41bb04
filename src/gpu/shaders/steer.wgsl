// Steering: x[i] += delta on the rows of sequence p.seq chosen by `mode` (0 all, 1 last prompt
// token, 2 generated tokens, 3 the last prompt token and generated tokens), exactly as
// Intervention::apply. Row i is position step.start + i % step.seq_rows of sequence
// step.seq0 + i / step.seq_rows.
// `P` is SteerParams and `Step` is Step, declared in src/gpu/params.rs and prepended.
@group(0) @binding(0) var<uniform> step: Step;
@group(0) @binding(1) var<uniform> p: P;
@group(0) @binding(2) var<storage, read_write> x: array<f32>;
@group(0) @binding(3) var<storage, read> delta: array<f32>;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) li: u32) {
    let g = wg_linear(wid, nwg) * 64u + li;
    if (g >= step.t * p.h) {
        return;
    }
    let i = g / p.h;
    if (step.seq0 + i / step.seq_rows != p.seq) {
        return;
    }
    let pos = step.start + i % step.seq_rows;
    var chosen = p.mode == 0u;
    if (p.mode == 1u) {
        chosen = pos + 1u == step.prompt_len;
    } else if (p.mode == 2u) {
        chosen = pos >= step.prompt_len;
    } else if (p.mode == 3u) {
        chosen = pos + 1u >= step.prompt_len;
    }
    if (chosen) {
        x[g] = x[g] + delta[g % p.h];
    }
}
