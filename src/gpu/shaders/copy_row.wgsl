// dst[dst_off + j] = src[row * h + j] with row = step.last (or 0 when fixed_zero).
// `P` is CopyRowParams and `Step` is Step, declared in src/gpu/params.rs and prepended.
@group(0) @binding(0) var<uniform> step: Step;
@group(0) @binding(1) var<uniform> p: P;
@group(0) @binding(2) var<storage, read> src: array<f32>;
@group(0) @binding(3) var<storage, read_write> dst: array<f32>;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) li: u32) {
    let j = wg_linear(wid, nwg) * 64u + li;
    if (j >= p.h) {
        return;
    }
    var row = step.last;
    if (p.fixed_zero != 0u) {
        row = 0u;
    }
    dst[p.dst_off + j] = src[row * p.h + j];
}
