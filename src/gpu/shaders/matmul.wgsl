// out[r, out_off + c] (+)= sum_k x[x_off + r*k + kk] * w_at(c, kk) + bias[bias_off + c]
// (w_at and the type of w come from the weight storage appended: storage/*.wgsl).
// Tiled: 64×64 outputs per workgroup of 16×16 threads, 4×4 per thread, K in tiles of 16.
// Bindings and store: linear.wgsl.

const TM: u32 = 64u;
const TN: u32 = 64u;
const TK: u32 = 16u;

var<workgroup> xs: array<f32, 1024>; // [TM][TK]
var<workgroup> ws: array<f32, 1024>; // [TK][TN]

fn store_row(r: u32, m: u32, col: u32, v: vec4<f32>) {
    if (r >= m) {
        return;
    }
    for (var j = 0u; j < 4u; j++) {
        if (col + j < p.n) {
            store(r, col + j, v[j]);
        }
    }
}

@compute @workgroup_size(16, 16)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>,
        @builtin(local_invocation_index) li: u32) {
    let m = rows_m();
    let row0 = wid.y * TM;
    let col0 = wid.x * TN;
    // 4×4 outputs per thread in vec4 registers (no dynamically indexed arrays: CPU-backed
    // drivers spill those to memory).
    var acc0 = vec4<f32>(0.0);
    var acc1 = vec4<f32>(0.0);
    var acc2 = vec4<f32>(0.0);
    var acc3 = vec4<f32>(0.0);
    let ar = lid.y * 4u * TK;
    let bc = lid.x * 4u;
    for (var k0 = 0u; k0 < p.k; k0 += TK) {
        for (var e = 0u; e < 4u; e++) {
            let idx = li + e * 256u;
            let r = idx / TK;
            let c = idx % TK;
            let gr = row0 + r;
            let gk = k0 + c;
            var v = 0.0;
            if (gr < m && gk < p.k) {
                v = x[p.x_off + gr * p.k + gk];
            }
            xs[idx] = v;
        }
        // The weight tile: thread li loads 4 consecutive k of output column li / 4 (one decode
        // per four for quantized storages).
        {
            let r = li >> 2u;
            let c = (li & 3u) * 4u;
            let gn = col0 + r;
            let gk = k0 + c;
            var u = vec4<f32>(0.0);
            if (gn < p.n) {
                if (gk + 3u < p.k) {
                    u = w4_at(gn, gk);
                } else {
                    for (var j = 0u; j < 4u; j++) {
                        if (gk + j < p.k) {
                            u[j] = w_at(gn, gk + j);
                        }
                    }
                }
            }
            ws[c * TN + r] = u.x;
            ws[(c + 1u) * TN + r] = u.y;
            ws[(c + 2u) * TN + r] = u.z;
            ws[(c + 3u) * TN + r] = u.w;
        }
        workgroupBarrier();
        for (var kk = 0u; kk < TK; kk++) {
            let b = vec4<f32>(ws[kk * TN + bc], ws[kk * TN + bc + 1u], ws[kk * TN + bc + 2u], ws[kk * TN + bc + 3u]);
            acc0 += xs[ar + kk] * b;
            acc1 += xs[ar + TK + kk] * b;
            acc2 += xs[ar + 2u * TK + kk] * b;
            acc3 += xs[ar + 3u * TK + kk] * b;
        }
        workgroupBarrier();
    }
    let r = row0 + lid.y * 4u;
    let c = col0 + bc;
    store_row(r, m, c, acc0);
    store_row(r + 1u, m, c, acc1);
    store_row(r + 2u, m, c, acc2);
    store_row(r + 3u, m, c, acc3);
}
