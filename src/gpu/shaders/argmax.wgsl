// Index of the first maximal value (torch's tie rule) of each n-wide row of v: one workgroup
// per row (workgroup x = the row).
// `P` is ArgmaxParams and `Step` is Step, declared in src/gpu/params.rs and prepended.
@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<storage, read> v: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<u32>;

var<workgroup> bv: array<f32, 256>;
var<workgroup> bi: array<u32, 256>;

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let base = wid.x * p.n;
    var best = NEG_BIG;
    var idx = 0xffffffffu;
    if (li < p.n) {
        best = v[base + li];
        idx = li;
    }
    for (var e = li + 256u; e < p.n; e += 256u) {
        let x = v[base + e];
        if (x > best) {
            best = x;
            idx = e;
        }
    }
    bv[li] = best;
    bi[li] = idx;
    workgroupBarrier();
    for (var off = 128u; off > 0u; off >>= 1u) {
        if (li < off) {
            let x = bv[li + off];
            let k = bi[li + off];
            if (x > bv[li] || (x == bv[li] && k < bi[li])) {
                bv[li] = x;
                bi[li] = k;
            }
        }
        workgroupBarrier();
    }
    if (li == 0u) {
        out[wid.x] = bi[0];
    }
}
