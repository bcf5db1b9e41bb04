#![cfg(not(target_arch = "wasm32"))]
//! The crate's modules import one another one way: no module reaches, through `crate::…` or
//! `super::…` paths, back to one that imports it. (A file is a module; `foo/mod.rs` is `foo`.)

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Module path (`gpu::ops`) → the source file's text without comment lines.
fn modules() -> BTreeMap<String, String> {
    fn walk(dir: &Path, out: &mut BTreeMap<String, String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let rel = path.strip_prefix("src").unwrap().with_extension("");
                let mut name = rel.to_string_lossy().replace(['/', '\\'], "::");
                if let Some(parent) = name.strip_suffix("::mod") {
                    name = parent.to_owned();
                }
                if name == "lib" || name.starts_with("bin::") {
                    continue;
                }
                let text = std::fs::read_to_string(&path).unwrap();
                let code: Vec<&str> = text.lines().filter(|l| !l.trim_start().starts_with("//")).collect();
                out.insert(name, code.join("\n"));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(Path::new("src"), &mut out);
    out
}

/// The longest known module that a path (`gpu::ops::linear`) starts with.
fn module_of(path: &str, known: &BTreeMap<String, String>) -> Option<String> {
    let parts: Vec<&str> = path.split("::").collect();
    (1..=parts.len()).rev().map(|k| parts[..k].join("::")).find(|m| known.contains_key(m))
}

/// Paths following `prefix` in `code` (`crate::` → `gpu::ops::linear`).
fn paths_after<'a>(code: &'a str, prefix: &str) -> Vec<&'a str> {
    code.match_indices(prefix)
        .map(|(i, _)| {
            let rest = &code[i + prefix.len()..];
            let end = rest.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':')).unwrap_or(rest.len());
            rest[..end].trim_end_matches(':')
        })
        .collect()
}

fn imports(name: &str, code: &str, known: &BTreeMap<String, String>) -> BTreeSet<String> {
    let parent = name.rsplit_once("::").map_or("", |(p, _)| p);
    let mut deps = BTreeSet::new();
    let crate_paths = paths_after(code, "crate::").into_iter().map(str::to_owned);
    let super_paths = paths_after(code, "super::").into_iter().map(|p| {
        if parent.is_empty() {
            p.to_owned()
        } else {
            format!("{parent}::{p}")
        }
    });
    for path in crate_paths.chain(super_paths) {
        if let Some(m) = module_of(&path, known) {
            // A module may use its own children and itself.
            if m != name && !m.starts_with(&format!("{name}::")) && !name.starts_with(&format!("{m}::")) {
                deps.insert(m);
            }
        }
    }
    deps
}

#[test]
fn modules_import_one_another_one_way() {
    let known = modules();
    assert!(known.len() > 30, "read {} modules", known.len());
    let graph: BTreeMap<&str, BTreeSet<String>> =
        known.iter().map(|(name, code)| (name.as_str(), imports(name, code, &known))).collect();
    // Depth-first search; a module met again while still on the path closes a cycle.
    fn visit<'a>(
        m: &'a str,
        graph: &'a BTreeMap<&str, BTreeSet<String>>,
        path: &mut Vec<&'a str>,
        done: &mut BTreeSet<&'a str>,
        cycles: &mut Vec<String>,
    ) {
        if let Some(i) = path.iter().position(|p| *p == m) {
            cycles.push(format!("{} → {m}", path[i..].join(" → ")));
            return;
        }
        if !done.insert(m) {
            return;
        }
        path.push(m);
        for d in &graph[m] {
            visit(d, graph, path, done, cycles);
        }
        path.pop();
    }
    let (mut done, mut cycles) = (BTreeSet::new(), Vec::new());
    for m in graph.keys() {
        visit(m, &graph, &mut Vec::new(), &mut done, &mut cycles);
    }
    assert!(cycles.is_empty(), "import cycles among src/ modules:\n{}", cycles.join("\n"));
    // The check itself sees imports: the pipeline uses the model, the model the decoder.
    assert!(graph["pipeline"].contains("models::llava") && graph["models::llava"].contains("text"));
}
