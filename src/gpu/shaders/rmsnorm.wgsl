// out[r] = x[r] / sqrt(mean(x[r]²) + eps) * w   (candle's order of operations).
// last_only: normalise row step.last into out row 0; else rows 0..step.t.
// `P` is RmsNormParams and `Step` is Step, declared in src/gpu/params.rs and prepended.
@group(0) @binding(0) var<uniform> step: Step;
@group(0) @binding(1) var<uniform> p: P;
@group(0) @binding(2) var<storage, read> x: array<f32>;
@group(0) @binding(3) var<storage, read> w: array<f32>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;

var<workgroup> red: array<f32, 64>;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) li: u32) {
    var row = wg_linear(wid, nwg);
    var orow = row;
    if (p.last_only != 0u) {
        row = step.last;
        orow = 0u;
    }
    let base = row * p.h;
    var s = 0.0;
    for (var j = li; j < p.h; j += 64u) {
        let v = x[base + j];
        s += v * v;
    }
    red[li] = s;
    workgroupBarrier();
    for (var off = 32u; off > 0u; off >>= 1u) {
        if (li < off) {
            red[li] += red[li + off];
        }
        workgroupBarrier();
    }
    let m = sqrt(red[0] / f32(p.h) + p.eps);
    let obase = p.out_off + orow * p.h;
    for (var j = li; j < p.h; j += 64u) {
        out[obase + j] = x[base + j] / m * w[j];
    }
}
