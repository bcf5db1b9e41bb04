// GQA attention, one workgroup per (tile of TQ query rows, query head h), keys in blocks of 64
// (one per invocation) with an online softmax: each key and value row is read once per tile, not
// once per query row, and each probability is computed once (by its key's invocation).
// Causal (n_keys = 0: the decoder over its KV cache): query row i is position step.start + r of
// sequence step.seq0 + s (r = i % step.seq_rows, s = i / step.seq_rows) and sees that
// sequence's keys 0 ..= step.start + r, or with a sliding window w > 0 only the last w of them.
// Full (n_keys > 0: the vision tower, one sequence): every row sees keys 0 .. n_keys. Head h
// reads KV head h / (nh / kvh) (HF repeat_kv). Key j of KV head g of sequence q is at
// k_off + (q·kvh + g)·head_stride + j·row_stride in kc (values likewise in vc): the cache's
// [sequences, kvh, cap, d] layout, or the K and V columns of a packed [rows, q|k|v] buffer.
// A tile never spans two sequences. Dispatch (t / seq_rows) · ceil(seq_rows / TQ) · nh
// workgroups (ops::attention_groups).
// `P` is AttentionParams and `Step` is Step, declared in src/gpu/params.rs and prepended.
@group(0) @binding(0) var<uniform> step: Step;
@group(0) @binding(1) var<uniform> p: P;
@group(0) @binding(2) var<storage, read> qkv: array<f32>;
@group(0) @binding(3) var<storage, read> kc: array<f32>;
@group(0) @binding(4) var<storage, read> vc: array<f32>;
@group(0) @binding(5) var<storage, read_write> out: array<f32>;

const B: u32 = 64u;
const TQ: u32 = 8u;
// The tile's queries, [TQ, d] (d ≤ 256).
var<workgroup> qs: array<f32, 2048>;
// The block's scores, then probabilities, [TQ, B].
var<workgroup> pr: array<f32, 512>;

// Keys the row at position step.start + r of its sequence sees: [first, end).
fn key_range(r: u32) -> vec2<u32> {
    var end = p.n_keys;
    if (end == 0u) {
        end = step.start + r + 1u;
    }
    var first = 0u;
    if (p.window > 0u && end > p.window) {
        first = end - p.window;
    }
    return vec2<u32>(first, end);
}

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) li: u32) {
    let wg = wg_linear(wid, nwg);
    let tiles = (step.seq_rows + TQ - 1u) / TQ;
    let h = wg % p.nh;
    let s = (wg / p.nh) / tiles;
    let r0 = ((wg / p.nh) % tiles) * TQ;
    if (s * step.seq_rows >= step.t) {
        return;
    }
    let rows = min(TQ, step.seq_rows - r0);
    let i0 = s * step.seq_rows + r0;
    // This sequence's KV head of h: its first key (values likewise).
    let head = (step.seq0 + s) * p.kvh + h / (p.nh / p.kvh);
    // A decode step (one row a sequence) takes the one-row loop: the tile's fixed TQ-row loops
    // would do TQ times its work.
    if (rows == 1u) {
        one_row(i0, r0, h, head, li);
    } else {
        tile(i0, r0, h, head, rows, li);
    }
}

// Row i (position step.start + r), head h over KV head `head`: each invocation scores one key of
// the block; every invocation then walks the block's scores for its value columns.
fn one_row(i: u32, r: u32, h: u32, head: u32, li: u32) {
    for (var e = li; e < p.d; e += 64u) {
        qs[e] = qkv[i * p.q_stride + h * p.d + e];
    }
    workgroupBarrier();
    let range = key_range(r);
    let kbase = p.k_off + head * p.head_stride;
    let vbase = p.v_off + head * p.head_stride;
    var m = NEG_BIG;
    var l = 0.0;
    var acc = array<f32, 4>(0.0, 0.0, 0.0, 0.0);
    for (var b0 = range.x; b0 < range.y; b0 += B) {
        let j = b0 + li;
        var s = NEG_BIG;
        if (j < range.y) {
            var dot = 0.0;
            let kb = kbase + j * p.row_stride;
            for (var e = 0u; e < p.d; e++) {
                dot += qs[e] * kc[kb + e];
            }
            s = dot * p.scale;
        }
        pr[li] = s;
        workgroupBarrier();
        let cnt = min(B, range.y - b0);
        var bm = m;
        for (var r = 0u; r < cnt; r++) {
            bm = max(bm, pr[r]);
        }
        let corr = exp(m - bm);
        m = bm;
        workgroupBarrier();
        pr[li] = exp(s - m);
        workgroupBarrier();
        l *= corr;
        for (var c = 0u; c < 4u; c++) {
            acc[c] *= corr;
        }
        for (var r = 0u; r < cnt; r++) {
            let pj = pr[r];
            l += pj;
            let vb = vbase + (b0 + r) * p.row_stride;
            for (var c = 0u; c < 4u; c++) {
                let e = li + c * 64u;
                if (e < p.d) {
                    acc[c] += pj * vc[vb + e];
                }
            }
        }
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

// Rows i0 .. i0 + rows (2 ≤ rows ≤ TQ; positions step.start + r0 ..), head h over KV head
// `head`: each invocation scores one key for every row and turns those scores into
// probabilities; every invocation then walks the block for its value columns, for all rows at
// once.
fn tile(i0: u32, r0: u32, h: u32, head: u32, rows: u32, li: u32) {
    for (var e = li; e < rows * p.d; e += 64u) {
        qs[e] = qkv[(i0 + e / p.d) * p.q_stride + h * p.d + e % p.d];
    }
    workgroupBarrier();
    // The tile's keys: from the first row's first to the last row's end.
    let lo = key_range(r0).x;
    let hi = key_range(r0 + rows - 1u).y;
    let kbase = p.k_off + head * p.head_stride;
    let vbase = p.v_off + head * p.head_stride;
    var m: array<f32, 8>;
    var l: array<f32, 8>;
    var acc: array<f32, 32>; // [TQ, 4]: this invocation's value columns li + 64·c
    for (var q = 0u; q < TQ; q++) {
        m[q] = NEG_BIG;
        l[q] = 0.0;
    }
    for (var c = 0u; c < 32u; c++) {
        acc[c] = 0.0;
    }
    for (var b0 = lo; b0 < hi; b0 += B) {
        let j = b0 + li;
        var dots: array<f32, 8>;
        for (var q = 0u; q < TQ; q++) {
            dots[q] = 0.0;
        }
        if (j < hi) {
            let kb = kbase + j * p.row_stride;
            for (var e = 0u; e < p.d; e++) {
                let k = kc[kb + e];
                for (var q = 0u; q < TQ; q++) {
                    if (q < rows) {
                        dots[q] += qs[q * p.d + e] * k;
                    }
                }
            }
        }
        for (var q = 0u; q < TQ; q++) {
            let range = key_range(r0 + q);
            var s = NEG_BIG;
            if (q < rows && j < hi && j >= range.x && j < range.y) {
                s = dots[q] * p.scale;
            }
            pr[q * B + li] = s;
        }
        workgroupBarrier();
        let cnt = min(B, hi - b0);
        var corr: array<f32, 8>;
        for (var q = 0u; q < TQ; q++) {
            var bm = m[q];
            for (var r = 0u; r < cnt; r++) {
                bm = max(bm, pr[q * B + r]);
            }
            corr[q] = exp(m[q] - bm);
            m[q] = bm;
        }
        workgroupBarrier();
        // Each invocation turns its own key's scores into probabilities (a masked key: 0).
        for (var q = 0u; q < TQ; q++) {
            let s = pr[q * B + li];
            var pq = 0.0;
            if (s > NEG_BIG) {
                pq = exp(s - m[q]);
            }
            pr[q * B + li] = pq;
        }
        workgroupBarrier();
        for (var q = 0u; q < TQ; q++) {
            l[q] *= corr[q];
            for (var c = 0u; c < 4u; c++) {
                acc[q * 4u + c] *= corr[q];
            }
        }
        for (var r = 0u; r < cnt; r++) {
            let vb = vbase + (b0 + r) * p.row_stride;
            for (var c = 0u; c < 4u; c++) {
                let e = li + c * 64u;
                if (e < p.d) {
                    let v = vc[vb + e];
                    for (var q = 0u; q < TQ; q++) {
                        acc[q * 4u + c] += pr[q * B + r] * v;
                    }
                }
            }
            for (var q = 0u; q < TQ; q++) {
                l[q] += pr[q * B + r];
            }
        }
        workgroupBarrier();
    }
    for (var q = 0u; q < rows; q++) {
        let ob = (i0 + q) * p.nh * p.d + h * p.d;
        for (var c = 0u; c < 4u; c++) {
            let e = li + c * 64u;
            if (e < p.d) {
                out[ob + e] = acc[q * 4u + c] / l[q];
            }
        }
    }
}
