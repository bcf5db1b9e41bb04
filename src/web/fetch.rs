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
pub const CACHE_NAME: &str = "cmrm-models-v2";

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
    network_with(url, method, None).await
}

async fn network_with(url: &str, method: &str, abort: Option<&web_sys::AbortController>) -> Result<Response> {
    let init = RequestInit::new();
    init.set_method(method);
    if let Some(abort) = abort {
        init.set_signal(Some(&abort.signal()));
    }
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

/// What a downloaded file must be before it is kept: its size and sha256 where the Hub's listing
/// or a catalog entry gives them.
#[derive(Debug, Clone, Default)]
pub struct Expect {
    pub size: Option<u64>,
    pub sha256: Option<String>,
}

/// Marks the cache key a download waits under until its content is checked.
const PENDING: &str = "cmrm-pending=";

/// A file's bytes have arrived. From the network they wait in the cache under a pending key:
/// [`Fetched::keep`] moves them to the file's URL once the caller has checked the content (it
/// parsed, the weights converted), [`Fetched::discard`] drops them; a pending entry left by a
/// closed tab is deleted by the next load. So nothing unchecked — a captive portal's page, a
/// truncated body, another commit's file — is ever reused.
#[must_use = "keep() or discard() the download"]
pub struct Fetched {
    pub bytes: u64,
    pub from_cache: bool,
    pending: Option<(Cache, String, String, Promise)>,
}

impl Fetched {
    /// Keep the checked file in the cache under its URL (a full quota only means it is not kept).
    pub async fn keep(self) {
        let Some((cache, pending, url, put)) = self.pending else { return };
        let stored = async {
            JsFuture::from(put).await.map_err(|e| js_error("caching", e))?;
            let response: Response = JsFuture::from(cache.match_with_str(&pending))
                .await
                .map_err(|e| js_error("caching", e))?
                .dyn_into()
                .map_err(|_| anyhow!("the pending entry vanished"))?;
            JsFuture::from(cache.put_with_str(&url, &response)).await.map_err(|e| js_error("caching", e))?;
            anyhow::Ok(())
        };
        if let Err(e) = stored.await {
            web_sys::console::warn_1(&format!("cmrm: could not cache {url}: {e:#}").into());
        }
        let _ = JsFuture::from(cache.delete_with_str(&pending)).await;
    }

    /// Drop a download that failed its check.
    pub async fn discard(self) {
        if let Some((cache, pending, _, put)) = self.pending {
            let _ = JsFuture::from(put).await;
            let _ = JsFuture::from(cache.delete_with_str(&pending)).await;
        }
    }
}

/// Delete the pending entries a closed tab left, and the cache of page versions that kept files
/// unchecked (called when a load starts).
pub async fn discard_stale_downloads() {
    if let Some(caches) =
        Reflect::get(&js_sys::global(), &"caches".into()).ok().and_then(|c| c.dyn_into::<CacheStorage>().ok())
    {
        let _ = JsFuture::from(caches.delete("cmrm-models-v1")).await;
    }
    let Some(cache) = open_cache().await else { return };
    let Ok(keys) = JsFuture::from(cache.keys()).await else { return };
    for request in js_sys::Array::from(&keys).iter() {
        let url = Reflect::get(&request, &"url".into()).ok().and_then(|u| u.as_string()).unwrap_or_default();
        if url.contains(PENDING) {
            let _ = JsFuture::from(cache.delete_with_str(&url)).await;
        }
    }
}

/// GET a file, cache-first, kept in the cache once it arrived whole (its size as the server and
/// `expect` say, its sha256 if given). The body streams into wasm memory chunk by chunk (no second
/// copy in a JS buffer, so files over 2 GB fit where memory allows). `on_bytes(done, total,
/// from_cache)`.
pub async fn fetch_bytes(url: &str, on_bytes: &mut OnBytes<'_>) -> Result<Vec<u8>> {
    fetch_bytes_checked(url, &Expect::default(), on_bytes, &|_| Ok(())).await
}

/// [`fetch_bytes`] that keeps the file in the cache only if `check` accepts its bytes (a JSON file
/// that parses, vectors whose sha256 matches their catalog entry…); otherwise it is an error.
pub async fn fetch_bytes_checked(
    url: &str,
    expect: &Expect,
    on_bytes: &mut OnBytes<'_>,
    check: &dyn Fn(&[u8]) -> Result<()>,
) -> Result<Vec<u8>> {
    let bytes = std::cell::RefCell::new(Vec::<u8>::new());
    let fetched = fetch_chunks(
        url,
        expect,
        on_bytes,
        &mut |total| {
            if let Some(n) = total {
                let mut bytes = bytes.borrow_mut();
                usize::try_from(n)
                    .ok()
                    .and_then(|n| bytes.try_reserve_exact(n).ok())
                    .ok_or_else(|| anyhow!("{url}: not enough memory for {n} bytes"))?;
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
    let bytes = bytes.into_inner();
    match check(&bytes) {
        Ok(()) => {
            fetched.keep().await;
            Ok(bytes)
        }
        Err(e) => {
            if fetched.from_cache {
                // Cached before this check existed, or by another page version: drop it too.
                if let Some(cache) = open_cache().await {
                    let _ = JsFuture::from(cache.delete_with_str(url)).await;
                }
            }
            fetched.discard().await;
            Err(e)
        }
    }
}

/// GET a file, cache-first, handing its body to `on_chunk` piece by piece as it arrives (nothing
/// is kept here); `on_total(content length)` is called first. From the network, a copy streams
/// into the cache under a pending key ([`Fetched`]). An error (from `on_chunk`, a short body, a
/// size or sha256 that differs from `expect`) aborts the request, so nothing keeps downloading.
pub async fn fetch_chunks(
    url: &str,
    expect: &Expect,
    on_bytes: &mut OnBytes<'_>,
    on_total: &mut dyn FnMut(Option<u64>) -> Result<()>,
    on_chunk: &mut dyn FnMut(&[u8]) -> Result<()>,
) -> Result<Fetched> {
    let cache = open_cache().await;
    let abort = web_sys::AbortController::new().ok();
    let (response, from_cache) = match cached_response(cache.as_ref(), url).await {
        Some(r) => (r, true),
        None => (network_with(url, "GET", abort.as_ref()).await?, false),
    };
    let abort_all = || {
        if let Some(a) = &abort {
            a.abort();
        }
    };
    if !response.ok() || (!from_cache && response.status() != 200 && response.status() != 0) {
        abort_all();
        bail!("{url}: HTTP {} {}", response.status(), response.status_text());
    }
    // Cache a copy of the network response under a pending key; `put` reads it as we read ours.
    // (The Cache API takes http(s) URLs only: data: and blob: URLs are already local.)
    let cacheable = url.starts_with("http://") || url.starts_with("https://");
    let pending = match (&cache, from_cache) {
        (Some(cache), false) if cacheable => response.clone().ok().map(|copy| {
            let separator = if url.contains('?') { '&' } else { '?' };
            let key = format!("{url}{separator}{PENDING}{}", js_sys::Math::random().to_bits());
            let put = cache.put_with_str(&key, &copy);
            (cache.clone(), key, url.to_owned(), put)
        }),
        _ => None,
    };
    let fetched = Fetched { bytes: 0, from_cache, pending };
    match stream_body(url, &response, expect, from_cache, on_bytes, on_total, on_chunk).await {
        Ok(bytes) => Ok(Fetched { bytes, ..fetched }),
        Err(e) => {
            abort_all();
            fetched.discard().await;
            Err(e)
        }
    }
}

/// Read a response's body into `on_chunk`, checking its length and sha256.
async fn stream_body(
    url: &str,
    response: &Response,
    expect: &Expect,
    from_cache: bool,
    on_bytes: &mut OnBytes<'_>,
    on_total: &mut dyn FnMut(Option<u64>) -> Result<()>,
    on_chunk: &mut dyn FnMut(&[u8]) -> Result<()>,
) -> Result<u64> {
    use sha2::Digest;
    let total = content_length(response).or(expect.size);
    on_total(total)?;
    let body: ReadableStream = response.body().with_context(|| format!("{url}: the response has no body"))?;
    let reader: ReadableStreamDefaultReader = body.get_reader().unchecked_into();
    let mut hasher = expect.sha256.as_ref().map(|_| sha2::Sha256::new());
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
        if let Some(h) = &mut hasher {
            h.update(&chunk);
        }
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
    if let Some(n) = content_length(response).filter(|&n| received < n && !from_cache) {
        // Compressed transfers report the compressed length; only a short body is an error.
        bail!("{url}: the download stopped after {received} of {n} bytes");
    }
    if let Some(n) = expect.size.filter(|&n| n != received) {
        bail!("{url}: {received} bytes arrived, the listing says {n}: not the file it names (or a truncated one)");
    }
    if let (Some(h), Some(want)) = (hasher, &expect.sha256) {
        let got = format!("{:x}", h.finalize());
        if !got.eq_ignore_ascii_case(want) {
            bail!("{url}: its sha256 is {got}, the listing says {want}: a corrupt or substituted download");
        }
    }
    Ok(received)
}

/// A checkpoint's small file is what its name says: JSON that parses, text that is UTF-8 (a
/// captive portal's or a static host's fallback page is refused, and not kept).
pub fn check_small_file(name: &str, bytes: &[u8]) -> Result<()> {
    if name.ends_with(".json") {
        serde_json::from_slice::<serde::de::IgnoredAny>(bytes).with_context(|| {
            let start = String::from_utf8_lossy(&bytes[..bytes.len().min(40)]).into_owned();
            format!("{name} is not JSON (it starts {start:?}: an error or login page instead of the file?)")
        })?;
    } else if std::str::from_utf8(bytes).is_err() {
        bail!("{name} is not UTF-8 text");
    }
    Ok(())
}

/// [`fetch_bytes`] checked against a catalog entry's size and sha256: a file that does not match
/// is refused and not kept.
pub async fn fetch_verified(
    url: &str,
    expected: &crate::catalog::CatalogEntry,
    on_bytes: &mut OnBytes<'_>,
) -> Result<Vec<u8>> {
    fetch_bytes_checked(url, &Expect::default(), on_bytes, &|bytes| expected.verify(bytes)).await
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
    /// The sha256 the Hub's listing gives for a file stored with Git LFS (the weights).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
}

impl PlannedFile {
    /// What the download must be: the listing's size (when known) and sha256.
    pub fn expect(&self) -> Expect {
        Expect { size: Some(self.size).filter(|&n| n > 0), sha256: self.sha256.clone() }
    }
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
    let need = crate::weight_headers::header_len(&len).ok()??;
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

/// A Hub revision (a branch or tag) resolved to its commit: asked of the Hub each time (so a
/// branch that moved is followed), the last answer kept for offline visits. A 40-hex revision is
/// already a commit.
async fn resolve_commit(repo: &str, revision: &str) -> Result<String> {
    let is_commit = |r: &str| r.len() == 40 && r.chars().all(|c| c.is_ascii_hexdigit());
    if is_commit(revision) {
        return Ok(revision.to_lowercase());
    }
    let url = format!("https://huggingface.co/api/models/{repo}/revision/{revision}");
    let cache = open_cache().await;
    let answer = match network(&url, "GET").await {
        Ok(r) if r.ok() => {
            if let (Some(cache), Ok(copy)) = (&cache, r.clone()) {
                let _ = JsFuture::from(cache.put_with_str(&url, &copy)).await;
            }
            r
        }
        Ok(r) if r.status() == 404 || r.status() == 401 => {
            bail!(
                "{repo}@{revision} is not on the Hugging Face Hub (HTTP {}; a private or gated repo cannot load here)",
                r.status()
            )
        }
        _ => cached_response(cache.as_ref(), &url).await.with_context(|| {
            format!("cannot reach the Hugging Face Hub to resolve {repo}@{revision} (offline, and never loaded before)")
        })?,
    };
    let body = await_promise(&url, answer.text().map_err(|e| js_error(&url, e))?).await?;
    let info: serde_json::Value = serde_json::from_str(&body.as_string().unwrap_or_default())
        .with_context(|| format!("{url}: unexpected answer"))?;
    let sha = info.get("sha").and_then(|s| s.as_str()).unwrap_or_default();
    if !is_commit(sha) {
        bail!("{url}: the Hub did not name a commit for {repo}@{revision}");
    }
    Ok(sha.to_lowercase())
}

/// Plan a Hub checkpoint from the Hub's file listing (one request; sizes and LFS sha256s
/// included). The revision is pinned to its commit for the whole load: every URL names the
/// commit, so files of two commits never mix (in the cache either).
pub async fn plan_hub(repo: &str, revision: &str) -> Result<Plan> {
    let commit = resolve_commit(repo, revision).await?;
    let listing_url = format!("https://huggingface.co/api/models/{repo}/tree/{commit}");
    let json = |bytes: &[u8]| serde_json::from_slice::<serde_json::Value>(bytes).map(drop).map_err(anyhow::Error::from);
    let listing =
        fetch_bytes_checked(&listing_url, &Expect::default(), &mut |_, _, _| {}, &json).await.with_context(|| {
            format!("cannot list the files of {repo} on the Hugging Face Hub (check the repo id and your connection)")
        })?;
    let entries: Vec<serde_json::Value> =
        serde_json::from_slice(&listing).with_context(|| format!("{listing_url}: unexpected answer"))?;
    let entry = |name: &str| entries.iter().find(|e| e.get("path").and_then(|p| p.as_str()) == Some(name));
    let size_of = |name: &str| -> Option<u64> {
        let e = entry(name)?;
        e.get("lfs").and_then(|l| l.get("size")).or_else(|| e.get("size")).and_then(|s| s.as_u64())
    };
    let sha256_of = |name: &str| -> Option<String> {
        let oid = entry(name)?.get("lfs")?.get("oid")?.as_str()?;
        (oid.len() == 64 && oid.chars().all(|c| c.is_ascii_hexdigit())).then(|| oid.to_lowercase())
    };
    let base = hub_base_url(repo, &commit);
    let index = match size_of(WEIGHTS_INDEX) {
        Some(_) => {
            Some(fetch_bytes_checked(&join(&base, WEIGHTS_INDEX), &Expect::default(), &mut |_, _, _| {}, &json).await?)
        }
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
        files.push(PlannedFile { size: size_of(&name).unwrap_or(0), sha256: sha256_of(&name), name, url, cached });
    }
    Ok(Plan::new(&format!("{repo}@{}", &commit[..12]), &base, files))
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
        files.push(PlannedFile { name, url, size, cached, sha256: None });
    }
    Ok(Plan::new(label, base, files))
}
