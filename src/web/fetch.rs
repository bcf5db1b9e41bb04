//! Downloads for the browser: cache-first `fetch` through the Cache API, streamed with progress,
//! and the file plan of a checkpoint (which files, how many bytes) before anything large moves.
//!
//! Works in a window and in a worker: `fetch` and `caches` are taken from the global scope.

use anyhow::{anyhow, bail, Context, Result};
use js_sys::{Promise, Reflect, Uint8Array};
use serde::Serialize;
use wasm_bindgen::prelude::*;
use wasm_bindgen::JsCast;
use wasm_bindgen_futures::JsFuture;
use web_sys::{Cache, CacheStorage, ReadableStream, ReadableStreamDefaultReader, RequestInit, Response};

use crate::checkpoint::{weight_file_names, OPTIONAL_FILES, REQUIRED_FILES, WEIGHTS_FILE, WEIGHTS_GGUF, WEIGHTS_INDEX};

/// Name of the Cache API store that holds model and vector files.
pub const CACHE_NAME: &str = "cmrm-models-v1";

#[wasm_bindgen]
extern "C" {
    /// The global `fetch` (window or worker).
    #[wasm_bindgen(js_name = fetch)]
    fn global_fetch(input: &str, init: &RequestInit) -> Promise;
}

/// Converts a JS exception into an error with its message.
pub fn js_error(context: &str, value: JsValue) -> anyhow::Error {
    let message = value
        .dyn_ref::<js_sys::Error>()
        .map(|e| String::from(e.message()))
        .or_else(|| value.as_string())
        .unwrap_or_else(|| format!("{value:?}"));
    anyhow!("{context}: {message}")
}

async fn await_promise(context: &str, promise: Promise) -> Result<JsValue> {
    JsFuture::from(promise).await.map_err(|e| js_error(context, e))
}

/// The page's Cache API store, or `None` where the browser offers none (insecure origin, some
/// private modes): everything then still works, without offline reuse.
async fn open_cache() -> Option<Cache> {
    let caches = Reflect::get(&js_sys::global(), &"caches".into()).ok()?;
    let caches: CacheStorage = caches.dyn_into().ok()?;
    JsFuture::from(caches.open(CACHE_NAME)).await.ok()?.dyn_into().ok()
}

/// Deletes every cached model and vector file. Returns whether a store existed.
pub async fn clear_cache() -> Result<bool> {
    let caches = Reflect::get(&js_sys::global(), &"caches".into()).map_err(|e| js_error("caches", e))?;
    let Ok(caches) = caches.dyn_into::<CacheStorage>() else { return Ok(false) };
    Ok(await_promise("clearing the cache", caches.delete(CACHE_NAME)).await?.as_bool().unwrap_or(false))
}

async fn cached_response(cache: Option<&Cache>, url: &str) -> Option<Response> {
    let found = JsFuture::from(cache?.match_with_str(url)).await.ok()?;
    found.dyn_into::<Response>().ok()
}

async fn network(url: &str, method: &str) -> Result<Response> {
    let init = RequestInit::new();
    init.set_method(method);
    let response =
        await_promise(&format!("cannot fetch {url} (offline, or the server refused)"), global_fetch(url, &init))
            .await?;
    Ok(response.unchecked_into())
}

fn content_length(response: &Response) -> Option<u64> {
    response.headers().get("content-length").ok().flatten().and_then(|v| v.parse().ok())
}

/// Size of a file without downloading it: from the cache, else a `HEAD` request. `Ok(None)` when
/// the server says the file does not exist (404), an error for any other failure.
pub async fn probe_size(url: &str) -> Result<Option<(u64, bool)>> {
    let cache = open_cache().await;
    if let Some(r) = cached_response(cache.as_ref(), url).await {
        return Ok(Some((content_length(&r).unwrap_or(0), true)));
    }
    let r = network(url, "HEAD").await?;
    match r.status() {
        404 | 410 => Ok(None),
        _ if r.ok() => Ok(Some((content_length(&r).unwrap_or(0), false))),
        s => bail!("{url}: HTTP {s} {}", r.status_text()),
    }
}

/// Progress of one download, called at most every ~100 ms and once at the end.
pub type OnBytes<'a> = dyn FnMut(u64, Option<u64>, bool) + 'a;

/// GET a file, cache-first. The body streams into wasm memory chunk by chunk (no second copy in
/// a JS buffer, so files over 2 GB fit where memory allows); the response is stored in the cache
/// while it streams. `on_bytes(done, total, from_cache)`.
pub async fn fetch_bytes(url: &str, on_bytes: &mut OnBytes<'_>) -> Result<Vec<u8>> {
    let bytes = std::cell::RefCell::new(Vec::<u8>::new());
    fetch_chunks(
        url,
        on_bytes,
        &mut |total| {
            if let Some(n) = total {
                let mut bytes = bytes.borrow_mut();
                bytes.try_reserve_exact(n as usize).map_err(|_| anyhow!("{url}: not enough memory for {n} bytes"))?;
            }
            Ok(())
        },
        &mut |chunk| {
            let mut bytes = bytes.borrow_mut();
            bytes.try_reserve(chunk.len()).map_err(|_| anyhow!("{url}: out of memory after {} bytes", bytes.len()))?;
            bytes.extend_from_slice(chunk);
            Ok(())
        },
    )
    .await?;
    Ok(bytes.into_inner())
}

/// GET a file, cache-first, handing its body to `on_chunk` piece by piece as it arrives (nothing
/// is kept here); `on_total(content length)` is called first. The response is stored in the cache
/// while it streams. Returns the number of bytes.
pub async fn fetch_chunks(
    url: &str,
    on_bytes: &mut OnBytes<'_>,
    on_total: &mut dyn FnMut(Option<u64>) -> Result<()>,
    on_chunk: &mut dyn FnMut(&[u8]) -> Result<()>,
) -> Result<u64> {
    let cache = open_cache().await;
    let (response, from_cache) = match cached_response(cache.as_ref(), url).await {
        Some(r) => (r, true),
        None => (network(url, "GET").await?, false),
    };
    if !response.ok() {
        bail!("{url}: HTTP {} {}", response.status(), response.status_text());
    }
    // Cache a clone of the network response; `put` reads it as we read ours. (The Cache API
    // takes http(s) URLs only: data: and blob: URLs are already local.)
    let cacheable = url.starts_with("http://") || url.starts_with("https://");
    let cache_put = match (&cache, from_cache) {
        (Some(cache), false) if response.status() == 200 && cacheable => {
            response.clone().ok().map(|copy| cache.put_with_str(url, &copy))
        }
        _ => None,
    };
    let total = content_length(&response);
    on_total(total)?;
    let body: ReadableStream = response.body().with_context(|| format!("{url}: the response has no body"))?;
    let reader: ReadableStreamDefaultReader = body.get_reader().unchecked_into();
    let mut received = 0u64;
    let mut chunk: Vec<u8> = Vec::new();
    let mut last_report = 0.0;
    loop {
        let next = await_promise(&format!("download of {url} failed"), reader.read()).await?;
        if Reflect::get(&next, &"done".into()).ok().and_then(|d| d.as_bool()).unwrap_or(true) {
            break;
        }
        let value: Uint8Array = Reflect::get(&next, &"value".into()).map_err(|e| js_error(url, e))?.unchecked_into();
        chunk.resize(value.length() as usize, 0);
        value.copy_to(&mut chunk);
        received += chunk.len() as u64;
        if let Err(e) = on_chunk(&chunk) {
            let _ = reader.cancel();
            return Err(e);
        }
        let now = js_sys::Date::now();
        if now - last_report > 100.0 {
            last_report = now;
            on_bytes(received, total, from_cache);
        }
    }
    on_bytes(received, total, from_cache);
    if let Some(n) = total.filter(|&n| n != received) {
        // Compressed transfers report the compressed length; only a short body is an error.
        if received < n && !from_cache {
            bail!("{url}: the download stopped after {received} of {n} bytes");
        }
    }
    if let Some(put) = cache_put {
        // A full quota is not an error: the model still loads, it just is not kept offline.
        if let Err(e) = JsFuture::from(put).await {
            web_sys::console::warn_1(&format!("cmrm: could not cache {url}: {}", js_error("", e)).into());
        }
    }
    Ok(received)
}

/// [`fetch_bytes`], then check the bytes against a catalog entry's size and sha256; a file that
/// does not match is removed from the cache again (and not used).
pub async fn fetch_verified(
    url: &str,
    expected: &crate::catalog::CatalogEntry,
    on_bytes: &mut OnBytes<'_>,
) -> Result<Vec<u8>> {
    let bytes = fetch_bytes(url, on_bytes).await?;
    if let Err(e) = expected.verify(&bytes) {
        if let Some(cache) = open_cache().await {
            let _ = JsFuture::from(cache.delete_with_str(url)).await;
        }
        return Err(e);
    }
    Ok(bytes)
}

/// A file stored by [`cache_put`] (or downloaded), if the cache has it.
pub async fn cached_bytes(url: &str) -> Option<Vec<u8>> {
    let response = cached_response(open_cache().await.as_ref(), url).await?;
    let buffer = JsFuture::from(response.array_buffer().ok()?).await.ok()?;
    Some(Uint8Array::new(&buffer).to_vec())
}

/// Keep bytes made in the page (vectors computed here) in the cache under `url`. Returns whether
/// they were stored (no Cache API, or a full quota: not an error, they are just not kept).
pub async fn cache_put(url: &str, bytes: &[u8]) -> bool {
    let Some(cache) = open_cache().await else { return false };
    let mut copy = bytes.to_vec();
    let Ok(response) = Response::new_with_opt_u8_array(Some(&mut copy)) else { return false };
    match JsFuture::from(cache.put_with_str(url, &response)).await {
        Ok(_) => true,
        Err(e) => {
            web_sys::console::warn_1(&format!("cmrm: could not cache {url}: {}", js_error("", e)).into());
            false
        }
    }
}

/// Whether `url` is in the model cache.
pub async fn is_cached(url: &str) -> bool {
    cached_response(open_cache().await.as_ref(), url).await.is_some()
}

/// One file of a checkpoint to download.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PlannedFile {
    pub name: String,
    pub url: String,
    /// Bytes, where the server or the Hub said (0 when unknown).
    pub size: u64,
    pub cached: bool,
}

/// Which files a load will fetch and how many bytes, shown before the download starts.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Plan {
    pub model: String,
    pub base_url: String,
    pub files: Vec<PlannedFile>,
    pub total_bytes: u64,
    pub cached_bytes: u64,
    /// The weight files as their headers describe them (read with HTTP range requests); `None`
    /// where the server does not answer ranges.
    #[serde(skip)]
    pub weight_files: Option<Vec<crate::checkpoint::WeightFileInfo>>,
}

impl Plan {
    fn new(model: &str, base_url: &str, files: Vec<PlannedFile>) -> Self {
        let total_bytes = files.iter().map(|f| f.size).sum();
        let cached_bytes = files.iter().filter(|f| f.cached).map(|f| f.size).sum();
        Self {
            model: model.to_owned(),
            base_url: base_url.to_owned(),
            files,
            total_bytes,
            cached_bytes,
            weight_files: None,
        }
    }

    /// Fill `weight_files` from the weight files' headers (a few kB each, not cached).
    pub async fn read_weight_headers(&mut self) {
        if self.files.iter().any(|f| f.name.ends_with(".gguf")) {
            return; // a quantized copy: its size is its in-memory size, decided once it is in
        }
        let mut infos = Vec::new();
        for file in self.files.iter().filter(|f| f.name.ends_with(".safetensors")) {
            match safetensors_header(&file.url, &file.name, file.size).await {
                Some(info) => infos.push(info),
                None => return,
            }
        }
        self.weight_files = Some(infos);
    }

    /// Canonical names and shapes of the weights, when the headers could be read.
    pub fn tensor_shapes(&self) -> Option<Vec<(String, Vec<usize>)>> {
        Some(self.weight_files.as_ref()?.iter().flat_map(|w| w.shapes.clone()).collect())
    }

    /// Bytes the model takes in memory in `format`, when the headers could be read.
    pub fn model_bytes(&self, format: crate::quant::WeightFormat) -> Option<u64> {
        let shapes = self.tensor_shapes()?;
        Some(crate::quant::estimate_model_bytes(format, shapes.iter().map(|(n, s)| (n.as_str(), s.as_slice()))))
    }
}

/// `bytes=start-end` (inclusive) of a URL, or `None` if the server does not answer with 206.
async fn fetch_range(url: &str, start: u64, end: u64) -> Option<Vec<u8>> {
    let init = RequestInit::new();
    init.set_method("GET");
    let headers = web_sys::Headers::new().ok()?;
    headers.set("range", &format!("bytes={start}-{end}")).ok()?;
    init.set_headers(&headers);
    let response: Response = JsFuture::from(global_fetch(url, &init)).await.ok()?.dyn_into().ok()?;
    if response.status() != 206 {
        if let Some(body) = response.body() {
            let _ = body.cancel();
        }
        return None;
    }
    let buffer = JsFuture::from(response.array_buffer().ok()?).await.ok()?;
    Some(Uint8Array::new(&buffer).to_vec())
}

/// A safetensors file as its header describes it, from two range requests.
async fn safetensors_header(url: &str, name: &str, size: u64) -> Option<crate::checkpoint::WeightFileInfo> {
    let len = fetch_range(url, 0, 7).await?;
    let need = crate::checkpoint::WeightFileInfo::header_len(&len).ok()??;
    let header = fetch_range(url, 8, need - 1).await?;
    let prefix = [len.as_slice(), header.as_slice()].concat();
    crate::checkpoint::WeightFileInfo::from_prefix(name, Some(size).filter(|&s| s > 0), &prefix).ok()?
}

/// `owner/name` on the Hugging Face Hub (not a URL or a path).
pub fn is_hub_repo_id(s: &str) -> bool {
    let ok = |part: &str| {
        !part.is_empty()
            && part.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            && !part.starts_with('.')
    };
    match s.split_once('/') {
        Some((owner, name)) => ok(owner) && ok(name),
        None => false,
    }
}

/// `https://huggingface.co/{repo}/resolve/{revision}/`: the revision in the URL keys the cache.
pub fn hub_base_url(repo: &str, revision: &str) -> String {
    format!("https://huggingface.co/{repo}/resolve/{revision}/")
}

fn join(base: &str, name: &str) -> String {
    if base.is_empty() || base.ends_with('/') {
        format!("{base}{name}")
    } else {
        format!("{base}/{name}")
    }
}

/// Orders the files a checkpoint needs: required, optional present, then the weights (shards in
/// index order) — small files first, so a wrong model fails before gigabytes move.
fn order_files(present: &dyn Fn(&str) -> bool, shards: Vec<String>) -> Result<Vec<String>> {
    let mut names = Vec::new();
    for name in REQUIRED_FILES {
        if !present(name) {
            bail!("the model has no {name}");
        }
        names.push(name.to_owned());
    }
    names.extend(OPTIONAL_FILES.iter().filter(|n| present(n)).map(|n| n.to_string()));
    names.extend(shards);
    Ok(names)
}

/// Plan a Hub checkpoint from the Hub's file listing (one request; sizes of LFS files included).
pub async fn plan_hub(repo: &str, revision: &str) -> Result<Plan> {
    let listing_url = format!("https://huggingface.co/api/models/{repo}/tree/{revision}");
    let listing = fetch_bytes(&listing_url, &mut |_, _, _| {}).await.with_context(|| {
        format!("cannot list the files of {repo} on the Hugging Face Hub (check the repo id and your connection)")
    })?;
    let entries: Vec<serde_json::Value> =
        serde_json::from_slice(&listing).with_context(|| format!("{listing_url}: unexpected answer"))?;
    let size_of = |name: &str| -> Option<u64> {
        let e = entries.iter().find(|e| e.get("path").and_then(|p| p.as_str()) == Some(name))?;
        e.get("lfs").and_then(|l| l.get("size")).or_else(|| e.get("size")).and_then(|s| s.as_u64())
    };
    let base = hub_base_url(repo, revision);
    let index = match size_of(WEIGHTS_INDEX) {
        Some(_) => Some(fetch_bytes(&join(&base, WEIGHTS_INDEX), &mut |_, _, _| {}).await?),
        None => None,
    };
    let shards = weight_file_names(&|n| size_of(n).is_some(), &mut || {
        Ok(String::from_utf8_lossy(index.as_deref().unwrap_or_default()).into_owned())
    })
    .with_context(|| repo.to_owned())?;
    let names = order_files(&|n| size_of(n).is_some(), shards).with_context(|| repo.to_owned())?;
    let cache = open_cache().await;
    let mut files = Vec::new();
    for name in names {
        let url = join(&base, &name);
        let cached = cached_response(cache.as_ref(), &url).await.is_some();
        files.push(PlannedFile { size: size_of(&name).unwrap_or(0), name, url, cached });
    }
    Ok(Plan::new(repo, &base, files))
}

/// Plan a checkpoint at a URL folder. `names`: the files it has, when known (no probing for
/// optional files); otherwise each candidate is probed with `HEAD`.
pub async fn plan_url(label: &str, base: &str, names: Option<Vec<String>>) -> Result<Plan> {
    let mut files = Vec::new();
    let names = match names {
        Some(names) => names,
        None => {
            let mut found = std::collections::HashMap::new();
            for name in REQUIRED_FILES.iter().chain(&OPTIONAL_FILES).chain(&[WEIGHTS_INDEX, WEIGHTS_FILE, WEIGHTS_GGUF])
            {
                if let Some(size) = probe_size(&join(base, name)).await? {
                    found.insert(name.to_string(), size);
                }
            }
            let index = match found.contains_key(WEIGHTS_INDEX) {
                true => Some(fetch_bytes(&join(base, WEIGHTS_INDEX), &mut |_, _, _| {}).await?),
                false => None,
            };
            let shards = weight_file_names(&|n| found.contains_key(n), &mut || {
                Ok(String::from_utf8_lossy(index.as_deref().unwrap_or_default()).into_owned())
            })
            .with_context(|| base.to_owned())?;
            order_files(&|n| found.contains_key(n), shards)?
        }
    };
    for name in names {
        let url = join(base, &name);
        let (size, cached) = probe_size(&url).await?.with_context(|| format!("{url}: not found (404)"))?;
        files.push(PlannedFile { name, url, size, cached });
    }
    Ok(Plan::new(label, base, files))
}
