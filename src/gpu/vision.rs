//! [`GpuVision`]: the CLIP / SigLIP vision tower and the projector of [`LlavaModel`] on the
//! wgpu kernels — `pixel_values` in, `image_features` `[n_img, H]` out, the same values as
//! `LlavaModel::encode_image`.
//!
//! Per image: position embeddings (+ CLS) copied into the residual stream, the patch embedding
//! (the patches, cut on the CPU, times the conv kernel as a matrix) added to them, CLIP's
//! pre-norm; then one submission per encoder layer — LayerNorm → fused QKV → full attention →
//! out_proj (+ residual) → LayerNorm → fc1 → activation → fc2 (+ residual) — for the layers up to
//! the last selected hidden state only; with several selected (`vision_feature_layer` a list),
//! each is copied, as it is produced, into its columns of a `[positions, k·Hv]` matrix (in the
//! list's order, as transformers concatenates them); then, in a submission of its own (timed
//! apart), the projector (linear → activation → linear) on the selected rows (CLS dropped for
//! the `default` strategy). Only the image features come back.

use std::sync::Arc;

use anyhow::{bail, Result};
use candle_core::{Device, Tensor};
use candle_nn::LayerNorm;

use super::buffers::{bind_linear, scratch, uniform, upload, GpuMatrix, LinearIo, LinearOp};
use super::context::GpuContext;
use super::decoder::{f32s, GpuWeights, InFlight, Upload};
use super::kernels::{dispatch, grid};
use super::ops::{activation_code, attention_groups, attention_params, AttnShape, KvLayout};
use super::params::{ActParams, CopyRowsParams, LayerNormParams, Step};
use super::storage::WeightStorage;
use crate::config::{Activation, FeatureSelect, LlavaConfig, VisionKind};
use crate::generate::now_seconds;
use crate::models::llava::LlavaModel;
use crate::pipeline::{EncodedImage, StageTime};
use crate::text::LinearRef;
use crate::vision::{VisionEmbeddingWeights, VisionLayerWeights};

struct Norm {
    _w: wgpu::Buffer,
    _b: wgpu::Buffer,
    bind: wgpu::BindGroup,
}

struct Layer {
    _matrices: [GpuMatrix; 4],
    norm1: Norm,
    qkv_ops: Vec<LinearOp>,
    attn_bind: wgpu::BindGroup,
    out_ops: Vec<LinearOp>,
    norm2: Norm,
    fc1_ops: Vec<LinearOp>,
    act_bind: wgpu::BindGroup,
    fc2_ops: Vec<LinearOp>,
}

pub struct GpuVision {
    ctx: Arc<GpuContext>,
    /// Positions (patches, + 1 for CLIP's CLS), patches, the vision width and the image
    /// features' rows and width.
    positions: usize,
    n_patches: usize,
    patch_len: usize,
    hv: usize,
    n_img: usize,
    h: usize,
    _step: wgpu::Buffer,
    patches: wgpu::Buffer,
    position_init: wgpu::Buffer,
    x: wgpu::Buffer,
    xn: wgpu::Buffer,
    features: wgpu::Buffer,
    _scratch: Vec<wgpu::Buffer>,
    _matrices: Vec<GpuMatrix>,
    /// Per hidden state (0 = the encoder input), the copies of it into the concatenated
    /// features (none with one selected layer: the projector reads `x`).
    captures: Vec<Vec<wgpu::BindGroup>>,
    patch_ops: Vec<LinearOp>,
    pre_norm: Option<Norm>,
    layers: Vec<Layer>,
    projector_1_ops: Vec<LinearOp>,
    projector_act_bind: wgpu::BindGroup,
    projector_2_ops: Vec<LinearOp>,
    _params: Vec<wgpu::Buffer>,
    in_flight: std::sync::atomic::AtomicBool,
}

/// The embeddings on the GPU ([`GpuVisionBuilder::push_embeddings`]).
struct Embeddings {
    patches: wgpu::Buffer,
    position_init: wgpu::Buffer,
    _patch_m: GpuMatrix,
    patch_ops: Vec<LinearOp>,
    pre_norm: Option<Norm>,
}

/// The projector on the GPU ([`GpuVisionBuilder::push_projector`]).
struct ProjectorOps {
    _matrices: [GpuMatrix; 2],
    projected: wgpu::Buffer,
    features: wgpu::Buffer,
    ops_1: Vec<LinearOp>,
    _p_act: wgpu::Buffer,
    act_bind: wgpu::BindGroup,
    ops_2: Vec<LinearOp>,
}

/// A [`GpuVision`] uploaded a piece at a time (as [`GpuDecoderBuilder`](super::decoder::GpuDecoderBuilder)):
/// scratch buffers from the config ([`Self::new`]), then, in any order as their weights arrive,
/// each encoder layer up to the last selected one ([`Self::push_layer`]), the embeddings
/// ([`Self::push_embeddings`]) and the projector ([`Self::push_projector`]); then
/// [`Self::finish`].
pub struct GpuVisionBuilder {
    ctx: Arc<GpuContext>,
    dense: WeightStorage,
    keep_blocks: bool,
    /// CLIP's CLS row leads the positions (and is dropped for the `default` strategy).
    has_cls: bool,
    drop_cls: bool,
    /// Patches per image and values per patch (3·p·p).
    n_patches: usize,
    patch_len: usize,
    positions: usize,
    hv: usize,
    inter: usize,
    h: usize,
    step: wgpu::Buffer,
    dummy: wgpu::Buffer,
    x: wgpu::Buffer,
    xn: wgpu::Buffer,
    qkv: wgpu::Buffer,
    attn: wgpu::Buffer,
    mlp: wgpu::Buffer,
    p_norm: wgpu::Buffer,
    p_attn: wgpu::Buffer,
    params: Vec<wgpu::Buffer>,
    layers: Vec<Option<Layer>>,
    /// Several selected hidden states are copied, each as it is produced (`captures`, per
    /// hidden state), into their columns of `selected`, `[positions, k·Hv]`, which the
    /// projector reads; with one, the projector reads the residual stream.
    selected: Option<wgpu::Buffer>,
    captures: Vec<Vec<wgpu::BindGroup>>,
    /// The projector's input width (k·Hv).
    width: usize,
    embeddings: Option<Embeddings>,
    projector: Option<ProjectorOps>,
}

impl GpuVisionBuilder {
    /// Check what the GPU tower does (head_dim ≤ 256) and allocate its scratch buffers.
    pub fn new(ctx: Arc<GpuContext>, cfg: &LlavaConfig, weights: GpuWeights) -> Result<Self> {
        let vc = &cfg.vision;
        let feature_layers = cfg.vision_feature_layers.clone();
        let Some(&last) = feature_layers.iter().max() else {
            bail!("no vision hidden state is selected (vision_feature_layer is an empty list)");
        };
        if last > vc.num_hidden_layers {
            bail!("vision hidden state {last} is selected, the tower has {} layers", vc.num_hidden_layers);
        }
        let (hv, nh, inter) = (vc.hidden_size, vc.num_attention_heads, vc.intermediate_size);
        let d = vc.head_dim();
        if d > 256 {
            bail!("vision head_dim {d} is not supported by the GPU attention kernel (≤ 256)");
        }
        let positions = vc.num_positions();
        let has_cls = vc.kind == VisionKind::Clip;
        let drop_cls = cfg.feature_select == FeatureSelect::Default && has_cls;
        let shape = AttnShape { nh, kvh: nh, d };
        let eps = vc.layer_norm_eps as f32;
        let step = uniform(&ctx, &Step::new(0, positions, positions));
        let x = scratch(&ctx, "vision_x", positions * hv)?;
        let width = hv * feature_layers.len();
        let mut params = Vec::new();
        let mut captures: Vec<Vec<wgpu::BindGroup>> = (0..=last).map(|_| Vec::new()).collect();
        let selected = if feature_layers.len() > 1 {
            let selected = scratch(&ctx, "vision_selected", positions * width)?;
            for (slot, &state) in feature_layers.iter().enumerate() {
                let p = uniform(&ctx, &CopyRowsParams::as_columns(positions, hv, width, slot * hv));
                captures[state].push(ctx.kernels.copy_rows.bind(&ctx.device, &[&step, &p, &x, &selected]));
                params.push(p);
            }
            Some(selected)
        } else {
            None
        };
        Ok(Self {
            dense: weights.dense_storage(&ctx.adapter_info),
            keep_blocks: weights.keeps_blocks(),
            has_cls,
            drop_cls,
            n_patches: positions - usize::from(has_cls),
            patch_len: vc.num_channels * vc.patch_size * vc.patch_size,
            positions,
            hv,
            inter,
            h: cfg.text.hidden_size,
            step,
            dummy: scratch(&ctx, "dummy", 1)?,
            x,
            xn: scratch(&ctx, "vision_xn", positions * hv)?,
            qkv: scratch(&ctx, "vision_qkv", positions * 3 * hv)?,
            attn: scratch(&ctx, "vision_attn", positions * hv)?,
            mlp: scratch(&ctx, "vision_mlp", positions * inter)?,
            p_norm: uniform(&ctx, &LayerNormParams { h: hv as u32, eps }),
            p_attn: uniform(&ctx, &attention_params(shape, 0, Some(positions), KvLayout::packed(shape))),
            params,
            layers: (0..last).map(|_| None).collect(),
            selected,
            captures,
            width,
            embeddings: None,
            projector: None,
            ctx,
        })
    }

    /// Encoder layers the selected hidden states need (`0 .. n`); later ones are not uploaded.
    pub fn layers_needed(&self) -> usize {
        self.layers.len()
    }

    /// Needed layers not uploaded yet.
    pub fn missing_layers(&self) -> Vec<usize> {
        (0..self.layers.len()).filter(|&l| self.layers[l].is_none()).collect()
    }

    fn norm(&self, name: &str, ln: &LayerNorm, src: &wgpu::Buffer, dst: &wgpu::Buffer) -> Result<Norm> {
        let ctx = &self.ctx;
        let wb = upload(ctx, name, &f32s(ln.weight())?)?;
        let bb = match ln.bias() {
            Some(b) => upload(ctx, name, &f32s(b)?)?,
            None => upload(ctx, name, &vec![0f32; self.hv])?,
        };
        let bind = ctx.kernels.layernorm.bind(&ctx.device, &[&self.step, &self.p_norm, src, &wb, &bb, dst]);
        Ok(Norm { _w: wb, _b: bb, bind })
    }

    /// Upload encoder layer `l` (< [`Self::layers_needed`]).
    pub fn push_layer(&mut self, l: usize, lw: &VisionLayerWeights) -> Result<()> {
        match self.layers.get(l) {
            None => bail!("vision layer {l} is past the last selected hidden state {}", self.layers.len()),
            Some(Some(_)) => bail!("vision layer {l} was uploaded twice"),
            Some(None) => {}
        }
        let (hv, inter, positions) = (self.hv, self.inter, self.positions);
        let ctx = &self.ctx;
        let up = Upload { ctx, dense: self.dense, keep_blocks: self.keep_blocks };
        let (step, dummy) = (&self.step, &self.dummy);
        let qkv_m = up.stacked("vision_qkv", &[lw.q_proj, lw.k_proj, lw.v_proj], hv)?;
        let out_m = up.one("vision_out_proj", lw.out_proj, hv)?;
        let fc1_m = up.one("vision_fc1", lw.fc1, hv)?;
        let fc2_m = up.one("vision_fc2", lw.fc2, inter)?;
        let p_act = uniform(ctx, &ActParams { m: inter as u32, act: activation_code(lw.act) });
        let k = &ctx.kernels;
        let dev = &ctx.device;
        let layer = Layer {
            norm1: self.norm("layer_norm1", lw.layer_norm1, &self.x, &self.xn)?,
            qkv_ops: bind_linear(ctx, step, &qkv_m, LinearIo::new(&self.xn, &self.qkv, 3 * hv).rows(positions), dummy),
            attn_bind: k.attention.bind(dev, &[step, &self.p_attn, &self.qkv, &self.qkv, &self.qkv, &self.attn]),
            out_ops: bind_linear(
                ctx,
                step,
                &out_m,
                LinearIo::new(&self.attn, &self.x, hv).rows(positions).accumulate(),
                dummy,
            ),
            norm2: self.norm("layer_norm2", lw.layer_norm2, &self.x, &self.xn)?,
            fc1_ops: bind_linear(ctx, step, &fc1_m, LinearIo::new(&self.xn, &self.mlp, inter).rows(positions), dummy),
            act_bind: k.act.bind(dev, &[step, &p_act, &self.mlp]),
            fc2_ops: bind_linear(
                ctx,
                step,
                &fc2_m,
                LinearIo::new(&self.mlp, &self.x, hv).rows(positions).accumulate(),
                dummy,
            ),
            _matrices: [qkv_m, out_m, fc1_m, fc2_m],
        };
        self.params.push(p_act);
        self.layers[l] = Some(layer);
        Ok(())
    }

    /// Upload the patch and position embeddings and CLIP's pre-norm.
    pub fn push_embeddings(&mut self, w: &VisionEmbeddingWeights) -> Result<()> {
        if self.embeddings.is_some() {
            bail!("the vision embeddings were uploaded twice");
        }
        let (positions, _) = w.position_embedding.dims2()?;
        if positions != self.positions {
            bail!("{positions} vision position embeddings, the config gives {}", self.positions);
        }
        if w.class_embedding.is_some() != self.has_cls {
            bail!("the vision embeddings do not fit the config's tower (a class embedding only in CLIP)");
        }
        let (patch_len, _) = w.patch_weight_t.dims2()?;
        if patch_len != self.patch_len {
            bail!("patches of {patch_len} values, the config gives {}", self.patch_len);
        }
        let (ctx, hv, n_patches) = (&self.ctx, self.hv, self.n_patches);
        let up = Upload { ctx, dense: self.dense, keep_blocks: self.keep_blocks };
        let patches = scratch(ctx, "patches", n_patches * patch_len)?;
        // The residual stream starts as the position embeddings, with the CLS embedding added to row 0.
        let mut init = f32s(w.position_embedding)?;
        if let Some(cls) = w.class_embedding {
            for (v, c) in init.iter_mut().zip(f32s(cls)?) {
                *v += c;
            }
        }
        let position_init = upload(ctx, "position_init", &init)?;
        let patch_weight = w.patch_weight_t.t()?.contiguous()?; // [H, 3·p·p]
        let patch_m =
            up.one("patch_embedding", (crate::quant::MatrixRef::Dense(&patch_weight), w.patch_bias), patch_len)?;
        // Patch rows go after the CLS row (when there is one), added to the position embeddings.
        let at = if self.has_cls { hv } else { 0 };
        let patch_io = LinearIo::new(&patches, &self.x, hv).rows(n_patches).at(at).accumulate();
        let patch_ops = bind_linear(ctx, &self.step, &patch_m, patch_io, &self.dummy);
        let pre_norm = w.pre_layrnorm.map(|ln| self.norm("pre_layrnorm", ln, &self.x, &self.xn)).transpose()?;
        self.embeddings = Some(Embeddings { patches, position_init, _patch_m: patch_m, patch_ops, pre_norm });
        Ok(())
    }

    /// Upload the projector (linear → activation → linear) over the selected features.
    pub fn push_projector(&mut self, projector: (LinearRef, Activation, LinearRef)) -> Result<()> {
        if self.projector.is_some() {
            bail!("the projector was uploaded twice");
        }
        let (ctx, step, dummy) = (&self.ctx, &self.step, &self.dummy);
        let (positions, width, h) = (self.positions, self.width, self.h);
        let n_img = positions - usize::from(self.drop_cls);
        let up = Upload { ctx, dense: self.dense, keep_blocks: self.keep_blocks };
        // The projector's rows (every position's row is sized: the activation runs over step.t rows).
        let projected = scratch(ctx, "projector_hidden", positions * h)?;
        let features = scratch(ctx, "image_features", n_img * h)?;
        let (linear_1, act, linear_2) = projector;
        let p1 = up.one("projector_linear_1", linear_1, width)?;
        let p2 = up.one("projector_linear_2", linear_2, h)?;
        let input = self.selected.as_ref().unwrap_or(&self.x);
        let cls_off = if self.drop_cls { width } else { 0 };
        let ops_1 = bind_linear(ctx, step, &p1, LinearIo::new(input, &projected, h).from(cls_off).rows(n_img), dummy);
        let p_act = uniform(ctx, &ActParams { m: h as u32, act: activation_code(act) });
        let act_bind = ctx.kernels.act.bind(&ctx.device, &[step, &p_act, &projected]);
        let ops_2 = bind_linear(ctx, step, &p2, LinearIo::new(&projected, &features, h).rows(n_img), dummy);
        self.projector =
            Some(ProjectorOps { _matrices: [p1, p2], projected, features, ops_1, _p_act: p_act, act_bind, ops_2 });
        Ok(())
    }

    pub fn has_embeddings(&self) -> bool {
        self.embeddings.is_some()
    }

    pub fn has_projector(&self) -> bool {
        self.projector.is_some()
    }

    /// The tower, once every needed layer, the embeddings and the projector are in.
    pub fn finish(self) -> Result<GpuVision> {
        let missing = self.missing_layers();
        if !missing.is_empty() {
            bail!("vision layers {missing:?} never arrived (the weight file lacks them)");
        }
        let Self {
            ctx,
            step,
            dummy,
            x,
            xn,
            qkv,
            attn,
            mlp,
            p_norm,
            p_attn,
            mut params,
            layers,
            selected,
            captures,
            embeddings,
            projector,
            positions,
            n_patches,
            patch_len,
            hv,
            h,
            drop_cls,
            ..
        } = self;
        let Some(e) = embeddings else { bail!("the vision embeddings never arrived") };
        let Some(p) = projector else { bail!("the projector never arrived") };
        params.extend([p_attn, p_norm]);
        Ok(GpuVision {
            positions,
            n_patches,
            patch_len,
            hv,
            n_img: positions - usize::from(drop_cls),
            h,
            _step: step,
            patches: e.patches,
            position_init: e.position_init,
            x,
            xn,
            features: p.features,
            _scratch: [dummy, qkv, attn, mlp, p.projected].into_iter().chain(selected).collect(),
            _matrices: p._matrices.into_iter().chain([e._patch_m]).collect(),
            captures,
            patch_ops: e.patch_ops,
            pre_norm: e.pre_norm,
            layers: layers.into_iter().flatten().collect(),
            projector_1_ops: p.ops_1,
            projector_act_bind: p.act_bind,
            projector_2_ops: p.ops_2,
            _params: params.into_iter().chain([p._p_act]).collect(),
            in_flight: std::sync::atomic::AtomicBool::new(false),
            ctx,
        })
    }
}

impl GpuVision {
    /// Upload the vision tower (the layers the selected hidden states need) and the projector.
    /// Errors (never panics) for what the GPU tower does not do (head_dim over 256) or when the
    /// adapter cannot hold them; the caller keeps the CPU tower then.
    pub async fn new(ctx: Arc<GpuContext>, model: &LlavaModel, weights: GpuWeights) -> Result<Self> {
        ctx.clone().scoped_build("the vision tower", || Self::build(ctx, model, weights)).await
    }

    fn build(ctx: Arc<GpuContext>, model: &LlavaModel, weights: GpuWeights) -> Result<Self> {
        let w = model.vision.weights()?;
        let mut builder = GpuVisionBuilder::new(ctx, &model.config, weights)?;
        for (l, lw) in w.layers.iter().enumerate().take(builder.layers_needed()) {
            builder.push_layer(l, lw)?;
        }
        builder.push_embeddings(&w.embeddings)?;
        builder.push_projector(model.projector()?.weights())?;
        builder.finish()
    }

    /// `pixel_values` `[1, 3, S, S]` → `image_features` `[n_img, H]` (on the CPU).
    pub async fn encode(&self, model: &LlavaModel, pixel_values: &Tensor) -> Result<Tensor> {
        Ok(self.encode_timed(model, pixel_values).await?.features)
    }

    /// [`Self::encode`] with the seconds of the tower (patches cut on the CPU, then the encoder
    /// layers) and of the projector: two submissions, the first awaited (a 4-byte read-back).
    pub async fn encode_timed(&self, model: &LlavaModel, pixel_values: &Tensor) -> Result<EncodedImage> {
        let t0 = now_seconds();
        self.ctx.check_health()?;
        let _in_flight = InFlight::enter(&self.in_flight, "another image is being encoded on this GPU vision tower")?;
        let patches = f32s(&model.vision.patches(pixel_values)?)?;
        if patches.len() != self.n_patches * self.patch_len {
            bail!(
                "pixel_values give {} patch values, the GPU tower expects {}",
                patches.len(),
                self.n_patches * self.patch_len
            );
        }
        let ctx = &self.ctx;
        ctx.queue.write_buffer(&self.patches, 0, bytemuck::cast_slice(&patches));
        let row_bytes = (self.hv * 4) as u64;
        let mut enc =
            ctx.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("vision embeddings") });
        enc.copy_buffer_to_buffer(&self.position_init, 0, &self.x, 0, self.positions as u64 * row_bytes);
        let t = self.positions;
        let rows_grid = grid(t as u32);
        let k = &ctx.kernels;
        {
            let mut pass = enc.begin_compute_pass(&Default::default());
            for op in &self.patch_ops {
                op.record(ctx, &mut pass, t);
            }
            if let Some(norm) = &self.pre_norm {
                dispatch(&mut pass, &k.layernorm, &norm.bind, rows_grid);
            }
        }
        if self.pre_norm.is_some() {
            enc.copy_buffer_to_buffer(&self.xn, 0, &self.x, 0, t as u64 * row_bytes);
        }
        if !self.captures[0].is_empty() {
            let mut pass = enc.begin_compute_pass(&Default::default());
            self.record_captures(&mut pass, 0);
        }
        // One submission per encoder layer: a GPU watchdog (Windows' TDR, a browser's) limits
        // how long one command buffer may run, and a whole tower can exceed it on a slow GPU.
        let heads = model.config.vision.num_attention_heads;
        let inter = model.config.vision.intermediate_size;
        for (l, layer) in self.layers.iter().enumerate() {
            ctx.submit(enc);
            enc = ctx.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("vision layer") });
            let mut pass = enc.begin_compute_pass(&Default::default());
            dispatch(&mut pass, &k.layernorm, &layer.norm1.bind, rows_grid);
            layer.qkv_ops.iter().for_each(|op| op.record(ctx, &mut pass, t));
            dispatch(&mut pass, &k.attention, &layer.attn_bind, attention_groups(1, t, heads));
            layer.out_ops.iter().for_each(|op| op.record(ctx, &mut pass, t));
            dispatch(&mut pass, &k.layernorm, &layer.norm2.bind, rows_grid);
            layer.fc1_ops.iter().for_each(|op| op.record(ctx, &mut pass, t));
            dispatch(&mut pass, &k.act, &layer.act_bind, grid((t * inter).div_ceil(64) as u32));
            layer.fc2_ops.iter().for_each(|op| op.record(ctx, &mut pass, t));
            self.record_captures(&mut pass, l + 1);
        }
        ctx.submit_and_read(enc, &self.x, 4).await?;
        let t1 = now_seconds();
        let mut enc = ctx.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("projector") });
        {
            let mut pass = enc.begin_compute_pass(&Default::default());
            self.projector_1_ops.iter().for_each(|op| op.record(ctx, &mut pass, t));
            dispatch(&mut pass, &k.act, &self.projector_act_bind, grid((t * self.h).div_ceil(64) as u32));
            self.projector_2_ops.iter().for_each(|op| op.record(ctx, &mut pass, t));
        }
        let bytes = ctx.submit_and_read(enc, &self.features, (self.n_img * self.h * 4) as u64).await?;
        let values: Vec<f32> = bytemuck::cast_slice(&bytes).to_vec();
        let features = Tensor::from_vec(values, (self.n_img, self.h), &Device::Cpu)?;
        let t2 = now_seconds();
        Ok(EncodedImage { features, vision: StageTime::webgpu(t1 - t0), projector: StageTime::webgpu(t2 - t1) })
    }

    /// Copy hidden state `state` (now in `x`) into its columns of the concatenated features.
    fn record_captures(&self, pass: &mut wgpu::ComputePass, state: usize) {
        let elems = grid((self.positions * self.hv).div_ceil(64) as u32);
        for bind in &self.captures[state] {
            dispatch(pass, &self.ctx.kernels.copy_rows, bind, elems);
        }
    }

    /// Blocking [`Self::new`] (native).
    #[cfg(not(target_arch = "wasm32"))]
    pub fn new_blocking(ctx: Arc<GpuContext>, model: &LlavaModel, weights: GpuWeights) -> Result<Self> {
        pollster::block_on(Self::new(ctx, model, weights))
    }

    /// Blocking [`Self::encode`] (native).
    #[cfg(not(target_arch = "wasm32"))]
    pub fn encode_blocking(&self, model: &LlavaModel, pixel_values: &Tensor) -> Result<Tensor> {
        pollster::block_on(self.encode(model, pixel_values))
    }
}
