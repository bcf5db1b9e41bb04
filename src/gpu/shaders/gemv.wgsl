// One row of x (m = 1): out[out_off + c] (+)= dot(x[x_off ..], w_at(c, ..)) + bias[bias_off + c].
// 8 output rows per workgroup, 32 threads per row, tree reduction in workgroup memory.
struct P {
    m: u32,
    k: u32,
    n: u32,
    x_off: u32,
    out_stride: u32,
    out_off: u32,
    flags: u32,
    bias_off: u32,
}

@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> w: array<WeightWord>;
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;

var<workgroup> red: array<f32, 256>;

@compute @workgroup_size(32, 8)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_id) lid: vec3<u32>) {
    let row = wg_linear(wid, nwg) * 8u + lid.y;
    var s = 0.0;
    if (row < p.n) {
        var kk = lid.x;
        // 4 independent partial sums per thread.
        var s1 = 0.0;
        var s2 = 0.0;
        var s3 = 0.0;
        for (; kk + 96u < p.k; kk += 128u) {
            s += w_at(row, kk) * x[p.x_off + kk];
            s1 += w_at(row, kk + 32u) * x[p.x_off + kk + 32u];
            s2 += w_at(row, kk + 64u) * x[p.x_off + kk + 64u];
            s3 += w_at(row, kk + 96u) * x[p.x_off + kk + 96u];
        }
        for (; kk < p.k; kk += 32u) {
            s += w_at(row, kk) * x[p.x_off + kk];
        }
        s = (s + s1) + (s2 + s3);
    }
    let i = lid.y * 32u + lid.x;
    red[i] = s;
    workgroupBarrier();
    for (var off = 16u; off > 0u; off >>= 1u) {
        if (lid.x < off) {
            red[i] += red[i + off];
        }
        workgroupBarrier();
    }
    if (lid.x == 0u && row < p.n) {
        var v = red[i];
        if ((p.flags & 1u) != 0u) {
            v += bias[p.bias_off + row];
        }
        let o = p.out_off + row;
        if ((p.flags & 2u) != 0u) {
            v = out[o] + v;
        }
        out[o] = v;
    }
}
