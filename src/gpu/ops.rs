//! Single kernels on host data (one submission each): the self-test and the per-kernel tests
//! use these; the decoder records the same kernels into one pass per step.

use anyhow::Result;

use super::buffers::{bind_embed_rows, bind_linear, scratch, uniform, upload, GpuMatrix, LinearIo};
use super::context::GpuContext;
use super::kernels::{dispatch, grid};
use super::params::{
    ActParams, ArgmaxParams, AttentionParams, LayerNormParams, RmsNormParams, RopeKvParams, SteerParams, Step,
};
use super::storage::WeightStorage;

async fn read(ctx: &GpuContext, encoder: wgpu::CommandEncoder, buf: &wgpu::Buffer, floats: usize) -> Result<Vec<f32>> {
    let bytes = ctx.submit_and_read(encoder, buf, floats as u64 * 4).await?;
    Ok(bytemuck::cast_slice(&bytes).to_vec())
}

fn encoder(ctx: &GpuContext) -> wgpu::CommandEncoder {
    ctx.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("op") })
}

/// `x [m, k] · wᵀ (w [n, k]) + bias` → `[m, n]`.
pub async fn linear(
    ctx: &GpuContext,
    x: &[f32],
    m: usize,
    w: &[f32],
    bias: Option<&[f32]>,
    n: usize,
) -> Result<Vec<f32>> {
    linear_into(ctx, x, m, w, bias, n, None).await
}

/// As [`linear`], optionally accumulating into `residual` (`residual + x·wᵀ + b`), with the
/// weight split in chunks of at most `max_chunk_rows` rows (to test the split path).
pub async fn linear_into(
    ctx: &GpuContext,
    x: &[f32],
    m: usize,
    w: &[f32],
    bias: Option<&[f32]>,
    n: usize,
    residual: Option<&[f32]>,
) -> Result<Vec<f32>> {
    let k = x.len() / m;
    let matrix = GpuMatrix::new(ctx, "w", w, n, k, bias)?;
    run_linear(ctx, &matrix, x, m, residual).await
}

/// Run an uploaded matrix on `x [m, k]`.
pub async fn run_linear(
    ctx: &GpuContext,
    matrix: &GpuMatrix,
    x: &[f32],
    m: usize,
    residual: Option<&[f32]>,
) -> Result<Vec<f32>> {
    let n = matrix.n;
    let xb = upload(ctx, "x", x)?;
    let out = match residual {
        Some(r) => upload(ctx, "out", r)?,
        None => scratch(ctx, "out", m * n)?,
    };
    let step = uniform(ctx, &Step::new(0, m, m));
    let dummy = scratch(ctx, "dummy", 1)?;
    let ops = bind_linear(
        ctx,
        &step,
        matrix,
        LinearIo { accumulate: residual.is_some(), ..LinearIo::new(&xb, &out, n) },
        &dummy,
    );
    let mut enc = encoder(ctx);
    {
        let mut pass = enc.begin_compute_pass(&Default::default());
        for op in &ops {
            op.record(ctx, &mut pass, m);
        }
    }
    read(ctx, enc, &out, m * n).await
}

/// Split a matrix into chunks of `rows_per_chunk` rows (test helper for the split path), in a
/// dense `storage` (f32 or f16).
pub fn matrix_in_chunks(
    ctx: &GpuContext,
    w: &[f32],
    (n, k): (usize, usize),
    bias: Option<&[f32]>,
    rows_per_chunk: usize,
    storage: WeightStorage,
) -> Result<GpuMatrix> {
    GpuMatrix::dense(ctx, "w", w, (n, k), bias, storage, rows_per_chunk.max(1))
}

/// Rows `ids` of the table `matrix` (any storage), as the decoder embeds tokens: `[ids, k]`.
pub async fn embed_rows(ctx: &GpuContext, matrix: &GpuMatrix, ids: &[u32]) -> Result<Vec<f32>> {
    let out = scratch(ctx, "out", ids.len() * matrix.k)?;
    let ids_buf = upload(ctx, "ids", bytemuck::cast_slice(ids))?;
    let step = uniform(ctx, &Step::new(0, ids.len(), ids.len()));
    let op = bind_embed_rows(ctx, &step, matrix, &ids_buf, &out);
    let mut enc = encoder(ctx);
    op.record(ctx, &mut enc.begin_compute_pass(&Default::default()), ids.len());
    read(ctx, enc, &out, ids.len() * matrix.k).await
}

/// RMSNorm of `rows` rows of `x`.
pub async fn rms_norm(ctx: &GpuContext, x: &[f32], rows: usize, w: &[f32], eps: f32) -> Result<Vec<f32>> {
    let h = w.len();
    let (xb, wb, out) = (upload(ctx, "x", x)?, upload(ctx, "w", w)?, scratch(ctx, "out", rows * h)?);
    let step = uniform(ctx, &Step::new(0, rows, rows));
    let p = uniform(ctx, &RmsNormParams { h: h as u32, eps, ..Default::default() });
    let k = &ctx.kernels.rmsnorm;
    let bind = k.bind(&ctx.device, &[&step, &p, &xb, &wb, &out]);
    let mut enc = encoder(ctx);
    {
        let mut pass = enc.begin_compute_pass(&Default::default());
        dispatch(&mut pass, k, &bind, grid(rows as u32));
    }
    read(ctx, enc, &out, rows * h).await
}

/// Shapes of one attention call.
#[derive(Debug, Clone, Copy)]
pub struct AttnShape {
    pub nh: usize,
    pub kvh: usize,
    pub d: usize,
}

/// Where the attention kernel finds keys and values: key `j` of KV head `g` at
/// `k_off + g·head_stride + j·row_stride` (values from `v_off`).
#[derive(Debug, Clone, Copy)]
pub struct KvLayout {
    pub k_off: usize,
    pub v_off: usize,
    pub row_stride: usize,
    pub head_stride: usize,
}

impl KvLayout {
    /// A KV cache of `cap` positions: `[kvh, cap, d]` in its own K and V buffers.
    pub fn cache(cap: usize, d: usize) -> Self {
        Self { k_off: 0, v_off: 0, row_stride: d, head_stride: cap * d }
    }

    /// The K and V columns of a packed `[rows, (nh + 2·kvh)·d]` q|k|v buffer.
    pub fn packed(s: AttnShape) -> Self {
        let width = (s.nh + 2 * s.kvh) * s.d;
        Self { k_off: s.nh * s.d, v_off: (s.nh + s.kvh) * s.d, row_stride: width, head_stride: s.d }
    }
}

/// Query rows one attention workgroup takes (attention.wgsl's `TQ`).
pub const ATTENTION_ROWS: usize = 8;

/// Workgroups of the attention kernel for `seqs` sequences of `seq_rows` query rows each
/// (`Step::seq_rows`) and `nh` heads: a tile never spans two sequences.
pub fn attention_groups(seqs: usize, seq_rows: usize, nh: usize) -> (u32, u32) {
    grid((seqs * seq_rows.div_ceil(ATTENTION_ROWS) * nh) as u32)
}

/// The attention kernel's uniform (attention.wgsl `P`). Queries are rows of a packed q|k|v
/// buffer; `full_keys`: `None` causal (with `window`, 0 = none), `Some(n)` every row sees keys
/// `0 .. n`.
pub fn attention_params(s: AttnShape, window: u32, full_keys: Option<usize>, kv: KvLayout) -> AttentionParams {
    AttentionParams {
        nh: s.nh as u32,
        kvh: s.kvh as u32,
        d: s.d as u32,
        scale: (s.d as f64).powf(-0.5) as f32,
        q_stride: ((s.nh + 2 * s.kvh) * s.d) as u32,
        window,
        n_keys: full_keys.map_or(0, |n| n as u32),
        k_off: kv.k_off as u32,
        v_off: kv.v_off as u32,
        row_stride: kv.row_stride as u32,
        head_stride: kv.head_stride as u32,
    }
}

impl RopeKvParams {
    /// RoPE + cache write for heads of `s` into a cache of `cap` positions, with a RoPE table of
    /// `rope_rows` rows.
    pub fn new(s: AttnShape, cap: usize, rope_rows: usize) -> Self {
        Self { nh: s.nh as u32, kvh: s.kvh as u32, d: s.d as u32, cap: cap as u32, rope_rows: rope_rows as u32 }
    }
}

/// Full (non-causal) attention of `t` rows of a packed `qkv [t, (nh + 2·kvh)·d]` over the same
/// rows' keys and values (the vision tower's): `[t, nh·d]`.
pub async fn full_attention(ctx: &GpuContext, s: AttnShape, qkv: &[f32], t: usize) -> Result<Vec<f32>> {
    let qkvb = upload(ctx, "qkv", qkv)?;
    let out = scratch(ctx, "out", t * s.nh * s.d)?;
    let step = uniform(ctx, &Step::new(0, t, t));
    let p = uniform(ctx, &attention_params(s, 0, Some(t), KvLayout::packed(s)));
    let k = &ctx.kernels.attention;
    let bind = k.bind(&ctx.device, &[&step, &p, &qkvb, &qkvb, &qkvb, &out]);
    let mut enc = encoder(ctx);
    dispatch(&mut enc.begin_compute_pass(&Default::default()), k, &bind, attention_groups(1, t, s.nh));
    read(ctx, enc, &out, t * s.nh * s.d).await
}

/// RoPE + KV-cache write + causal GQA attention for `t` new rows at positions `start ..`.
/// `qkv`: `[t, (nh + 2·kvh)·d]` (q heads, k heads, v heads); `prior_k` / `prior_v`: the cache
/// for positions `0..start`, `[kvh, start, d]`; `cos` / `sin`: `[t, d/2]`.
/// Returns `(qkv after RoPE, attention output [t, nh·d])`.
#[allow(clippy::too_many_arguments)]
pub async fn rope_attention(
    ctx: &GpuContext,
    s: AttnShape,
    qkv: &[f32],
    t: usize,
    start: usize,
    prior_k: &[f32],
    prior_v: &[f32],
    cos: &[f32],
    sin: &[f32],
) -> Result<(Vec<f32>, Vec<f32>)> {
    let cap = start + t + 3; // deliberately not the exact length
    let mut kc = vec![0f32; s.kvh * cap * s.d];
    let mut vc = vec![0f32; s.kvh * cap * s.d];
    for h in 0..s.kvh {
        for p in 0..start {
            let src = (h * start + p) * s.d;
            let dst = (h * cap + p) * s.d;
            kc[dst..dst + s.d].copy_from_slice(&prior_k[src..src + s.d]);
            vc[dst..dst + s.d].copy_from_slice(&prior_v[src..src + s.d]);
        }
    }
    let (kb, vb) = (upload(ctx, "k", &kc)?, upload(ctx, "v", &vc)?);
    let qkvb = upload(ctx, "qkv", qkv)?;
    let mut table = cos.to_vec();
    table.extend_from_slice(sin);
    let rope = upload(ctx, "rope", &table)?;
    let out = scratch(ctx, "out", t * s.nh * s.d)?;
    let step = uniform(ctx, &Step::new(start, t, start + t));
    let half = s.d / 2;
    let p_rope = uniform(ctx, &RopeKvParams::new(s, cap, t));
    let width = (s.nh + 2 * s.kvh) * s.d;
    let p_att = uniform(ctx, &attention_params(s, 0, None, KvLayout::cache(cap, s.d)));
    let k = &ctx.kernels;
    let b_rope = k.rope_kv.bind(&ctx.device, &[&step, &p_rope, &qkvb, &rope, &kb, &vb]);
    let b_att = k.attention.bind(&ctx.device, &[&step, &p_att, &qkvb, &kb, &vb, &out]);
    let mut enc = encoder(ctx);
    {
        let mut pass = enc.begin_compute_pass(&Default::default());
        let threads = t * (s.nh + 2 * s.kvh) * half;
        dispatch(&mut pass, &k.rope_kv, &b_rope, grid(threads.div_ceil(64) as u32));
        dispatch(&mut pass, &k.attention, &b_att, attention_groups(1, t, s.nh));
    }
    let attn = read(ctx, enc, &out, t * s.nh * s.d).await?;
    let roped = read(ctx, encoder(ctx), &qkvb, t * width).await?;
    Ok((roped, attn))
}

/// `act(gu[:, :m]) * gu[:, m:]` for `t` rows of `gu [t, 2m]`; `act`: 0 SiLU, 1 GELU-tanh.
pub async fn act_mul(ctx: &GpuContext, gu: &[f32], t: usize, m: usize, act: u32) -> Result<Vec<f32>> {
    let (gub, out) = (upload(ctx, "gu", gu)?, scratch(ctx, "out", t * m)?);
    let step = uniform(ctx, &Step::new(0, t, t));
    let p = uniform(ctx, &ActParams { m: m as u32, act });
    let k = &ctx.kernels.act_mul;
    let bind = k.bind(&ctx.device, &[&step, &p, &gub, &out]);
    let mut enc = encoder(ctx);
    {
        let mut pass = enc.begin_compute_pass(&Default::default());
        dispatch(&mut pass, k, &bind, grid((t * m).div_ceil(64) as u32));
    }
    read(ctx, enc, &out, t * m).await
}

/// The `activate` code (common.wgsl) of an activation.
pub fn activation_code(act: crate::config::Activation) -> u32 {
    use crate::config::Activation;
    match act {
        Activation::Silu => 0,
        Activation::GeluTanh => 1,
        Activation::Gelu => 2,
        Activation::QuickGelu => 3,
        Activation::Relu => 4,
    }
}

/// `act(x)` in place on `rows` rows of `m` values.
pub async fn activate(ctx: &GpuContext, x: &[f32], rows: usize, m: usize, act: u32) -> Result<Vec<f32>> {
    let xb = upload(ctx, "x", x)?;
    let step = uniform(ctx, &Step::new(0, rows, rows));
    let p = uniform(ctx, &ActParams { m: m as u32, act });
    let k = &ctx.kernels.act;
    let bind = k.bind(&ctx.device, &[&step, &p, &xb]);
    let mut enc = encoder(ctx);
    dispatch(&mut enc.begin_compute_pass(&Default::default()), k, &bind, grid((rows * m).div_ceil(64) as u32));
    read(ctx, enc, &xb, rows * m).await
}

/// LayerNorm of `rows` rows of `x` with weight `w` and bias `b`.
pub async fn layer_norm(ctx: &GpuContext, x: &[f32], rows: usize, w: &[f32], b: &[f32], eps: f32) -> Result<Vec<f32>> {
    let h = w.len();
    let (xb, wb, bb, out) =
        (upload(ctx, "x", x)?, upload(ctx, "w", w)?, upload(ctx, "b", b)?, scratch(ctx, "out", rows * h)?);
    let step = uniform(ctx, &Step::new(0, rows, rows));
    let p = uniform(ctx, &LayerNormParams { h: h as u32, eps });
    let k = &ctx.kernels.layernorm;
    let bind = k.bind(&ctx.device, &[&step, &p, &xb, &wb, &bb, &out]);
    let mut enc = encoder(ctx);
    dispatch(&mut enc.begin_compute_pass(&Default::default()), k, &bind, grid(rows as u32));
    read(ctx, enc, &out, rows * h).await
}

/// The steer kernel's `mode` for a positions rule (steer.wgsl).
pub fn steer_mode(positions: crate::steering::Positions) -> u32 {
    use crate::steering::Positions;
    match positions {
        Positions::All => 0,
        Positions::Last => 1,
        Positions::Generated => 2,
        Positions::LastAndGenerated => 3,
    }
}

/// Steering add on `t` rows of `x [t, h]` at positions `start ..`; `mode`: [`steer_mode`].
pub async fn steer(
    ctx: &GpuContext,
    x: &[f32],
    t: usize,
    delta: &[f32],
    mode: u32,
    start: usize,
    prompt_len: usize,
) -> Result<Vec<f32>> {
    let h = delta.len();
    let (xb, db) = (upload(ctx, "x", x)?, upload(ctx, "delta", delta)?);
    let step = uniform(ctx, &Step::new(start, t, prompt_len));
    let p = uniform(ctx, &SteerParams { h: h as u32, mode, seq: 0 });
    let k = &ctx.kernels.steer;
    let bind = k.bind(&ctx.device, &[&step, &p, &xb, &db]);
    let mut enc = encoder(ctx);
    {
        let mut pass = enc.begin_compute_pass(&Default::default());
        dispatch(&mut pass, k, &bind, grid((t * h).div_ceil(64) as u32));
    }
    read(ctx, enc, &xb, t * h).await
}

/// Index of the first maximum.
pub async fn argmax(ctx: &GpuContext, v: &[f32]) -> Result<u32> {
    let vb = upload(ctx, "v", v)?;
    let out = scratch(ctx, "out", 1)?;
    let p = uniform(ctx, &ArgmaxParams { n: v.len() as u32 });
    let k = &ctx.kernels.argmax;
    let bind = k.bind(&ctx.device, &[&p, &vb, &out]);
    let mut enc = encoder(ctx);
    {
        let mut pass = enc.begin_compute_pass(&Default::default());
        dispatch(&mut pass, k, &bind, (1, 1));
    }
    let bytes = ctx.submit_and_read(enc, &out, 4).await?;
    Ok(u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
}

/// A tiny matmul + RMSNorm checked against a CPU reference: a broken driver or a kernel
/// miscompile fails here instead of producing wrong text later.
pub async fn self_test(ctx: &GpuContext) -> Result<()> {
    let (m, k, n) = (3usize, 37usize, 21usize);
    let x: Vec<f32> = (0..m * k).map(|i| ((i * 7 % 13) as f32 - 6.0) / 8.0).collect();
    let w: Vec<f32> = (0..n * k).map(|i| ((i * 5 % 11) as f32 - 5.0) / 16.0).collect();
    let b: Vec<f32> = (0..n).map(|i| i as f32 / 10.0).collect();
    let want: Vec<f32> = (0..m * n)
        .map(|e| {
            let (r, c) = (e / n, e % n);
            (0..k).map(|j| x[r * k + j] * w[c * k + j]).sum::<f32>() + b[c]
        })
        .collect();
    for rows in [m, 1] {
        let got = linear(ctx, &x[..rows * k], rows, &w, Some(&b), n).await?;
        let worst = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        if worst.is_nan() || worst > 1e-4 {
            anyhow::bail!("matmul ({rows} rows) differs from the CPU by {worst:e}");
        }
    }
    let g: Vec<f32> = (0..k).map(|i| 1.0 + i as f32 / 50.0).collect();
    let got = rms_norm(ctx, &x, m, &g, 1e-5).await?;
    for r in 0..m {
        let row = &x[r * k..(r + 1) * k];
        let s = (row.iter().map(|v| v * v).sum::<f32>() / k as f32 + 1e-5).sqrt();
        for j in 0..k {
            let d = (got[r * k + j] - row[j] / s * g[j]).abs();
            if d.is_nan() || d > 1e-4 {
                anyhow::bail!("rms_norm differs from the CPU by {d:e}");
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod attention_tile {
    /// The dispatch size assumes the kernel's tile height.
    #[test]
    fn the_kernel_takes_attention_rows_per_workgroup() {
        let source = include_str!("shaders/attention.wgsl");
        assert!(source.contains(&format!("const TQ: u32 = {}u;", super::ATTENTION_ROWS)));
    }
}
