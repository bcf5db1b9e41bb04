//! `--model` as a Hugging Face Hub repo id (`owner/name[@revision]`), fetched into the standard
//! Hugging Face cache (`$HF_HOME/hub`, default `~/.cache/huggingface/hub`) with `hf-hub`.
//! `HF_HUB_OFFLINE=1` uses the cache only and names any file that is missing.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use hf_hub::{Cache, Repo, RepoType};

/// Files a LLaVA checkpoint may have besides its weights; only `config.json` and `tokenizer.json`
/// are required (the processor config can also live in `processor_config.json`).
const REQUIRED: &[&str] = &["config.json", "tokenizer.json"];
const OPTIONAL: &[&str] = &[
    "tokenizer_config.json",
    "preprocessor_config.json",
    "processor_config.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
];

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
    let Some(repo) = RepoRef::parse(spec) else {
        bail!("{spec}: no such folder, and not a Hugging Face repo id (owner/name[@revision])");
    };
    if offline() {
        resolve_cached(&repo, &Cache::from_env())
    } else {
        download(&repo)
    }
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
    for file in REQUIRED {
        cached.get(file).ok_or_else(|| missing(file))?;
    }
    for file in weight_files(&snapshot, |f| cached.get(f).is_some())? {
        cached.get(&file).ok_or_else(|| missing(&file))?;
    }
    Ok(snapshot)
}

/// The weight files: shards named by the index if there is one, else `model.safetensors`.
fn weight_files(snapshot: &Path, has: impl Fn(&str) -> bool) -> Result<Vec<String>> {
    if has("model.safetensors.index.json") {
        let text = std::fs::read_to_string(snapshot.join("model.safetensors.index.json"))?;
        return crate::weights::shard_names_from_index(&text);
    }
    Ok(vec!["model.safetensors".to_owned()])
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
    for file in REQUIRED {
        api.get(file).with_context(|| format!("downloading {file} of {label}"))?;
    }
    for file in OPTIONAL {
        // Absent files are normal (each checkpoint has a different subset).
        let _ = api.get(file);
    }
    let has_index = api.get("model.safetensors.index.json").is_ok();
    for file in weight_files(&snapshot, |f| has_index && f == "model.safetensors.index.json")? {
        api.get(&file).with_context(|| format!("downloading {file} of {label}"))?;
    }
    Ok(snapshot)
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
