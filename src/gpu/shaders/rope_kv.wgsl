// RoPE (HF rotate-half) on q and k in the fused qkv rows, k and v written into the cache
// (layout [sequences, kv_heads, cap, d]): row i is position step.start + r of sequence
// step.seq0 + s (r = i % step.seq_rows, s = i / step.seq_rows). rope holds cos [rows, d/2]
// then sin, row r for position step.start + r.
// `P` is RopeKvParams and `Step` is Step, declared in src/gpu/params.rs and prepended.
@group(0) @binding(0) var<uniform> step: Step;
@group(0) @binding(1) var<uniform> p: P;
@group(0) @binding(2) var<storage, read_write> qkv: array<f32>;
@group(0) @binding(3) var<storage, read> rope: array<f32>;
@group(0) @binding(4) var<storage, read_write> kc: array<f32>;
@group(0) @binding(5) var<storage, read_write> vc: array<f32>;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) li: u32) {
    let g = wg_linear(wid, nwg) * 64u + li;
    let half = p.d / 2u;
    let heads = p.nh + 2u * p.kvh;
    if (g >= step.t * heads * half) {
        return;
    }
    let j = g % half;
    let hh = (g / half) % heads;
    let i = g / (half * heads);
    let base = i * heads * p.d + hh * p.d;
    let r = i % step.seq_rows;
    let pos = step.start + r;
    let seq_base = (step.seq0 + i / step.seq_rows) * p.kvh * p.cap;
    if (hh < p.nh + p.kvh) {
        let c = rope[r * half + j];
        let s = rope[p.rope_rows * half + r * half + j];
        let x1 = qkv[base + j];
        let x2 = qkv[base + j + half];
        let y1 = x1 * c - x2 * s;
        let y2 = x1 * s + x2 * c;
        if (hh < p.nh) {
            qkv[base + j] = y1;
            qkv[base + j + half] = y2;
        } else {
            let cb = (seq_base + (hh - p.nh) * p.cap + pos) * p.d;
            kc[cb + j] = y1;
            kc[cb + j + half] = y2;
        }
    } else {
        let cb = (seq_base + (hh - p.nh - p.kvh) * p.cap + pos) * p.d;
        vc[cb + j] = qkv[base + j];
        vc[cb + j + half] = qkv[base + j + half];
    }
}
