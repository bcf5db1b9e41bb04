// GQA attention, one workgroup per (row i, query head h), keys in blocks of 64 with an online
// softmax. Causal (n_keys = 0: the decoder over its KV cache): query row i is position
// step.start + i and sees keys 0 ..= step.start + i, or with a sliding window w > 0 only the
// last w of them. Full (n_keys > 0: the vision tower): every row sees keys 0 .. n_keys. Head h
// reads KV head h / (nh / kvh) (HF repeat_kv). Key j of KV head g is at
// k_off + g·head_stride + j·row_stride in kc (values likewise in vc): the cache's
// [kvh, cap, d] layout, or the K and V columns of a packed [rows, q|k|v] buffer.
// `P` is AttentionParams and `Step` is Step, declared in src/gpu/params.rs and prepended.
@group(0) @binding(0) var<uniform> step: Step;
@group(0) @binding(1) var<uniform> p: P;
@group(0) @binding(2) var<storage, read> qkv: array<f32>;
@group(0) @binding(3) var<storage, read> kc: array<f32>;
@group(0) @binding(4) var<storage, read> vc: array<f32>;
@group(0) @binding(5) var<storage, read_write> out: array<f32>;

const B: u32 = 64u;
var<workgroup> qs: array<f32, 256>;
var<workgroup> sc: array<f32, 64>;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) li: u32) {
    let wg = wg_linear(wid, nwg);
    let i = wg / p.nh;
    let h = wg % p.nh;
    if (i >= step.t) {
        return;
    }
    let kv = h / (p.nh / p.kvh);
    for (var e = li; e < p.d; e += 64u) {
        qs[e] = qkv[i * p.q_stride + h * p.d + e];
    }
    workgroupBarrier();
    var n_keys = p.n_keys;
    if (n_keys == 0u) {
        n_keys = step.start + i + 1u;
    }
    let kbase = p.k_off + kv * p.head_stride;
    let vbase = p.v_off + kv * p.head_stride;
    var m = NEG_BIG;
    var l = 0.0;
    var acc = array<f32, 4>(0.0, 0.0, 0.0, 0.0);
    var first = 0u;
    if (p.window > 0u && n_keys > p.window) {
        first = n_keys - p.window;
    }
    for (var b0 = first; b0 < n_keys; b0 += B) {
        let j = b0 + li;
        var s = NEG_BIG;
        if (j < n_keys) {
            var dot = 0.0;
            let kb = kbase + j * p.row_stride;
            for (var e = 0u; e < p.d; e++) {
                dot += qs[e] * kc[kb + e];
            }
            s = dot * p.scale;
        }
        sc[li] = s;
        workgroupBarrier();
        let cnt = min(B, n_keys - b0);
        var bm = NEG_BIG;
        for (var r = 0u; r < cnt; r++) {
            bm = max(bm, sc[r]);
        }
        let m_new = max(m, bm);
        let corr = exp(m - m_new);
        l *= corr;
        for (var c = 0u; c < 4u; c++) {
            acc[c] *= corr;
        }
        for (var r = 0u; r < cnt; r++) {
            let pr = exp(sc[r] - m_new);
            l += pr;
            let vb = vbase + (b0 + r) * p.row_stride;
            for (var c = 0u; c < 4u; c++) {
                let e = li + c * 64u;
                if (e < p.d) {
                    acc[c] += pr * vc[vb + e];
                }
            }
        }
        m = m_new;
        workgroupBarrier();
    }
    let ob = i * p.nh * p.d + h * p.d;
    for (var c = 0u; c < 4u; c++) {
        let e = li + c * 64u;
        if (e < p.d) {
            out[ob + e] = acc[c] / l;
        }
    }
}
