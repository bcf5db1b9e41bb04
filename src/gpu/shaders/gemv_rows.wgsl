// Few rows of x (m ≤ 4, GEMV_ROWS) with one output column per invocation for all rows (no
// workgroup memory, no barriers; each weight read once for all rows): the better shape for
// CPU-backed adapters (lavapipe, SwiftShader), where invocations are SIMD lanes.
// Bindings, x4 and store: linear.wgsl.

// Row r's dot product with column col from its four partial sums and the last k % 4 weights
// (from kk).
fn finish(s: vec4<f32>, r: u32, col: u32, kk: u32) -> f32 {
    var v = (s.x + s.y) + (s.z + s.w);
    for (var k2 = kk; k2 < p.k; k2++) {
        v += w_at(col, k2) * x[p.x_off + r * p.k + k2];
    }
    return v;
}

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) li: u32) {
    let m = rows_m();
    let col = wg_linear(wid, nwg) * 64u + li;
    if (col >= p.n) {
        return;
    }
    // Four weights at a time (one decode per four for quantized storages), four partial sums
    // per row, one register accumulator per row (no dynamically indexed arrays: CPU-backed
    // drivers spill those to memory).
    var s0 = vec4<f32>(0.0);
    var s1 = vec4<f32>(0.0);
    var s2 = vec4<f32>(0.0);
    var s3 = vec4<f32>(0.0);
    var kk = 0u;
    if (m == 1u) {
        // One row (a single sequence's decode step): the loop without the other rows' tests.
        for (; kk + 3u < p.k; kk += 4u) {
            s0 += w4_at(col, kk) * x4(0u, kk);
        }
        store(0u, col, finish(s0, 0u, col, kk));
        return;
    }
    for (; kk + 3u < p.k; kk += 4u) {
        let wv = w4_at(col, kk);
        s0 += wv * x4(0u, kk);
        if (m > 1u) {
            s1 += wv * x4(1u, kk);
        }
        if (m > 2u) {
            s2 += wv * x4(2u, kk);
        }
        if (m > 3u) {
            s3 += wv * x4(3u, kk);
        }
    }
    store(0u, col, finish(s0, 0u, col, kk));
    if (m > 1u) {
        store(1u, col, finish(s1, 1u, col, kk));
    }
    if (m > 2u) {
        store(2u, col, finish(s2, 2u, col, kk));
    }
    if (m > 3u) {
        store(3u, col, finish(s3, 3u, col, kk));
    }
}
