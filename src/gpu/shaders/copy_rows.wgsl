// dst[dst_off + r * dst_stride + j] = src[(row + r) * h + j] for r < rows, j < h, with
// row = step.last (or 0 when fixed_zero): one row captured (rows = 1: the decoder's last-row
// state), or a block of rows written as columns of a wider matrix (the vision tower's hidden
// states, concatenated along the features).
// `P` is CopyRowsParams and `Step` is Step, declared in src/gpu/params.rs and prepended.
@group(0) @binding(0) var<uniform> step: Step;
@group(0) @binding(1) var<uniform> p: P;
@group(0) @binding(2) var<storage, read> src: array<f32>;
@group(0) @binding(3) var<storage, read_write> dst: array<f32>;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) li: u32) {
    let i = wg_linear(wid, nwg) * 64u + li;
    if (i >= p.rows * p.h) {
        return;
    }
    let r = i / p.h;
    let j = i % p.h;
    var row = step.last;
    if (p.fixed_zero != 0u) {
        row = 0u;
    }
    dst[p.dst_off + r * p.dst_stride + j] = src[(row + r) * p.h + j];
}
