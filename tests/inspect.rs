//! `cmrm inspect`: the facts of a model from its small files and weight headers only.
//! - the real llava-interleave files (no weights at all) give transformers' prompt, input_ids and
//!   image tokens (tests/fixtures/real/refs.json), its EOS ids and parameter count;
//! - a Hub repo (a local server speaking the Hub's listing and `resolve` URLs, `HF_ENDPOINT`) is
//!   inspected with range requests: the weights' headers, not the weights;
//! - a `cmrm quantize` GGUF copy reports its blocks; a broken template fails before any weight.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};

use serde_json::Value;

fn cmrm(args: &[&str], env: &[(&str, &Path)]) -> (bool, Value, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_cmrm"));
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let json = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    (out.status.success(), json, stderr)
}

fn temp(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("cmrm-inspect-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The real interleave small files (tokenizer decompressed), no weights.
fn real_small_files() -> PathBuf {
    let dir = temp("real");
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/real/llava-interleave-qwen-0.5b-hf");
    for entry in std::fs::read_dir(src).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_owned();
        if let Some(plain) = name.strip_suffix(".gz") {
            let mut d = flate2::read::GzDecoder::new(std::fs::File::open(&path).unwrap());
            std::io::copy(&mut d, &mut std::fs::File::create(dir.join(plain)).unwrap()).unwrap();
        } else if !name.ends_with(".md") {
            std::fs::copy(&path, dir.join(name)).unwrap();
        }
    }
    dir
}

fn refs() -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/real/refs.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn real_interleave_files_match_transformers_processor() {
    let dir = real_small_files();
    let refs = refs();
    for case in refs["processor"]["cases"].as_array().unwrap() {
        let question = case["question"].as_str().unwrap();
        let mut args = vec!["inspect", "--model", dir.to_str().unwrap(), "--prompt", question, "--json"];
        let image = case["image"]
            .as_str()
            .map(|f| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/images/files").join(f));
        if let Some(image) = &image {
            args.extend(["--image", image.to_str().unwrap()]);
        }
        let (ok, v, err) = cmrm(&args, &[]);
        assert!(ok, "{err}");
        assert_eq!(v["prompt"], case["prompt"], "{}", case["case"]);
        assert_eq!(v["input_ids"], case["input_ids"], "{}", case["case"]);
        assert_eq!(v["n_image_tokens"], case["n_image_tokens"]);
        assert_eq!(v["image_span"], case["image_span"]);
        assert_eq!(v["eos_token_ids"], refs["processor"]["eos_token_ids"]);
        assert_eq!(v["n_params"], refs["processor"]["full_config_n_params"]);
        assert_eq!(v["n_params_from"], "config");
        assert_eq!(v["chat_template"], "chat_template.json");
        assert_eq!(v["architecture"], "llava: siglip_vision_model + qwen2");
        assert_eq!(v["config"]["text_config"]["rms_norm_eps"], 1e-6);
        let defaulted: Vec<&str> =
            v["defaulted_keys"].as_array().unwrap().iter().map(|k| k.as_str().unwrap()).collect();
        assert!(defaulted.contains(&"text_config.rms_norm_eps") && defaulted.contains(&"text_config.hidden_act"));
        assert!(!defaulted.contains(&"text_config.hidden_size"), "{defaulted:?}");
        let bytes = |f: &str| v["formats"][f]["bytes"].as_u64().unwrap();
        assert!(bytes("f32") > bytes("q8_0") && bytes("q8_0") > bytes("q4"));
        assert_eq!(v["formats"]["q4"]["fits_browser"], true);
        if image.is_some() {
            assert_eq!(v["image"]["model_input"], serde_json::json!([384, 384]));
        }
    }
    // The human report marks defaults and names the template.
    let out =
        Command::new(env!("CARGO_BIN_EXE_cmrm")).args(["inspect", "--model", dir.to_str().unwrap()]).output().unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        report.contains("* text_config.rms_norm_eps = 0.000001")
            || report.contains("* text_config.rms_norm_eps = 1e-6"),
        "{report}"
    );
    assert!(report.contains("chat template  chat_template.json"), "{report}");
    std::fs::remove_dir_all(dir).unwrap();
}

/// `(request path, bytes sent)` of every request the test Hub answered.
type Served = Arc<Mutex<Vec<(String, u64)>>>;

/// A minimal Hub: `GET /api/models/{repo}/tree/{rev}` lists `dir`, `GET /{repo}/resolve/{rev}/{file}`
/// serves a file, honouring `Range`.
fn hub_server(repo: &'static str, dir: PathBuf) -> (String, Served) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = format!("http://{}", listener.local_addr().unwrap());
    let log = Served::default();
    let served = Arc::clone(&log);
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            let path = line.split_whitespace().nth(1).unwrap_or("/").to_owned();
            let mut range = None;
            loop {
                let mut header = String::new();
                reader.read_line(&mut header).unwrap();
                if header.trim().is_empty() {
                    break;
                }
                if let Some(r) = header.to_lowercase().strip_prefix("range: bytes=") {
                    let (a, b) = r.trim().split_once('-').unwrap();
                    range = Some((a.parse::<u64>().unwrap(), b.parse::<u64>().unwrap()));
                }
            }
            let listing = format!("/api/models/{repo}/tree/main");
            let (status, body) = if path == listing {
                let entries: Vec<Value> = std::fs::read_dir(&dir)
                    .unwrap()
                    .map(|e| {
                        let e = e.unwrap();
                        let size = e.metadata().unwrap().len();
                        serde_json::json!({"type": "file", "path": e.file_name().to_str().unwrap(), "size": size})
                    })
                    .collect();
                ("200 OK", serde_json::to_vec(&entries).unwrap())
            } else if let Some(file) = path.strip_prefix(&format!("/{repo}/resolve/main/")) {
                match std::fs::read(dir.join(file)) {
                    Ok(bytes) => match range {
                        Some((a, b)) => {
                            let end = (b + 1).min(bytes.len() as u64);
                            ("206 Partial Content", bytes[a as usize..end as usize].to_vec())
                        }
                        None => ("200 OK", bytes),
                    },
                    Err(_) => ("404 Not Found", Vec::new()),
                }
            } else {
                ("404 Not Found", Vec::new())
            };
            served.lock().unwrap().push((path, body.len() as u64));
            let _ = write!(stream, "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
            let _ = stream.write_all(&body);
            let _ = stream.flush();
            let _ = reader.read(&mut [0u8; 0]);
        }
    });
    (addr, log)
}

#[test]
fn hub_repo_is_inspected_with_range_requests() {
    let model = common::model_dir(common::MODELS[1]);
    let weights = std::fs::metadata(model.join("model.safetensors")).unwrap().len();
    let (endpoint, log) = hub_server("tiny/siglip-qwen2", model);
    let home = temp("hf-home");
    let (ok, v, err) = Command::new(env!("CARGO_BIN_EXE_cmrm"))
        .args(["inspect", "--model", "tiny/siglip-qwen2", "--json"])
        .env("HF_ENDPOINT", &endpoint)
        .env("HF_HOME", &home)
        .env_remove("HF_HUB_OFFLINE")
        .output()
        .map(|o| {
            (
                o.status.success(),
                serde_json::from_slice(&o.stdout).unwrap_or(Value::Null),
                String::from_utf8_lossy(&o.stderr).into_owned(),
            )
        })
        .unwrap();
    assert!(ok, "{err}");
    let file = &v["weight_files"][0];
    assert_eq!(file["name"], "model.safetensors");
    assert_eq!(file["bytes"], weights);
    assert_eq!(file["tensors"], 79);
    assert_eq!(file["params"], v["n_params"]);
    assert_eq!(v["n_params_from"], "weight files");
    let weight_bytes: u64 =
        log.lock().unwrap().iter().filter(|(p, _)| p.ends_with("model.safetensors")).map(|(_, n)| n).sum();
    assert!(weight_bytes > 0 && weight_bytes < weights / 4, "{weight_bytes} of {weights} weight bytes were fetched");
    let _ = std::fs::remove_dir_all(home);
}

#[test]
fn quantized_copy_and_broken_template() {
    let model = common::model_dir(common::MODELS[1]);
    let copy = temp("q8");
    let (ok, _, err) = cmrm(
        &[
            "quantize",
            "--model",
            model.to_str().unwrap(),
            "--format",
            "q8_0",
            "--out",
            copy.join("out").to_str().unwrap(),
        ],
        &[],
    );
    assert!(ok, "{err}");
    let (ok, original, err) = cmrm(&["inspect", "--model", model.to_str().unwrap(), "--json"], &[]);
    assert!(ok, "{err}");
    let (ok, v, err) = cmrm(&["inspect", "--model", copy.join("out").to_str().unwrap(), "--json"], &[]);
    assert!(ok, "{err}");
    assert_eq!(v["weight_files"][0]["name"], "model.gguf");
    assert!(v["weight_files"][0]["dtypes"]["Q8_0"].as_u64().unwrap() > 0, "{}", v["weight_files"][0]);
    assert_eq!(v["n_params"], original["n_params"], "the copy holds the same parameters");
    assert_eq!(v["input_ids"], original["input_ids"]);

    // A template that does not parse is reported before anything else is read.
    let broken = temp("broken");
    for e in std::fs::read_dir(&model).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), broken.join(e.file_name())).unwrap();
    }
    std::fs::write(broken.join("chat_template.jinja"), "{% for m in messages %}{{ m.role }").unwrap();
    let (ok, _, err) = cmrm(&["inspect", "--model", broken.to_str().unwrap()], &[]);
    assert!(!ok && err.contains("chat_template.jinja") && err.contains("does not parse"), "{err}");
    let (ok, _, err) = cmrm(&["generate", "--model", broken.to_str().unwrap(), "--prompt", "hi"], &[]);
    assert!(!ok && err.contains("does not parse"), "{err}");
    let _ = std::fs::remove_dir_all(copy);
    let _ = std::fs::remove_dir_all(broken);
}
