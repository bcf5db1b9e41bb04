// Token embedding on the GPU: out[j, c] = w_at(ids[j] - r0, c) for the step's rows whose token
// falls in this chunk of the table (rows r0 .. r0 + n); the other chunks write the rest.
// `P` is EmbedRowsParams and `Step` is Step, declared in src/gpu/params.rs and prepended.
@group(0) @binding(0) var<uniform> step: Step;
@group(0) @binding(1) var<uniform> p: P;
@group(0) @binding(2) var<storage, read> ids: array<u32>;
@group(0) @binding(3) var<storage, read> w: array<WeightWord>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) li: u32) {
    let g = wg_linear(wid, nwg) * 64u + li;
    if (g >= step.t * p.k) {
        return;
    }
    let j = g / p.k;
    let c = g % p.k;
    let id = ids[j];
    if (id < p.r0 || id >= p.r0 + p.n) {
        return;
    }
    out[g] = w_at(id - p.r0, c);
}
