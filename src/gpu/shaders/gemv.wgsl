// One row of x (m = 1): out[out_off + c] (+)= dot(x[x_off ..], w_at(c, ..)) + bias[bias_off + c].
// 8 output rows per workgroup, 32 threads per row, tree reduction in workgroup memory.
// `P` is LinearParams and `Step` is Step, declared in src/gpu/params.rs and prepended.
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
        // Thread lid.x takes weights 4·lid.x .. 4·lid.x + 3 of every 128 (one decode per four
        // for quantized storages); the last k % 4 go to the first threads.
        let xb = p.x_off;
        var acc = vec4<f32>(0.0);
        for (var kk = lid.x * 4u; kk + 3u < p.k; kk += 128u) {
            acc += w4_at(row, kk) * vec4<f32>(x[xb + kk], x[xb + kk + 1u], x[xb + kk + 2u], x[xb + kk + 3u]);
        }
        s = (acc.x + acc.y) + (acc.z + acc.w);
        let tail = (p.k & ~3u) + lid.x;
        if (lid.x < 4u && tail < p.k) {
            s += w_at(row, tail) * x[xb + tail];
        }
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
