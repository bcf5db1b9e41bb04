//! `--model` as a Hugging Face Hub repo id (`owner/name[@revision]`), fetched into the standard
//! Hugging Face cache (`$HF_HOME/hub`, default `~/.cache/huggingface/hub`) with `hf-hub`.
//! `HF_HUB_OFFLINE=1` uses the cache only and names any file that is missing.
//!
//! [`inspect_sources`] reads only a model's small files and its weight files' headers (HTTP range
//! requests on the Hub, `HF_ENDPOINT` / `HF_TOKEN` honoured): what `cmrm inspect` needs.

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use hf_hub::{Cache, Repo, RepoType};

use crate::checkpoint::{
    is_weight_file, weight_file_names, SmallFiles, WeightFileInfo, OPTIONAL_FILES, REQUIRED_FILES, WEIGHTS_INDEX,
};

/// A parsed `owner/name[@revision]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepoRef {
    pub repo_id: String,
    pub revision: String,
}

impl RepoRef {
    /// `None` when `spec` does not look like a repo id (it is then a local path).
    pub fn parse(spec: &str) -> Option<Self> {
        let (id, revision) = match spec.split_once('@') {
            Some((id, rev)) if !rev.is_empty() => (id, rev.to_owned()),
            Some(_) => return None,
            None => (spec, "main".to_owned()),
        };
        let mut parts = id.split('/');
        let (owner, name) = (parts.next()?, parts.next()?);
        let valid = |s: &str| {
            !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) && s != "." && s != ".."
        };
        if parts.next().is_some() || !valid(owner) || !valid(name) {
            return None;
        }
        Some(Self { repo_id: id.to_owned(), revision })
    }

    fn repo(&self) -> Repo {
        Repo::with_revision(self.repo_id.clone(), RepoType::Model, self.revision.clone())
    }
}

fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| !v.is_empty() && v != "0" && v.to_lowercase() != "false")
}

/// A local folder as is; otherwise a repo id resolved to its snapshot folder in the HF cache
/// (downloading what is missing unless offline).
pub fn resolve_model(spec: &str) -> Result<PathBuf> {
    let path = Path::new(spec);
    if path.exists() {
        return Ok(path.to_path_buf());
    }
    let repo = parse_repo(spec)?;
    if offline() {
        resolve_cached(&repo, &Cache::from_env())
    } else {
        download(&repo)
    }
}

fn parse_repo(spec: &str) -> Result<RepoRef> {
    RepoRef::parse(spec)
        .with_context(|| format!("{spec}: no such folder, and not a Hugging Face repo id (owner/name[@revision])"))
}

/// Resolve from the cache only.
pub fn resolve_cached(repo: &RepoRef, cache: &Cache) -> Result<PathBuf> {
    let cached = cache.repo(repo.repo());
    let missing = |file: &str| {
        anyhow::anyhow!(
            "offline (HF_HUB_OFFLINE is set) and {file} of {}@{} is not in the Hugging Face cache at {}; \
             run once with the network on, or `huggingface-cli download {} --revision {}`",
            repo.repo_id,
            repo.revision,
            cache.path().display(),
            repo.repo_id,
            repo.revision
        )
    };
    let config = cached.get("config.json").ok_or_else(|| missing("config.json"))?;
    let snapshot = config.parent().context("cache path has no parent")?.to_path_buf();
    for file in REQUIRED_FILES {
        cached.get(file).ok_or_else(|| missing(file))?;
    }
    let index = snapshot.join(WEIGHTS_INDEX);
    // No weight file cached at all: name the one a checkpoint normally has.
    let weights = weight_file_names(&|f| cached.get(f).is_some(), &mut || Ok(std::fs::read_to_string(&index)?))
        .map_err(|_| missing("model.safetensors"))?;
    for file in weights {
        cached.get(&file).ok_or_else(|| missing(&file))?;
    }
    Ok(snapshot)
}

fn download(repo: &RepoRef) -> Result<PathBuf> {
    let api = hf_hub::api::sync::ApiBuilder::from_env()
        .with_progress(true)
        .build()
        .context("cannot set up the Hugging Face Hub client")?
        .repo(repo.repo());
    let label = format!("{}@{}", repo.repo_id, repo.revision);
    let config = api.get("config.json").with_context(|| format!("downloading config.json of {label}"))?;
    let snapshot = config.parent().context("cache path has no parent")?.to_path_buf();
    for file in REQUIRED_FILES {
        api.get(file).with_context(|| format!("downloading {file} of {label}"))?;
    }
    // The listing says which optional files exist, so only real failures are errors.
    let listing = HubClient::new(repo).listing()?;
    for file in OPTIONAL_FILES.iter().filter(|f| listing.iter().any(|(n, _)| n == *f)) {
        api.get(file).with_context(|| format!("downloading {file} of {label}"))?;
    }
    let has = |name: &str| listing.iter().any(|(n, _)| n == name);
    let weights = weight_file_names(&has, &mut || {
        let path = api.get(WEIGHTS_INDEX).with_context(|| format!("downloading {WEIGHTS_INDEX} of {label}"))?;
        Ok(std::fs::read_to_string(path)?)
    })
    .with_context(|| label.clone())?;
    for file in weights {
        api.get(&file).with_context(|| format!("downloading {file} of {label}"))?;
    }
    Ok(snapshot)
}

/// The Hub's HTTP API for one repo: file listing, small files, byte ranges.
struct HubClient {
    endpoint: String,
    repo: RepoRef,
    token: Option<String>,
}

impl HubClient {
    fn new(repo: &RepoRef) -> Self {
        let endpoint = std::env::var("HF_ENDPOINT").unwrap_or_else(|_| "https://huggingface.co".to_owned());
        let token = std::env::var("HF_TOKEN").ok().filter(|t| !t.is_empty());
        Self { endpoint: endpoint.trim_end_matches('/').to_owned(), repo: repo.clone(), token }
    }

    fn get(&self, url: &str, range: Option<(u64, u64)>) -> Result<ureq::Response> {
        let mut request = ureq::get(url).timeout(std::time::Duration::from_secs(60));
        if let Some(token) = &self.token {
            request = request.set("Authorization", &format!("Bearer {token}"));
        }
        if let Some((start, end)) = range {
            request = request.set("Range", &format!("bytes={start}-{end}"));
        }
        request.call().map_err(|e| match e {
            ureq::Error::Status(404, _) => anyhow::anyhow!("{url}: not found (404)"),
            ureq::Error::Status(code @ (401 | 403), _) => {
                anyhow::anyhow!("{url}: HTTP {code} (a gated or private repo needs HF_TOKEN)")
            }
            other => anyhow::anyhow!("{url}: {other}"),
        })
    }

    /// `(path, size)` of every top-level file at the revision.
    fn listing(&self) -> Result<Vec<(String, Option<u64>)>> {
        let url = format!("{}/api/models/{}/tree/{}", self.endpoint, self.repo.repo_id, self.repo.revision);
        let body: serde_json::Value =
            self.get(&url, None)?.into_json().with_context(|| format!("{url}: not a file listing"))?;
        let entries = body.as_array().with_context(|| format!("{url}: not a file listing"))?;
        Ok(entries
            .iter()
            .filter_map(|e| {
                let path = e.get("path")?.as_str()?.to_owned();
                let size = e.get("lfs").and_then(|l| l.get("size")).or_else(|| e.get("size")).and_then(|s| s.as_u64());
                Some((path, size))
            })
            .collect())
    }

    fn file_url(&self, name: &str) -> String {
        format!("{}/{}/resolve/{}/{name}", self.endpoint, self.repo.repo_id, self.repo.revision)
    }

    /// A small file, whole (at most `limit` bytes).
    fn small_file(&self, name: &str, limit: u64) -> Result<Vec<u8>> {
        read_at_most(self.get(&self.file_url(name), None)?.into_reader(), limit, name)
    }

    /// The first `len` bytes of a file (a server that ignores the range is read no further).
    fn prefix(&self, name: &str, len: u64) -> Result<Vec<u8>> {
        let response = self.get(&self.file_url(name), Some((0, len.saturating_sub(1))))?;
        let mut bytes = Vec::new();
        response.into_reader().take(len).read_to_end(&mut bytes)?;
        Ok(bytes)
    }
}

/// Largest small file read (a 7 MB tokenizer is the largest a real checkpoint has).
const SMALL_FILE_LIMIT: u64 = 64 << 20;

fn read_at_most(reader: impl Read, limit: u64, name: &str) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    reader.take(limit + 1).read_to_end(&mut bytes).with_context(|| format!("reading {name}"))?;
    if bytes.len() as u64 > limit {
        bail!("{name} is over {} MiB: not a small file", limit >> 20);
    }
    Ok(bytes)
}

/// A weight file's header from `read_prefix(len)` (its first `len` bytes): the safetensors
/// length, then the JSON; a GGUF header in growing prefixes.
fn weight_header(
    name: &str,
    size: Option<u64>,
    read_prefix: &mut dyn FnMut(u64) -> Result<Vec<u8>>,
) -> Result<WeightFileInfo> {
    let first = read_prefix(1 << 16)?;
    if first.starts_with(b"GGUF") {
        let mut len = 1u64 << 16;
        let mut bytes = first;
        loop {
            if let Some(info) = WeightFileInfo::from_prefix(name, size, &bytes)? {
                return Ok(info);
            }
            if (bytes.len() as u64) < len || len > crate::weight_headers::MAX_HEADER_BYTES {
                bail!("{name}: the GGUF header does not end");
            }
            len *= 4;
            bytes = read_prefix(len)?;
        }
    }
    let need = crate::weight_headers::header_len(&first)?
        .with_context(|| format!("{name}: too short for a safetensors file"))?;
    let bytes = if (first.len() as u64) >= need { first } else { read_prefix(need)? };
    WeightFileInfo::from_prefix(name, size, &bytes)?.with_context(|| format!("{name}: truncated safetensors header"))
}

fn local_weight_header(path: &Path) -> Result<WeightFileInfo> {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_owned();
    let size = std::fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?.len();
    weight_header(&name, Some(size), &mut |len| {
        let mut bytes = Vec::new();
        std::fs::File::open(path)?.take(len).read_to_end(&mut bytes)?;
        Ok(bytes)
    })
    .with_context(|| format!("reading the header of {}", path.display()))
}

/// A model's small files and weight headers, reading nothing else: a folder; a Hub repo
/// (listing, small files, header ranges); offline, the Hub cache (weights not in it are listed
/// unread).
pub fn inspect_sources(spec: &str) -> Result<(SmallFiles, Vec<WeightFileInfo>)> {
    let path = Path::new(spec);
    if path.is_dir() {
        return local_sources(path, &mut |p| local_weight_header(p).map(Some));
    }
    let repo = parse_repo(spec)?;
    if offline() {
        let cache = Cache::from_env();
        let cached = cache.repo(repo.repo());
        let config = cached.get("config.json").with_context(|| {
            format!(
                "offline (HF_HUB_OFFLINE is set) and {}@{} is not in the Hugging Face cache",
                repo.repo_id, repo.revision
            )
        })?;
        let snapshot = config.parent().context("cache path has no parent")?.to_path_buf();
        return local_sources(&snapshot, &mut |p| if p.exists() { local_weight_header(p).map(Some) } else { Ok(None) });
    }
    let client = HubClient::new(&repo);
    let label = format!("{}@{}", repo.repo_id, repo.revision);
    let listing = client.listing().with_context(|| format!("listing the files of {label}"))?;
    let size_of = |name: &str| listing.iter().find(|(n, _)| n == name).map(|(_, s)| *s);
    let mut files = SmallFiles::default();
    for name in REQUIRED_FILES.iter().chain(&OPTIONAL_FILES) {
        match size_of(name) {
            Some(_) => {
                let bytes = client.small_file(name, SMALL_FILE_LIMIT).with_context(|| format!("{label}: {name}"))?;
                files.insert(name, bytes)?;
            }
            None if REQUIRED_FILES.contains(name) => bail!("{label} has no {name}"),
            None => {}
        }
    }
    let names = weight_file_names(&|n| size_of(n).is_some(), &mut || {
        Ok(String::from_utf8(client.small_file(WEIGHTS_INDEX, SMALL_FILE_LIMIT)?)?)
    })
    .with_context(|| label.clone())?;
    let mut weights = Vec::new();
    for name in names.iter().filter(|n| is_weight_file(n)) {
        let size = size_of(name).flatten();
        let info = weight_header(name, size, &mut |len| client.prefix(name, len))
            .with_context(|| format!("{label}: {name}"))?;
        weights.push(info);
    }
    Ok((files, weights))
}

fn local_sources(
    dir: &Path,
    header: &mut dyn FnMut(&Path) -> Result<Option<WeightFileInfo>>,
) -> Result<(SmallFiles, Vec<WeightFileInfo>)> {
    let files = SmallFiles::read_dir(dir)?;
    let index = dir.join(WEIGHTS_INDEX);
    // A folder of small files only (weights not downloaded yet) is inspected from its config.
    let names = match weight_file_names(&|n| dir.join(n).exists(), &mut || Ok(std::fs::read_to_string(&index)?)) {
        Ok(names) => names,
        Err(_) if !index.exists() => Vec::new(),
        Err(e) => return Err(e.context(dir.display().to_string())),
    };
    let mut weights = Vec::new();
    for name in names {
        let path = dir.join(&name);
        weights.push(header(&path)?.unwrap_or_else(|| WeightFileInfo::unread(&name, None)));
    }
    Ok((files, weights))
}

#[cfg(test)]
mod tests {
    use super::RepoRef;

    #[test]
    fn repo_ids() {
        assert_eq!(
            RepoRef::parse("llava-hf/llava-interleave-qwen-0.5b-hf"),
            Some(RepoRef { repo_id: "llava-hf/llava-interleave-qwen-0.5b-hf".into(), revision: "main".into() })
        );
        assert_eq!(RepoRef::parse("a/b@v1.0").unwrap().revision, "v1.0");
        for bad in ["a", "a/b/c", "./b", "../x", "a/b@", "/abs/path", "a b/c"] {
            assert_eq!(RepoRef::parse(bad), None, "{bad}");
        }
    }
}
