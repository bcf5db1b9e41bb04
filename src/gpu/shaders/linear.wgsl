// The linear kernels' bindings and their output rule (prepended to matmul.wgsl, gemv.wgsl and
// gemv_rows.wgsl): out[r·out_stride + out_off + c] (+)= x[x_off + r·k ..] · w_at(c, ..)
// + bias[bias_off + c]. w_at and the type of w come from the weight storage appended
// (storage/*.wgsl).
// `P` is LinearParams and `Step` is Step, declared in src/gpu/params.rs and prepended.
@group(0) @binding(0) var<uniform> step: Step;
@group(0) @binding(1) var<uniform> p: P;
@group(0) @binding(2) var<storage, read> x: array<f32>;
@group(0) @binding(3) var<storage, read> w: array<WeightWord>;
@group(0) @binding(4) var<storage, read> bias: array<f32>;
@group(0) @binding(5) var<storage, read_write> out: array<f32>;

// Rows this dispatch multiplies: p.m, or the step's rows when p.m is 0.
fn rows_m() -> u32 {
    if (p.m == 0u) {
        return step.t;
    }
    return p.m;
}

// x[r, kk .. kk + 4].
fn x4(r: u32, kk: u32) -> vec4<f32> {
    let b = p.x_off + r * p.k + kk;
    return vec4<f32>(x[b], x[b + 1u], x[b + 2u], x[b + 3u]);
}

// The dot product v of row r and output column c, plus the bias, written or accumulated.
fn store(r: u32, c: u32, v: f32) {
    var y = v;
    if ((p.flags & 1u) != 0u) {
        y += bias[p.bias_off + c];
    }
    let o = r * p.out_stride + p.out_off + c;
    if ((p.flags & 2u) != 0u) {
        y = out[o] + y;
    }
    out[o] = y;
}
