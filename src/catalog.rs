//! The vectors catalog (`www/vectors/catalog.json`): one entry per published CMRM vector file, so
//! the page can find precomputed vectors for a model and check the download (sha256, size).

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::steering::SteeringVectors;

/// `format` of a catalog file.
pub const CATALOG_FORMAT: &str = "cmrm-catalog/1";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CatalogEntry {
    /// Hugging Face repo id (`owner/name`), or `bundled:NAME` for a model shipped with the page.
    pub model: String,
    pub revision: String,
    /// The architecture fingerprint the vectors were extracted from (`LlavaConfig::fingerprint`).
    pub fingerprint: String,
    /// Where the vector file is published (absolute, or relative to the page).
    pub vectors_url: String,
    pub sha256: String,
    pub size: u64,
    pub method: String,
    pub anchor: String,
    pub calibration: CalibrationInfo,
    pub default_alpha: f32,
    pub default_layers: String,
    /// Absent in catalogs written before it existed: every position.
    #[serde(default = "all_positions")]
    pub default_positions: String,
}

fn all_positions() -> String {
    "all".into()
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CalibrationInfo {
    pub name: String,
    pub size: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Catalog {
    pub format: String,
    pub entries: Vec<CatalogEntry>,
}

/// Lower-case hex sha256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// The catalog entry of a vector file (`bytes`, as published at `vectors_url`).
pub fn entry_for(
    bytes: &[u8],
    vectors_url: &str,
    model: &str,
    revision: &str,
    calibration_name: &str,
) -> Result<CatalogEntry> {
    let vectors = SteeringVectors::from_bytes(vectors_url, bytes)?;
    let meta = |key: &str| vectors.metadata.get(key).cloned();
    Ok(CatalogEntry {
        model: model.to_owned(),
        revision: revision.to_owned(),
        fingerprint: meta("model").context("the vector file records no model fingerprint (metadata 'model')")?,
        vectors_url: vectors_url.to_owned(),
        sha256: sha256_hex(bytes),
        size: bytes.len() as u64,
        method: meta("method").unwrap_or_else(|| "mean".into()),
        anchor: meta("anchor").unwrap_or_else(|| "unknown".into()),
        calibration: CalibrationInfo {
            name: calibration_name.to_owned(),
            size: meta("n_calibration").and_then(|n| n.parse().ok()).unwrap_or(0),
        },
        default_alpha: meta("default_alpha").and_then(|a| a.parse().ok()).unwrap_or(1.0),
        default_layers: meta("default_layers").unwrap_or_else(|| "all".into()),
        default_positions: meta("default_positions").unwrap_or_else(all_positions),
    })
}

impl Catalog {
    pub fn from_json(name: &str, text: &str) -> Result<Self> {
        let catalog: Self =
            serde_json::from_str(text).with_context(|| format!("{name}: not a valid vectors catalog"))?;
        if catalog.format != CATALOG_FORMAT {
            bail!("{name}: format is '{}', expected '{CATALOG_FORMAT}'", catalog.format);
        }
        Ok(catalog)
    }

    /// Entries for a model (`owner/name` or `bundled:NAME`) at a revision.
    pub fn entries_for<'a>(&'a self, model: &'a str, revision: &'a str) -> impl Iterator<Item = &'a CatalogEntry> + 'a {
        self.entries.iter().filter(move |e| e.model == model && e.revision == revision)
    }
}

impl CatalogEntry {
    /// Check downloaded bytes against the entry: size, then sha256.
    pub fn verify(&self, bytes: &[u8]) -> Result<()> {
        if bytes.len() as u64 != self.size {
            bail!(
                "{}: {} bytes, the catalog says {} — the file changed or the download is incomplete",
                self.vectors_url,
                bytes.len(),
                self.size
            );
        }
        let got = sha256_hex(bytes);
        if got != self.sha256 {
            bail!("{}: sha256 {got} does not match the catalog's {} — not using it", self.vectors_url, self.sha256);
        }
        Ok(())
    }
}
