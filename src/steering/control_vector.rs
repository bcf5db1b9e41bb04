//! llama.cpp / repeng control vectors: export and import of CMRM vectors.
//!
//! Format: GGUF v3, `general.architecture = "controlvector"`, `controlvector.model_hint`,
//! `controlvector.layer_count`, tensors `direction.{N}` F32 `[hidden]`. llama.cpp *adds*
//! `direction.N` to the output of block N (0-based) and never steers block 0 (its loader rejects
//! `direction.0`). CMRM subtracts, so:
//! - export writes `direction.l = −v_l` for l ≥ 1 (layer 0 is dropped and reported);
//! - import reads `v_l = −direction.l`.
//!
//! Then `llama-cli --control-vector-scaled file.gguf:α` applies `h_l + α·(−v_l)` = CMRM with α.

use std::collections::{BTreeMap, HashMap};

use anyhow::{bail, Context, Result};

use super::{SteeringVectors, VECTORS_FORMAT};
use crate::gguf::{header, padded, read_preamble, MetaValue, Reader, TensorInfo, ALIGNMENT, GGML_TYPE_F32, MAGIC};

/// What an export kept and dropped.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufExport {
    pub bytes: Vec<u8>,
    /// Layers not representable in a llama.cpp control vector (layer 0).
    pub dropped_layers: Vec<usize>,
}

/// Serialize CMRM vectors as a llama.cpp control vector (negated, layer 0 dropped).
pub fn export_control_vector(vectors: &SteeringVectors, model_hint: &str) -> GgufExport {
    let exported: Vec<(usize, &Vec<f32>)> =
        vectors.layers.iter().filter(|(l, _)| **l >= 1).map(|(l, v)| (*l, v)).collect();
    let dropped_layers = vectors.layers.keys().copied().filter(|&l| l == 0).collect();
    let tensor_bytes = vectors.hidden_size as u64 * 4;
    let infos: Vec<TensorInfo> = exported
        .iter()
        .map(|(l, _)| TensorInfo {
            name: format!("direction.{l}"),
            ggml_type: GGML_TYPE_F32,
            shape: vec![vectors.hidden_size],
            bytes: tensor_bytes,
        })
        .collect();
    // llama.cpp and repeng write the number of directions as the layer count.
    let metadata = [
        ("general.architecture", MetaValue::String("controlvector")),
        ("controlvector.model_hint", MetaValue::String(model_hint)),
        ("controlvector.layer_count", MetaValue::U32(exported.len() as u32)),
    ];
    let mut out = header(&metadata, &infos);
    for (_, v) in &exported {
        let start = out.len();
        // llama.cpp adds; CMRM subtracts.
        out.extend(v.iter().flat_map(|x| (-x).to_le_bytes()));
        out.resize(start + padded(tensor_bytes) as usize, 0);
    }
    GgufExport { bytes: out, dropped_layers }
}

/// Read a llama.cpp control vector as CMRM vectors (`v_l = −direction.l`).
pub fn import_control_vector(name: &str, bytes: &[u8]) -> Result<SteeringVectors> {
    let mut r = Reader::new(name, bytes);
    if !bytes.starts_with(MAGIC) {
        bail!("{name}: not a GGUF file (no GGUF magic)");
    }
    let (n_tensors, n_kv) = read_preamble(name, &mut r)?;
    let (n_tensors, n_kv) = (n_tensors as usize, n_kv as usize);
    let mut meta = HashMap::new();
    for _ in 0..n_kv {
        let key = r.string()?;
        let kind = r.u32()?;
        if let Some(v) = r.value(kind)? {
            meta.insert(key, v);
        }
    }
    if meta.get("general.architecture").map(String::as_str) != Some("controlvector") {
        bail!(
            "{name}: a GGUF file but not a control vector (general.architecture is {:?})",
            meta.get("general.architecture")
        );
    }
    let alignment = meta
        .get("general.alignment")
        .and_then(|s| s.parse::<usize>().ok())
        .filter(|a| a.is_power_of_two() && *a <= 1 << 16)
        .unwrap_or(ALIGNMENT);
    let mut infos = Vec::with_capacity(n_tensors.min(4096));
    for _ in 0..n_tensors {
        let tname = r.string()?;
        let n_dims = r.u32()? as usize;
        if n_dims > 4 {
            bail!("{name}: tensor '{tname}' has {n_dims} dimensions");
        }
        let dims: Vec<u64> = (0..n_dims).map(|_| r.u64()).collect::<Result<_>>()?;
        let kind = r.u32()?;
        let offset = usize::try_from(r.u64()?).with_context(|| format!("{name}: tensor '{tname}' offset"))?;
        infos.push((tname, dims, kind, offset));
    }
    let data_start = r.pos.div_ceil(alignment.max(1)) * alignment.max(1);
    let mut layers = BTreeMap::new();
    let mut hidden = None;
    for (tname, dims, kind, offset) in infos {
        let Some(index) = tname.strip_prefix("direction.") else { continue };
        let l: usize = index.parse().with_context(|| format!("{name}: tensor '{tname}' has no layer number"))?;
        if kind != GGML_TYPE_F32 {
            bail!("{name}: tensor '{tname}' is ggml type {kind}; only F32 control vectors are supported");
        }
        let n = dims
            .iter()
            .try_fold(1u64, |n, &d| n.checked_mul(d))
            .and_then(|n| usize::try_from(n).ok())
            .filter(|&n| n <= 1 << 24)
            .with_context(|| format!("{name}: tensor '{tname}' has an implausible shape {dims:?}"))?;
        if *hidden.get_or_insert(n) != n {
            bail!("{name}: tensor '{tname}' has {n} values, other directions have {}", hidden.unwrap_or(0));
        }
        let pos = data_start.checked_add(offset).with_context(|| format!("{name}: tensor '{tname}' offset"))?;
        let mut data = Reader::new(name, bytes);
        data.pos = pos;
        let raw = data.take(n * 4)?;
        layers.insert(l, raw.chunks_exact(4).map(|b| -f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect());
    }
    let Some(hidden_size) = hidden else { bail!("{name}: the control vector holds no direction.N tensors") };
    let mut vectors = SteeringVectors::new(hidden_size, layers).with_context(|| name.to_owned())?;
    vectors.metadata = HashMap::from([
        ("format".into(), VECTORS_FORMAT.into()),
        ("sign".into(), "subtract".into()),
        ("hidden_size".into(), hidden_size.to_string()),
        ("imported_from".into(), "gguf-controlvector".into()),
    ]);
    if let Some(hint) = meta.get("controlvector.model_hint") {
        vectors.metadata.insert("model_hint".into(), hint.clone());
    }
    if let Some(count) = meta.get("controlvector.layer_count") {
        vectors.metadata.insert("gguf_layer_count".into(), count.clone());
    }
    Ok(vectors)
}
