#![cfg(not(target_arch = "wasm32"))]
//! `scripts/publish-vectors.sh owner/name`, offline: a Hugging Face cache pre-populated with the
//! real llava-interleave files (2+2 layers, synthetic weights) stands in for the Hub. The script
//! inspects the model, extracts CMRM vectors over the built-in calibration set, writes a q4 copy
//! and prints a catalog entry whose size and sha256 are the file's.

use std::path::PathBuf;
use std::process::Command;

use sha2::Digest;

#[test]
fn publish_vectors_from_an_offline_hf_cache() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let work = std::env::temp_dir().join(format!("cmrm-publish-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    let checkpoint = work.join("checkpoint");
    cmrm::synthetic::write_checkpoint(
        &root.join("tests/fixtures/real/llava-interleave-qwen-0.5b-hf"),
        &checkpoint,
        Some((2, 2)),
        None,
    )
    .unwrap();
    // The cache layout hf-hub reads: refs/main names a snapshot folder holding the files.
    let home = work.join("hf-home");
    let repo = home.join("hub/models--real--llava-interleave-qwen-0.5b-hf");
    let commit = "187fe5eb0000000000000000000000000000beef";
    let snapshot = repo.join("snapshots").join(commit);
    std::fs::create_dir_all(&snapshot).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), commit).unwrap();
    for entry in std::fs::read_dir(&checkpoint).unwrap() {
        let entry = entry.unwrap();
        std::os::unix::fs::symlink(entry.path(), snapshot.join(entry.file_name())).unwrap();
    }
    let out = work.join("out");
    let run = Command::new("bash")
        .arg(root.join("scripts/publish-vectors.sh"))
        .args(["real/llava-interleave-qwen-0.5b-hf", "--out"])
        .arg(&out)
        .args(["--url-base", "https://example.org/vectors", "--quantize", "q4"])
        .env("CMRM", env!("CARGO_BIN_EXE_cmrm"))
        .env("HF_HOME", &home)
        .env("HF_HUB_OFFLINE", "1")
        .env("HTTPS_PROXY", "http://127.0.0.1:9") // any network use would fail loudly
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stderr}");
    assert!(stderr.contains("architecture   llava: siglip_vision_model + qwen2"), "{stderr}");

    let file = out.join("llava-interleave-qwen-0.5b-hf.cmrm.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    let vectors = cmrm::SteeringVectors::from_bytes("published", &bytes).unwrap();
    assert_eq!((vectors.hidden_size, vectors.layers.len()), (1024, 2));
    assert_eq!(vectors.metadata.get("n_calibration").map(String::as_str), Some("40"), "the built-in set");

    let entry: serde_json::Value = serde_json::from_slice(&run.stdout).unwrap();
    assert_eq!(entry["model"], "real/llava-interleave-qwen-0.5b-hf");
    assert_eq!(entry["vectors_url"], "https://example.org/vectors/llava-interleave-qwen-0.5b-hf.cmrm.safetensors");
    assert_eq!(entry["calibration"]["name"], "builtin-v1");
    assert_eq!(entry["size"], bytes.len());
    assert_eq!(entry["sha256"], format!("{:x}", sha2::Sha256::digest(&bytes)));
    let copy = out.join("llava-interleave-qwen-0.5b-hf-q4");
    assert!(copy.join("model.gguf").exists() && copy.join("chat_template.json").exists());
    let _ = std::fs::remove_dir_all(&work);
}
