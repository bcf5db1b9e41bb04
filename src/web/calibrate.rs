//! "Compute vectors here": dataset-level CMRM over a calibration set, in the browser, for a model
//! without published vectors — the same [`Extraction`] as `cmrm extract`, one item per event-loop
//! turn (progress, and `stop()` cancels). The result is cached under a key of model, revision,
//! calibration set (name and content hash), anchor and method, and can be saved as safetensors or
//! as a llama.cpp GGUF control vector.

use std::collections::HashMap;

use anyhow::{bail, Context, Result};
use js_sys::{Function, Uint8Array};
use serde::{Deserialize, Serialize};
use wasm_bindgen::prelude::*;

use super::{
    call_js, error_value, fetch, from_js_value, resolve_url, to_js, to_js_value, yield_to_event_loop, Session,
    VectorsInfo,
};
use crate::catalog::sha256_hex;
use crate::cmrm::{parse_calibration, record_calibration_set, Anchor, CalibrationImage, Extraction, Method};
use crate::image::{decode_image, RgbImage};
use crate::steering::SteeringVectors;

/// Options of `Session.calibrate`.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct CalibrateOptions {
    /// URL of a calibration JSONL (docs/contracts.md; relative URLs against the page), e.g.
    /// `assets/calibration/builtin-v1.jsonl`. Images the items name are fetched relative to it.
    calibration: String,
    /// Name of the set (cache key, metadata); default: the file name without extension.
    #[serde(default)]
    name: Option<String>,
    /// `blank` (default) or `noise`.
    #[serde(default)]
    anchor: Option<String>,
    #[serde(default)]
    seed: Option<u64>,
    /// `mean` (default) or `pca`.
    #[serde(default)]
    method: Option<String>,
    /// Recompute even when the cache has a result.
    #[serde(default)]
    force: bool,
}

/// Events streamed by `calibrate` (field `kind`).
#[derive(Serialize)]
#[serde(tag = "kind", rename_all = "camelCase")]
enum CalibrateEvent {
    #[serde(rename_all = "camelCase")]
    Progress { done: usize, total: usize, elapsed_s: f64, eta_s: Option<f64> },
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct CalibrateResult {
    vectors: VectorsInfo,
    from_cache: bool,
    /// Whether the result was stored in the cache for the next visit.
    cached: bool,
    prompts: usize,
    seconds: f64,
    seconds_per_prompt: f64,
    cache_url: String,
}

/// The file stem of a URL's last path segment.
fn stem_of(url: &str) -> String {
    let last = url.split(['?', '#']).next().unwrap_or(url).trim_end_matches('/').rsplit('/').next().unwrap_or(url);
    last.rsplit_once('.').map_or(last, |(stem, _)| stem).to_owned()
}

#[wasm_bindgen]
impl Session {
    /// Compute dataset-level CMRM vectors for this model over a calibration set and use them
    /// (returns `{vectors, fromCache, cached, prompts, seconds, secondsPerPrompt, cacheUrl}`).
    /// `options`: `{calibration: URL, name?, anchor?: "blank"|"noise", seed?, method?: "mean"|"pca",
    /// force?}`. `on_event({kind: "progress", done, total, elapsedS, etaS})`; `stop()` cancels
    /// (an error; the vectors in use do not change).
    pub fn calibrate(&self, options: JsValue, on_event: Option<Function>) -> js_sys::Promise {
        let options: Result<CalibrateOptions> = from_js_value("calibration options", options);
        if self.busy.get() {
            return js_sys::Promise::reject(&error_value("the model is busy: stop the running task first"));
        }
        self.busy.set(true);
        self.stop.set(false);
        let session = self.clone();
        wasm_bindgen_futures::future_to_promise(async move {
            let result = match options {
                Ok(options) => session.calibrate_inner(options, on_event.as_ref()).await,
                Err(e) => Err(e),
            };
            session.busy.set(false);
            result.and_then(|r| to_js_value(&r)).map_err(to_js)
        })
    }

    /// The dataset-level vectors in use as a file: `"safetensors"` (cmrm's format, loads in the
    /// page and the CLI) or `"gguf"` (a llama.cpp control vector: negated, without layer 0).
    #[wasm_bindgen(js_name = exportVectors)]
    pub fn export_vectors(&self, format: &str) -> Result<Uint8Array, JsValue> {
        (|| {
            let state = self.state.borrow();
            let (vectors, _) =
                state.vectors.as_ref().context("no dataset-level vectors are in use: compute or load some")?;
            let bytes = match format {
                "safetensors" => vectors.to_safetensors_bytes()?,
                "gguf" => {
                    let hint = vectors.metadata.get("model_hint").map_or("llava", String::as_str);
                    crate::steering::control_vector::export_control_vector(vectors, hint).bytes
                }
                other => bail!("format must be safetensors or gguf (got '{other}')"),
            };
            Ok(Uint8Array::from(bytes.as_slice()))
        })()
        .map_err(to_js)
    }
}

impl Session {
    async fn calibrate_inner(&self, opts: CalibrateOptions, on_event: Option<&Function>) -> Result<CalibrateResult> {
        let url = resolve_url(&opts.calibration);
        let set_bytes = fetch::fetch_bytes(&url, &mut |_, _, _| {}).await.context("the calibration set")?;
        let text = String::from_utf8(set_bytes).with_context(|| format!("{url} is not UTF-8 text"))?;
        let name = opts.name.clone().unwrap_or_else(|| stem_of(&url));
        let items = parse_calibration(&name, &text)?;
        let seed = opts.seed.unwrap_or(0);
        let anchor = Anchor::parse(opts.anchor.as_deref().unwrap_or("blank"), seed)?;
        let method = Method::parse(opts.method.as_deref().unwrap_or("mean"))?;
        let cfg = self.vlm.config();

        // Cached per model, revision, set (name + content), anchor and method.
        let key = format!(
            "{}|{}|{}|{name}|{}|{}:{seed}|{}",
            self.name,
            self.revision,
            cfg.fingerprint(),
            sha256_hex(text.as_bytes()),
            anchor.name(),
            method.name()
        );
        let cache_url =
            resolve_url(&format!("cmrm-computed-vectors/{}.safetensors", &sha256_hex(key.as_bytes())[..32]));
        let label =
            format!("computed here: {name} ({} prompts, {} anchor, {})", items.len(), anchor.name(), method.name());
        if !opts.force {
            if let Some(bytes) = fetch::cached_bytes(&cache_url).await {
                let vectors = SteeringVectors::from_safetensors_bytes(&label, &bytes)?;
                if vectors.metadata.get("calibration_key") == Some(&key) {
                    let info = self.use_vectors(&label, vectors)?;
                    let prompts = items.len();
                    return Ok(CalibrateResult {
                        vectors: info,
                        from_cache: true,
                        cached: true,
                        prompts,
                        seconds: 0.0,
                        seconds_per_prompt: 0.0,
                        cache_url,
                    });
                }
            }
        }

        // Images named by items are fetched first (the extraction itself is synchronous).
        let mut images: HashMap<String, RgbImage> = HashMap::new();
        for item in &items {
            if let CalibrationImage::Path(p) = &item.image {
                if !images.contains_key(p) {
                    let image_url =
                        web_sys::Url::new_with_base(p, &url).map(|u| u.href()).unwrap_or_else(|_| p.clone());
                    let bytes = fetch::fetch_bytes(&image_url, &mut |_, _, _| {}).await?;
                    images.insert(p.clone(), decode_image(&bytes).with_context(|| image_url.clone())?);
                }
            }
        }
        let load_image = |p: &str| images.get(p).cloned().with_context(|| format!("{p} was not fetched"));

        let prompts = items.len();
        let t0 = super::now_seconds();
        let mut extraction = Extraction::new(items, anchor, method)?;
        let backend = self.state.borrow().backend.clone();
        while !extraction.is_done() {
            yield_to_event_loop().await;
            if self.stop.get() {
                let p = extraction.progress();
                return Err(anyhow::anyhow!(
                    "calibration cancelled after {} of {} prompts; the vectors in use did not change",
                    p.done,
                    p.total
                )
                .context(super::ErrorKind::Cancelled));
            }
            let p = extraction.step_on(&backend, &self.vlm, &load_image).await?;
            if let Some(cb) = on_event {
                let eta_s = Some(p.eta_s()).filter(|e| e.is_finite());
                let event = CalibrateEvent::Progress { done: p.done, total: p.total, elapsed_s: p.elapsed_s, eta_s };
                call_js(cb, &to_js_value(&event)?)?;
            }
        }
        let seconds = super::now_seconds() - t0;
        let mut vectors = extraction.finish(&self.vlm)?;
        record_calibration_set(&mut vectors, &name, &text);
        vectors.metadata.extend([
            ("calibration_key".to_owned(), key),
            ("source_model".to_owned(), self.name.clone()),
            ("source_revision".to_owned(), self.revision.clone()),
        ]);
        let cached = fetch::cache_put(&cache_url, &vectors.to_safetensors_bytes()?).await;
        let info = self.use_vectors(&label, vectors)?;
        Ok(CalibrateResult {
            vectors: info,
            from_cache: false,
            cached,
            prompts,
            seconds,
            seconds_per_prompt: seconds / prompts as f64,
            cache_url,
        })
    }
}
