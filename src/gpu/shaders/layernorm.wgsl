// LayerNorm of step.t rows: out[r] = (x[r] − mean) / sqrt(var + eps) · w + b, with the mean
// and the (biased) variance of the row (candle's order of operations: centre, then scale).
// `P` is LayerNormParams and `Step` is Step, declared in src/gpu/params.rs and prepended.
@group(0) @binding(0) var<uniform> step: Step;
@group(0) @binding(1) var<uniform> p: P;
@group(0) @binding(2) var<storage, read> x: array<f32>;
@group(0) @binding(3) var<storage, read> w: array<f32>;
@group(0) @binding(4) var<storage, read> b: array<f32>;
@group(0) @binding(5) var<storage, read_write> out: array<f32>;

var<workgroup> red: array<f32, 64>;

fn row_sum(li: u32, v: f32) -> f32 {
    red[li] = v;
    workgroupBarrier();
    for (var off = 32u; off > 0u; off >>= 1u) {
        if (li < off) {
            red[li] += red[li + off];
        }
        workgroupBarrier();
    }
    let total = red[0];
    workgroupBarrier();
    return total;
}

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) li: u32) {
    let row = wg_linear(wid, nwg);
    if (row >= step.t) {
        return;
    }
    let base = row * p.h;
    var s = 0.0;
    for (var j = li; j < p.h; j += 64u) {
        s += x[base + j];
    }
    let mean = row_sum(li, s) / f32(p.h);
    var s2 = 0.0;
    for (var j = li; j < p.h; j += 64u) {
        let c = x[base + j] - mean;
        s2 += c * c;
    }
    let inv = 1.0 / sqrt(row_sum(li, s2) / f32(p.h) + p.eps);
    for (var j = li; j < p.h; j += 64u) {
        out[base + j] = (x[base + j] - mean) * inv * w[j] + b[j];
    }
}
