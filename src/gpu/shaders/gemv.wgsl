// Few rows of x (m ≤ 4, GEMV_ROWS: a decode step, one row a sequence), each weight read once
// for all rows: 8 output columns per workgroup, 32 threads per column, tree reduction in
// workgroup memory. Bindings, x4 and store: linear.wgsl.

var<workgroup> red: array<f32, 1024>; // [4 rows, 256]

// Thread lid.x's part of row r's dot product with column col: its four-wide sums, plus one of
// the last k % 4 weights for the first threads.
fn partial(acc: vec4<f32>, r: u32, col: u32, lx: u32) -> f32 {
    var s = (acc.x + acc.y) + (acc.z + acc.w);
    let tail = (p.k & ~3u) + lx;
    if (lx < 4u && tail < p.k) {
        s += w_at(col, tail) * x[p.x_off + r * p.k + tail];
    }
    return s;
}

@compute @workgroup_size(32, 8)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_id) lid: vec3<u32>) {
    let m = rows_m();
    let col = wg_linear(wid, nwg) * 8u + lid.y;
    let i = lid.y * 32u + lid.x;
    // One accumulator per row in registers (no dynamically indexed arrays).
    var acc0 = vec4<f32>(0.0);
    var acc1 = vec4<f32>(0.0);
    var acc2 = vec4<f32>(0.0);
    var acc3 = vec4<f32>(0.0);
    if (col < p.n) {
        // Thread lid.x takes weights 4·lid.x .. 4·lid.x + 3 of every 128 (one decode per four
        // for quantized storages).
        for (var kk = lid.x * 4u; kk + 3u < p.k; kk += 128u) {
            let wv = w4_at(col, kk);
            acc0 += wv * x4(0u, kk);
            if (m > 1u) {
                acc1 += wv * x4(1u, kk);
            }
            if (m > 2u) {
                acc2 += wv * x4(2u, kk);
            }
            if (m > 3u) {
                acc3 += wv * x4(3u, kk);
            }
        }
        red[i] = partial(acc0, 0u, col, lid.x);
        if (m > 1u) {
            red[256u + i] = partial(acc1, 1u, col, lid.x);
        }
        if (m > 2u) {
            red[512u + i] = partial(acc2, 2u, col, lid.x);
        }
        if (m > 3u) {
            red[768u + i] = partial(acc3, 3u, col, lid.x);
        }
    } else {
        for (var r = 0u; r < m; r++) {
            red[r * 256u + i] = 0.0;
        }
    }
    workgroupBarrier();
    for (var off = 16u; off > 0u; off >>= 1u) {
        if (lid.x < off) {
            for (var r = 0u; r < m; r++) {
                red[r * 256u + i] += red[r * 256u + i + off];
            }
        }
        workgroupBarrier();
    }
    if (lid.x == 0u && col < p.n) {
        for (var r = 0u; r < m; r++) {
            store(r, col, red[r * 256u + i]);
        }
    }
}
