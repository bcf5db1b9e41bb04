// out[i, c] = act(gu[i, c]) * gu[i, m + c]   (gate and up fused in one [t, 2m] matmul).
// act: an `activate` code (common.wgsl).
// `P` is ActParams and `Step` is Step, declared in src/gpu/params.rs and prepended.
@group(0) @binding(0) var<uniform> step: Step;
@group(0) @binding(1) var<uniform> p: P;
@group(0) @binding(2) var<storage, read> gu: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) li: u32) {
    let g = wg_linear(wid, nwg) * 64u + li;
    if (g >= step.t * p.m) {
        return;
    }
    let i = g / p.m;
    let c = g % p.m;
    let gate = gu[i * 2u * p.m + c];
    let up = gu[i * 2u * p.m + p.m + c];
    out[g] = activate(gate, p.act) * up;
}
