//! A small, strict safetensors reader/writer (format: 8-byte little-endian header length,
//! a JSON header `{name: {dtype, shape, data_offsets}, "__metadata__": {..}}`, then the
//! raw little-endian data). Every malformed input is a typed error naming the file.

use crate::error::{Error, Result};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dtype {
    F32,
    F16,
    BF16,
}

impl Dtype {
    pub fn name(self) -> &'static str {
        match self {
            Dtype::F32 => "F32",
            Dtype::F16 => "F16",
            Dtype::BF16 => "BF16",
        }
    }
    pub fn size(self) -> usize {
        match self {
            Dtype::F32 => 4,
            _ => 2,
        }
    }
    pub fn parse(s: &str) -> Option<Dtype> {
        match s {
            "F32" => Some(Dtype::F32),
            "F16" => Some(Dtype::F16),
            "BF16" => Some(Dtype::BF16),
            _ => None,
        }
    }
}

/// One tensor read from a file, converted to f32.
#[derive(Clone, Debug)]
pub struct StTensor {
    pub shape: Vec<usize>,
    pub dtype: Dtype,
    pub data: Vec<f32>,
}

/// A whole file: tensors in file order plus the `__metadata__` strings.
#[derive(Clone, Debug, Default)]
pub struct StFile {
    pub path: PathBuf,
    pub tensors: Vec<(String, StTensor)>,
    pub metadata: BTreeMap<String, String>,
}

impl StFile {
    pub fn get(&self, name: &str) -> Option<&StTensor> {
        self.tensors.iter().find(|(n, _)| n == name).map(|(_, t)| t)
    }

    /// The tensor `name` or a `MissingTensor` error naming the file.
    pub fn require(&self, name: &str) -> Result<&StTensor> {
        self.get(name).ok_or_else(|| Error::MissingTensor { path: self.path.clone(), name: name.into() })
    }
}

fn malformed(path: &Path, reason: impl Into<String>) -> Error {
    Error::Malformed { path: path.into(), reason: reason.into() }
}

/// Reads only the header of a safetensors file: tensor names, dtypes and shapes (no
/// data) and the `__metadata__` strings — for scanning many large files cheaply.
pub fn read_header(path: impl AsRef<Path>) -> Result<StFile> {
    use std::io::Read;
    let path = path.as_ref();
    let io = |e| Error::Io { path: path.into(), err: e };
    let mut f = std::fs::File::open(path).map_err(io)?;
    let size = f.metadata().map_err(io)?.len();
    let mut len = [0u8; 8];
    f.read_exact(&mut len).map_err(|_| malformed(path, format!("file is {size} bytes, shorter than the 8-byte header length")))?;
    let hlen = u64::from_le_bytes(len);
    if hlen > size - 8 {
        return Err(malformed(path, format!("header length {hlen} exceeds the file size {size} (truncated?)")));
    }
    let mut header = vec![0u8; hlen as usize];
    f.read_exact(&mut header).map_err(io)?;
    // Parse as a file whose tensors hold no data: validate offsets against the real size.
    let data_len = (size - 8 - hlen) as usize;
    let v: serde_json::Value = serde_json::from_slice(&header).map_err(|e| malformed(path, format!("header is not valid JSON: {e}")))?;
    let obj = v.as_object().ok_or_else(|| malformed(path, "header is not a JSON object"))?;
    let mut out = StFile { path: path.into(), ..Default::default() };
    for (name, v) in obj {
        if name == "__metadata__" {
            for (k, val) in v.as_object().ok_or_else(|| malformed(path, "__metadata__ is not an object"))? {
                let s = val.as_str().ok_or_else(|| malformed(path, format!("metadata '{k}' is not a string")))?;
                out.metadata.insert(k.clone(), s.to_string());
            }
            continue;
        }
        let dt = v.get("dtype").and_then(|d| d.as_str()).unwrap_or("?");
        let dtype = Dtype::parse(dt).ok_or_else(|| Error::Dtype { path: path.into(), name: name.clone(), dtype: dt.into() })?;
        let shape: Vec<usize> = v
            .get("shape")
            .and_then(|s| s.as_array())
            .map(|a| a.iter().filter_map(|d| d.as_u64().map(|x| x as usize)).collect())
            .ok_or_else(|| malformed(path, format!("tensor '{name}': missing shape")))?;
        let end = v.get("data_offsets").and_then(|o| o.get(1)).and_then(|e| e.as_u64()).unwrap_or(u64::MAX);
        if end as usize > data_len {
            return Err(malformed(path, format!("tensor '{name}' ends at byte {end} but the file has {data_len} data bytes (truncated?)")));
        }
        out.tensors.push((name.clone(), StTensor { shape, dtype, data: Vec::new() }));
    }
    Ok(out)
}

/// Reads and validates a whole safetensors file.
pub fn read(path: impl AsRef<Path>) -> Result<StFile> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|e| Error::Io { path: path.into(), err: e })?;
    parse(path, &bytes)
}

pub fn parse(path: &Path, bytes: &[u8]) -> Result<StFile> {
    if bytes.len() < 8 {
        return Err(malformed(path, format!("file is {} bytes, shorter than the 8-byte header length", bytes.len())));
    }
    let hlen = u64::from_le_bytes(bytes[..8].try_into().unwrap());
    if hlen > (bytes.len() - 8) as u64 {
        return Err(malformed(path, format!("header length {hlen} exceeds the file size {} (truncated?)", bytes.len())));
    }
    let hlen = hlen as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + hlen])
        .map_err(|e| malformed(path, format!("header is not valid JSON: {e}")))?;
    let obj = header.as_object().ok_or_else(|| malformed(path, "header is not a JSON object"))?;
    let data = &bytes[8 + hlen..];
    let mut out = StFile { path: path.into(), ..Default::default() };
    let mut entries = Vec::new();
    for (name, v) in obj {
        if name == "__metadata__" {
            let m = v.as_object().ok_or_else(|| malformed(path, "__metadata__ is not an object"))?;
            for (k, val) in m {
                let s = val.as_str().ok_or_else(|| malformed(path, format!("metadata '{k}' is not a string")))?;
                out.metadata.insert(k.clone(), s.to_string());
            }
            continue;
        }
        let bad = |r: &str| malformed(path, format!("tensor '{name}': {r}"));
        let dt = v.get("dtype").and_then(|d| d.as_str()).ok_or_else(|| bad("missing dtype"))?;
        let dtype = Dtype::parse(dt).ok_or_else(|| Error::Dtype { path: path.into(), name: name.clone(), dtype: dt.into() })?;
        let shape: Vec<usize> = v
            .get("shape")
            .and_then(|s| s.as_array())
            .ok_or_else(|| bad("missing shape"))?
            .iter()
            .map(|d| d.as_u64().map(|x| x as usize))
            .collect::<Option<_>>()
            .ok_or_else(|| bad("shape is not a list of non-negative integers"))?;
        let offs = v.get("data_offsets").and_then(|s| s.as_array()).ok_or_else(|| bad("missing data_offsets"))?;
        if offs.len() != 2 {
            return Err(bad("data_offsets must have two entries"));
        }
        let (a, b) = match (offs[0].as_u64(), offs[1].as_u64()) {
            (Some(a), Some(b)) => (a as usize, b as usize),
            _ => return Err(bad("data_offsets are not integers")),
        };
        let numel = shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d)).ok_or_else(|| bad("shape overflows"))?;
        if b < a || b - a != numel * dtype.size() {
            return Err(bad(&format!("data_offsets [{a}, {b}] do not match shape {shape:?} of {}", dtype.name())));
        }
        if b > data.len() {
            return Err(bad(&format!("data ends at byte {b} but the file has {} data bytes (truncated?)", data.len())));
        }
        entries.push((a, name.clone(), dtype, shape, b));
    }
    // File order = data order.
    entries.sort_by_key(|e| e.0);
    for (a, name, dtype, shape, b) in entries {
        let raw = &data[a..b];
        let vals: Vec<f32> = match dtype {
            Dtype::F32 => raw.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect(),
            Dtype::F16 => raw.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            Dtype::BF16 => raw.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        };
        out.tensors.push((name, StTensor { shape, dtype, data: vals }));
    }
    Ok(out)
}

/// Serializes tensors (in the given order) with metadata.
pub fn serialize(tensors: &[(&str, &[usize], &[f32])], metadata: &BTreeMap<String, String>, dtype: Dtype) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    if !metadata.is_empty() {
        header.insert("__metadata__".into(), serde_json::to_value(metadata).unwrap());
    }
    let mut off = 0usize;
    for (name, shape, data) in tensors {
        let n = data.len() * dtype.size();
        header.insert(
            name.to_string(),
            serde_json::json!({"dtype": dtype.name(), "shape": shape, "data_offsets": [off, off + n]}),
        );
        off += n;
    }
    let mut h = serde_json::to_vec(&serde_json::Value::Object(header)).unwrap();
    // Pad the header with spaces so the data starts 8-byte aligned.
    while (8 + h.len()) % 8 != 0 {
        h.push(b' ');
    }
    let mut out = Vec::with_capacity(8 + h.len() + off);
    out.extend_from_slice(&(h.len() as u64).to_le_bytes());
    out.extend_from_slice(&h);
    for (_, _, data) in tensors {
        match dtype {
            Dtype::F32 => data.iter().for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
            Dtype::F16 => data.iter().for_each(|v| out.extend_from_slice(&half::f16::from_f32(*v).to_le_bytes())),
            Dtype::BF16 => data.iter().for_each(|v| out.extend_from_slice(&half::bf16::from_f32(*v).to_le_bytes())),
        }
    }
    out
}

pub fn write(
    path: impl AsRef<Path>,
    tensors: &[(&str, &[usize], &[f32])],
    metadata: &BTreeMap<String, String>,
    dtype: Dtype,
) -> Result<()> {
    super::write_atomic(path, &serialize(tensors, metadata, dtype))
}
