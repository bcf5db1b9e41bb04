// x[i, c] = act(x[i, c]) in place, for step.t rows of m values (the vision MLP and the
// projector, whose activations are not gated). act: an `activate` code (common.wgsl).
// `P` is ActParams and `Step` is Step, declared in src/gpu/params.rs and prepended.
@group(0) @binding(0) var<uniform> step: Step;
@group(0) @binding(1) var<uniform> p: P;
@group(0) @binding(2) var<storage, read_write> x: array<f32>;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) li: u32) {
    let g = wg_linear(wid, nwg) * 64u + li;
    if (g >= step.t * p.m) {
        return;
    }
    x[g] = activate(x[g], p.act);
}
