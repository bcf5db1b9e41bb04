// Matmul with one output element per invocation (no workgroup memory, no barriers): the better shape
// for CPU-backed adapters (lavapipe, SwiftShader), where invocations are SIMD lanes.
// `P` is LinearParams and `Step` is Step, declared in src/gpu/params.rs and prepended.
@group(0) @binding(0) var<uniform> step: Step;
@group(0) @binding(1) var<uniform> p: P;
@group(0) @binding(2) var<storage, read> x: array<f32>;
@group(0) @binding(3) var<storage, read> w: array<WeightWord>;
@group(0) @binding(4) var<storage, read> bias: array<f32>;
@group(0) @binding(5) var<storage, read_write> out: array<f32>;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) li: u32) {
    var m = p.m;
    if (m == 0u) {
        m = step.t;
    }
    let g = wg_linear(wid, nwg) * 64u + li;
    if (g >= m * p.n) {
        return;
    }
    let r = g / p.n;
    let row = g % p.n;
    let xb = p.x_off + r * p.k;
    // Four weights at a time (one decode per four for quantized storages), four partial sums.
    var s = vec4<f32>(0.0);
    var kk = 0u;
    for (; kk + 3u < p.k; kk += 4u) {
        s += w4_at(row, kk) * vec4<f32>(x[xb + kk], x[xb + kk + 1u], x[xb + kk + 2u], x[xb + kk + 3u]);
    }
    var v = (s.x + s.y) + (s.z + s.w);
    for (; kk < p.k; kk++) {
        v += w_at(row, kk) * x[xb + kk];
    }
    if ((p.flags & 1u) != 0u) {
        v += bias[p.bias_off + row];
    }
    let o = r * p.out_stride + p.out_off + row;
    if ((p.flags & 2u) != 0u) {
        v = out[o] + v;
    }
    out[o] = v;
}
