//! CMRM (arXiv 2410.09047): the shift a meaningless image causes in the decoder's last-token
//! states, `d_l(x) = h_l(x, img') − h_l(x)`, averaged over a calibration set (dataset-level) or
//! taken for the current prompt (sample-level). Steering then applies `h_l ← h_l − α·v_l`.

use std::collections::{BTreeMap, HashMap};

use anyhow::{bail, Context, Result};
use candle_core::Tensor;

use crate::backend::DecoderBackend;
use crate::generate::run_ready;
use crate::image::RgbImage;
use crate::pipeline::{PromptText, Vlm};
use crate::steering::{SteeringVectors, VECTORS_FORMAT};

/// The meaningless image that stands in for a real one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Anchor {
    /// A white image at the processor's input size.
    Blank,
    /// Uniform random RGB at the processor's input size, from a seed.
    Noise { seed: u64 },
}

impl Anchor {
    pub fn parse(name: &str, seed: u64) -> Result<Self> {
        match name {
            "blank" => Ok(Self::Blank),
            "noise" => Ok(Self::Noise { seed }),
            other => bail!("anchor must be blank or noise (got '{other}')"),
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Self::Blank => "blank",
            Self::Noise { .. } => "noise",
        }
    }

    /// The anchor image, `size × size`.
    pub fn image(&self, size: usize) -> RgbImage {
        match *self {
            Self::Blank => RgbImage::filled(size, size, [255, 255, 255]),
            Self::Noise { seed } => {
                use rand::{Rng, SeedableRng};
                let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
                let data = (0..size * size * 3).map(|_| rng.random::<u8>()).collect();
                RgbImage { width: size, height: size, data, transparent_color: None }
            }
        }
    }
}

/// `image_features` of an anchor for this model (encoded once, reused for every prompt).
pub fn anchor_features(vlm: &Vlm, anchor: Anchor) -> Result<Tensor> {
    run_ready(anchor_features_on(&DecoderBackend::Cpu, vlm, anchor))
}

/// [`anchor_features`] encoded on `backend`.
pub async fn anchor_features_on(backend: &DecoderBackend, vlm: &Vlm, anchor: Anchor) -> Result<Tensor> {
    let image = anchor.image(vlm.config().vision.image_size);
    Ok(backend.encode_image_async(vlm, &image).await?.features)
}

/// Last-prompt-token outputs of every decoder block, `[L][H]`, for a full prompt with or without
/// image features, on `backend`.
pub async fn last_token_states_on(
    backend: &DecoderBackend,
    vlm: &Vlm,
    prompt: &str,
    image_features: Option<&Tensor>,
) -> Result<Vec<Vec<f32>>> {
    let prepared = if image_features.is_some() {
        backend.prepare_prompt_async(vlm, prompt, image_features.as_slice()).await?
    } else {
        backend.prepare_text_only_async(vlm, prompt).await?
    };
    backend.layer_outputs_async(vlm, &prepared, None).await
}

/// `d_l(x) = h_l(x, img) − h_l(x)` for one question (the chat template builds both prompts).
pub fn shift_for_prompt(vlm: &Vlm, text: &PromptText, image_features: &Tensor) -> Result<Vec<Vec<f32>>> {
    run_ready(shift_for_prompt_on(&DecoderBackend::Cpu, vlm, text, image_features))
}

/// [`shift_for_prompt`] with the two prefills on `backend`.
pub async fn shift_for_prompt_on(
    backend: &DecoderBackend,
    vlm: &Vlm,
    text: &PromptText,
    image_features: &Tensor,
) -> Result<Vec<Vec<f32>>> {
    let prompt = vlm.prompt_text(text, 1)?;
    let with_image = last_token_states_on(backend, vlm, &prompt, Some(image_features)).await?;
    let text_only = last_token_states_on(backend, vlm, &prompt, None).await?;
    Ok(with_image.iter().zip(&text_only).map(|(m, t)| m.iter().zip(t).map(|(a, b)| a - b).collect()).collect())
}

/// Sample-level vectors for the current prompt: two extra prefills (anchor image, text-only).
pub fn sample_level_vectors(vlm: &Vlm, text: &PromptText, anchor: Anchor) -> Result<SteeringVectors> {
    run_ready(sample_level_vectors_on(&DecoderBackend::Cpu, vlm, text, anchor))
}

/// [`sample_level_vectors`] with the anchor encode and the prefills on `backend`.
pub async fn sample_level_vectors_on(
    backend: &DecoderBackend,
    vlm: &Vlm,
    text: &PromptText,
    anchor: Anchor,
) -> Result<SteeringVectors> {
    let features = anchor_features_on(backend, vlm, anchor).await?;
    let shift = shift_for_prompt_on(backend, vlm, text, &features).await?;
    let mut vectors = SteeringVectors::new(vlm.config().text.hidden_size, shift.into_iter().enumerate().collect())?;
    vectors.metadata = vector_metadata(vlm, "sample", anchor.name(), 1);
    Ok(vectors)
}

/// How per-prompt shifts are combined into one vector per layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Mean,
    /// First principal component of the shifts, sign-aligned with the mean, scaled to its norm.
    Pca,
}

impl Method {
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "mean" => Ok(Self::Mean),
            "pca" => Ok(Self::Pca),
            other => bail!("method must be mean or pca (got '{other}')"),
        }
    }
    pub fn name(&self) -> &'static str {
        match self {
            Self::Mean => "mean",
            Self::Pca => "pca",
        }
    }
}

/// Metadata of a cmrm vector file (docs/contracts.md).
pub fn vector_metadata(vlm: &Vlm, method: &str, anchor: &str, n_calibration: usize) -> HashMap<String, String> {
    let cfg = vlm.config();
    HashMap::from([
        ("format".into(), VECTORS_FORMAT.into()),
        ("model".into(), cfg.fingerprint()),
        ("hidden_size".into(), cfg.text.hidden_size.to_string()),
        ("num_layers".into(), cfg.text.num_hidden_layers.to_string()),
        ("method".into(), method.into()),
        ("anchor".into(), anchor.into()),
        ("n_calibration".into(), n_calibration.to_string()),
        ("sign".into(), "subtract".into()),
        ("default_alpha".into(), "1.0".into()),
        ("default_layers".into(), "all".into()),
        ("default_positions".into(), "all".into()),
        ("model_hint".into(), cfg.text.kind.llama_cpp_arch().into()),
    ])
}

/// Record which calibration set vectors came from: its name and the sha256 of its text.
pub fn record_calibration_set(vectors: &mut SteeringVectors, name: &str, text: &str) {
    vectors.metadata.insert("calibration_set".into(), name.into());
    vectors.metadata.insert("calibration_sha256".into(), crate::catalog::sha256_hex(text.as_bytes()));
}

/// Combine per-prompt shifts `shifts[i][l][h]` into one vector per layer.
pub fn combine_shifts(shifts: &[Vec<Vec<f32>>], method: Method) -> Result<BTreeMap<usize, Vec<f32>>> {
    let Some(first) = shifts.first() else { bail!("the calibration set is empty") };
    let (n_layers, hidden) = (first.len(), first.first().map_or(0, Vec::len));
    let n = shifts.len() as f64;
    let mut out = BTreeMap::new();
    for l in 0..n_layers {
        // Sum in f64, then one division: the mean does not depend on the order much.
        let mut mean = vec![0f64; hidden];
        for s in shifts {
            for (m, x) in mean.iter_mut().zip(&s[l]) {
                *m += f64::from(*x);
            }
        }
        mean.iter_mut().for_each(|m| *m /= n);
        let v = match method {
            Method::Mean => mean,
            Method::Pca => first_component(shifts.iter().map(|s| &s[l]), &mean),
        };
        out.insert(l, v.into_iter().map(|x| x as f32).collect());
    }
    Ok(out)
}

/// First principal component of the rows (centred), by power iteration; sign-aligned with
/// `mean` and scaled to `‖mean‖`.
fn first_component<'a>(rows: impl Iterator<Item = &'a Vec<f32>>, mean: &[f64]) -> Vec<f64> {
    let centred: Vec<Vec<f64>> = rows.map(|r| r.iter().zip(mean).map(|(x, m)| f64::from(*x) - m).collect()).collect();
    let hidden = mean.len();
    let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
    let mean_norm = norm(mean);
    // Start from the largest-norm centred row: never orthogonal to the top component in practice.
    let mut v = centred.iter().max_by(|a, b| norm(a).total_cmp(&norm(b))).cloned().unwrap_or_else(|| vec![1.0; hidden]);
    if norm(&v) == 0.0 {
        return mean.to_vec(); // all shifts equal: the mean is the only direction
    }
    for _ in 0..500 {
        let mut next = vec![0f64; hidden];
        for row in &centred {
            let dot: f64 = row.iter().zip(&v).map(|(a, b)| a * b).sum();
            for (n, r) in next.iter_mut().zip(row) {
                *n += dot * r;
            }
        }
        let len = norm(&next);
        if len == 0.0 {
            break;
        }
        next.iter_mut().for_each(|x| *x /= len);
        let delta: f64 = next.iter().zip(&v).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
        v = next;
        if delta < 1e-12 {
            break;
        }
    }
    let unit_norm = norm(&v);
    let sign = if v.iter().zip(mean).map(|(a, b)| a * b).sum::<f64>() < 0.0 { -1.0 } else { 1.0 };
    v.iter().map(|x| sign * x / unit_norm * mean_norm).collect()
}

/// One line of a calibration or evaluation set: a question and the image to measure the shift
/// with (or to answer about). Evaluation sets may also name the item's `kind` (e.g. `harmful`,
/// `safe`, `benign`: `cmrm eval` reports per kind) and the answer it `expect`s.
#[derive(Debug, Clone, PartialEq)]
pub struct CalibrationItem {
    pub prompt: String,
    pub image: CalibrationImage,
    pub kind: Option<String>,
    pub expect: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum CalibrationImage {
    /// The run's `--anchor` (the line names no image).
    Anchor,
    Blank,
    Noise,
    /// A real image file (measures the shift a real image causes).
    Path(String),
    /// `"none"`: the question alone, without an image (evaluation sets only).
    None,
}

/// Parse calibration JSONL: one `{"prompt": "...", "image": "path" | "blank" | "noise" | "none",
/// "kind": "...", "expect": "..."}` per line (all but `prompt` optional); blank lines and `#`
/// comments skipped. Errors name the line.
pub fn parse_calibration(name: &str, text: &str) -> Result<Vec<CalibrationItem>> {
    let mut items = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let lineno = i + 1;
        let v: serde_json::Value =
            serde_json::from_str(line).with_context(|| format!("{name}:{lineno}: not valid JSON"))?;
        let prompt = v
            .get("prompt")
            .and_then(|p| p.as_str())
            .with_context(|| format!("{name}:{lineno}: needs a \"prompt\" string"))?
            .to_owned();
        let image = match v.get("image") {
            None | Some(serde_json::Value::Null) => CalibrationImage::Anchor,
            Some(serde_json::Value::String(s)) if s == "blank" => CalibrationImage::Blank,
            Some(serde_json::Value::String(s)) if s == "noise" => CalibrationImage::Noise,
            Some(serde_json::Value::String(s)) if s == "none" => CalibrationImage::None,
            Some(serde_json::Value::String(s)) => CalibrationImage::Path(s.clone()),
            Some(other) => {
                bail!("{name}:{lineno}: \"image\" must be a path, \"blank\", \"noise\" or \"none\", got {other}")
            }
        };
        let text_field = |key: &str| -> Result<Option<String>> {
            match v.get(key) {
                None | Some(serde_json::Value::Null) => Ok(None),
                Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
                Some(other) => bail!("{name}:{lineno}: \"{key}\" must be a string, got {other}"),
            }
        };
        items.push(CalibrationItem { prompt, image, kind: text_field("kind")?, expect: text_field("expect")? });
    }
    if items.is_empty() {
        bail!("{name}: the calibration set is empty");
    }
    Ok(items)
}

/// Progress of an extraction, for a bar with ETA.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    pub done: usize,
    pub total: usize,
    pub elapsed_s: f64,
}

impl Progress {
    pub fn eta_s(&self) -> f64 {
        if self.done == 0 {
            f64::NAN
        } else {
            self.elapsed_s / self.done as f64 * (self.total - self.done) as f64
        }
    }
}

/// Dataset-level extraction, one calibration item at a time (the browser yields between items to
/// show progress and see a cancel; [`extract`] runs it to the end). For each item,
/// `d_l = h_l(prompt, image) − h_l(prompt)` at the last prompt token; [`Extraction::finish`]
/// combines them by `method`.
pub struct Extraction {
    items: Vec<CalibrationItem>,
    anchor: Anchor,
    method: Method,
    /// Anchor features by name, encoded on first use.
    anchors: HashMap<&'static str, Tensor>,
    shifts: Vec<Vec<Vec<f32>>>,
    start: f64,
}

impl Extraction {
    pub fn new(items: Vec<CalibrationItem>, anchor: Anchor, method: Method) -> Result<Self> {
        if items.is_empty() {
            bail!("the calibration set is empty");
        }
        let shifts = Vec::with_capacity(items.len());
        Ok(Self { items, anchor, method, anchors: HashMap::new(), shifts, start: crate::generate::now_seconds() })
    }

    pub fn is_done(&self) -> bool {
        self.shifts.len() == self.items.len()
    }

    pub fn progress(&self) -> Progress {
        Progress {
            done: self.shifts.len(),
            total: self.items.len(),
            elapsed_s: crate::generate::now_seconds() - self.start,
        }
    }

    async fn anchor_of(&mut self, backend: &DecoderBackend, vlm: &Vlm, anchor: Anchor) -> Result<Tensor> {
        if let Some(t) = self.anchors.get(anchor.name()) {
            return Ok(t.clone());
        }
        let t = anchor_features_on(backend, vlm, anchor).await?;
        self.anchors.insert(anchor.name(), t.clone());
        Ok(t)
    }

    /// Measure the next item's shift (no-op once done). `load_image` reads items that name a file.
    pub fn step(&mut self, vlm: &Vlm, load_image: &dyn Fn(&str) -> Result<RgbImage>) -> Result<Progress> {
        run_ready(self.step_on(&DecoderBackend::Cpu, vlm, load_image))
    }

    /// [`Self::step`] with the image encodes and the prefills on `backend`.
    pub async fn step_on(
        &mut self,
        backend: &DecoderBackend,
        vlm: &Vlm,
        load_image: &dyn Fn(&str) -> Result<RgbImage>,
    ) -> Result<Progress> {
        let i = self.shifts.len();
        let Some(item) = self.items.get(i).cloned() else { return Ok(self.progress()) };
        let seed = match self.anchor {
            Anchor::Noise { seed } => seed,
            Anchor::Blank => 0,
        };
        let features = match &item.image {
            CalibrationImage::Anchor => self.anchor_of(backend, vlm, self.anchor).await?,
            CalibrationImage::Blank => self.anchor_of(backend, vlm, Anchor::Blank).await?,
            CalibrationImage::Noise => self.anchor_of(backend, vlm, Anchor::Noise { seed }).await?,
            CalibrationImage::Path(p) => {
                let img = load_image(p).with_context(|| format!("calibration item {}: image {p}", i + 1))?;
                backend.encode_image_async(vlm, &img).await?.features
            }
            CalibrationImage::None => {
                bail!("calibration item {}: \"image\": \"none\" is for evaluation sets; a shift needs an image", i + 1)
            }
        };
        let shift = shift_for_prompt_on(backend, vlm, &PromptText::Chat(item.prompt.clone()), &features)
            .await
            .with_context(|| format!("calibration item {}", i + 1))?;
        self.shifts.push(shift);
        Ok(self.progress())
    }

    /// The vectors, once every item is measured.
    pub fn finish(self, vlm: &Vlm) -> Result<SteeringVectors> {
        if !self.is_done() {
            bail!("extraction stopped after {} of {} items", self.shifts.len(), self.items.len());
        }
        let layers = combine_shifts(&self.shifts, self.method)?;
        let mut vectors = SteeringVectors::new(vlm.config().text.hidden_size, layers)?;
        vectors.metadata = vector_metadata(vlm, self.method.name(), self.anchor.name(), self.items.len());
        Ok(vectors)
    }
}

/// Dataset-level extraction over the whole set ([`Extraction`] run to the end).
/// `on_progress` returning `false` cancels (an error, nothing returned).
pub fn extract(
    vlm: &Vlm,
    items: &[CalibrationItem],
    anchor: Anchor,
    method: Method,
    load_image: &dyn Fn(&str) -> Result<RgbImage>,
    on_progress: &mut dyn FnMut(Progress) -> bool,
) -> Result<SteeringVectors> {
    run_ready(extract_on(&DecoderBackend::Cpu, vlm, items, anchor, method, load_image, on_progress))
}

/// [`extract`] with the image encodes and the prefills on `backend`.
pub async fn extract_on(
    backend: &DecoderBackend,
    vlm: &Vlm,
    items: &[CalibrationItem],
    anchor: Anchor,
    method: Method,
    load_image: &dyn Fn(&str) -> Result<RgbImage>,
    on_progress: &mut dyn FnMut(Progress) -> bool,
) -> Result<SteeringVectors> {
    let mut extraction = Extraction::new(items.to_vec(), anchor, method)?;
    while !extraction.is_done() {
        let progress = extraction.step_on(backend, vlm, load_image).await?;
        if !on_progress(progress) {
            bail!("extraction cancelled after {} of {} items", progress.done, progress.total);
        }
    }
    extraction.finish(vlm)
}
