#![cfg(not(target_arch = "wasm32"))]
//! The vectors catalog (www/vectors/catalog.json): every entry matches its published file
//! (size, sha256), fits its model, and a tampered download is refused.

mod common;

use std::path::PathBuf;

use cmrm::catalog::{entry_for, Catalog};
use cmrm::steering::SteeringVectors;
use cmrm::Vlm;

fn www() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("www")
}

#[test]
fn catalog_entries_match_their_files() {
    let path = www().join("vectors/catalog.json");
    let catalog = Catalog::from_json("catalog.json", &std::fs::read_to_string(&path).unwrap()).unwrap();
    assert!(!catalog.entries.is_empty());
    let bundled: Vec<_> = catalog.entries.iter().filter(|e| e.model.starts_with("bundled:")).collect();
    assert!(!bundled.is_empty(), "the bundled default model needs its catalog entry");
    for entry in bundled {
        let name = entry.model.trim_start_matches("bundled:");
        // Relative URLs are relative to the page (www/).
        let bytes = std::fs::read(www().join(&entry.vectors_url)).unwrap();
        entry.verify(&bytes).unwrap();
        let vlm = Vlm::load_dir(&www().join("assets/models").join(name)).unwrap();
        assert_eq!(entry.fingerprint, vlm.config().fingerprint());
        let vectors = SteeringVectors::from_bytes(&entry.vectors_url, &bytes).unwrap();
        vectors.validate_for(&entry.vectors_url, vlm.config()).unwrap();
        // The entry is exactly what `cmrm vectors catalog-entry` computes.
        let again =
            entry_for(&bytes, &entry.vectors_url, &entry.model, &entry.revision, &entry.calibration.name).unwrap();
        assert_eq!(&again, entry);
        assert_eq!(catalog.entries_for(&entry.model, &entry.revision).count(), 1);
    }
}

#[test]
fn tampered_or_truncated_downloads_are_refused() {
    let catalog =
        Catalog::from_json("catalog.json", &std::fs::read_to_string(www().join("vectors/catalog.json")).unwrap())
            .unwrap();
    let entry = &catalog.entries[0];
    let mut bytes = std::fs::read(www().join(&entry.vectors_url)).unwrap();
    let msg = entry.verify(&bytes[..bytes.len() - 1]).unwrap_err().to_string();
    assert!(msg.contains("the catalog says") && msg.contains("incomplete"), "{msg}");
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    let msg = entry.verify(&bytes).unwrap_err().to_string();
    assert!(msg.contains("sha256") && msg.contains("does not match"), "{msg}");

    let msg = Catalog::from_json("c.json", r#"{"format": "other/2", "entries": []}"#).unwrap_err().to_string();
    assert!(msg.contains("expected 'cmrm-catalog/1'"), "{msg}");
}
