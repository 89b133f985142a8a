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

/// The reference library's cap on the JSON header: it is read whole before anything is
/// validated, so its claimed length must be bounded before allocating.
pub const MAX_HEADER_LEN: u64 = 100_000_000;

/// One entry of the header as written, before validation.
#[derive(serde::Deserialize)]
struct RawInfo {
    dtype: String,
    shape: Vec<u64>,
    data_offsets: (u64, u64),
}

/// The header in key order. serde_json's maps keep the last of two equal keys, so the
/// maps are walked by hand to refuse duplicates (the format forbids them).
struct RawHeader {
    metadata: BTreeMap<String, String>,
    tensors: Vec<(String, RawInfo)>,
}

/// A JSON object's entries in order, a repeated key refused.
struct Unique<V>(Vec<(String, V)>);

/// Walks an object's entries in order, refusing a key seen before; `value` reads each value.
fn walk_map<'de, A, V>(mut map: A, mut value: impl FnMut(&str, &mut A) -> std::result::Result<V, A::Error>) -> std::result::Result<Vec<(String, V)>, A::Error>
where
    A: serde::de::MapAccess<'de>,
{
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    while let Some(k) = map.next_key::<String>()? {
        if !seen.insert(k.clone()) {
            return Err(serde::de::Error::custom(format!("duplicate key '{k}'")));
        }
        let v = value(&k, &mut map)?;
        out.push((k, v));
    }
    Ok(out)
}

impl<'de, V: serde::Deserialize<'de>> serde::Deserialize<'de> for Unique<V> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct Vis<V>(std::marker::PhantomData<V>);
        impl<'de, V: serde::Deserialize<'de>> serde::de::Visitor<'de> for Vis<V> {
            type Value = Unique<V>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> std::result::Result<Unique<V>, A::Error> {
                walk_map(map, |_, m| m.next_value()).map(Unique)
            }
        }
        d.deserialize_map(Vis(std::marker::PhantomData))
    }
}

impl<'de> serde::Deserialize<'de> for RawHeader {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct Vis;
        impl<'de> serde::de::Visitor<'de> for Vis {
            type Value = RawHeader;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> std::result::Result<RawHeader, A::Error> {
                use serde::de::Error as _;
                let mut metadata = None;
                let entries = walk_map(map, |k, m| {
                    if k == "__metadata__" {
                        // null is accepted, as the reference does.
                        let md: Option<Unique<String>> =
                            m.next_value().map_err(|e| A::Error::custom(format!("__metadata__ must map strings to strings ({e})")))?;
                        metadata = Some(md.map(|u| u.0).unwrap_or_default());
                        Ok(None)
                    } else {
                        m.next_value::<RawInfo>().map(Some).map_err(|e| A::Error::custom(format!("tensor '{k}': {e}")))
                    }
                })?;
                let tensors = entries.into_iter().filter_map(|(k, v)| v.map(|v| (k, v))).collect();
                Ok(RawHeader { metadata: metadata.unwrap_or_default().into_iter().collect(), tensors })
            }
        }
        d.deserialize_map(Vis)
    }
}

/// A validated tensor entry: `[begin, end)` within the data section.
struct Entry {
    name: String,
    dtype: Dtype,
    shape: Vec<usize>,
    begin: usize,
    end: usize,
}

/// Checks the 8-byte prefix: the header length, bounded and within the file.
fn header_len(path: &Path, prefix: &[u8], file_len: u64) -> Result<usize> {
    if prefix.len() < 8 || file_len < 8 {
        return Err(malformed(path, format!("file is {file_len} bytes, shorter than the 8-byte header length")));
    }
    let hlen = u64::from_le_bytes(prefix[..8].try_into().unwrap());
    if hlen > MAX_HEADER_LEN {
        return Err(malformed(path, format!("header length {hlen} exceeds the limit of {MAX_HEADER_LEN} bytes")));
    }
    if hlen > file_len - 8 {
        return Err(malformed(path, format!("header length {hlen} exceeds the file size {file_len} (truncated?)")));
    }
    Ok(hlen as usize)
}

/// Parses and validates the JSON header against a data section of `data_len` bytes, as
/// the reference library's `validate` does: every tensor's byte length is its element
/// count times its dtype size, and the tensors, in offset order, tile the data section
/// exactly — no gap, no overlap, no byte past the last one. Returns the entries in data
/// order. Shared by [`read_header`] and [`parse`] so that the two cannot drift.
fn parse_header(path: &Path, header: &[u8], data_len: usize) -> Result<(BTreeMap<String, String>, Vec<Entry>)> {
    let text = std::str::from_utf8(header).map_err(|e| malformed(path, format!("header is not UTF-8: {e}")))?;
    let raw: RawHeader = serde_json::from_str(text).map_err(|e| malformed(path, format!("header is not a valid JSON object: {e}")))?;
    let mut entries = Vec::with_capacity(raw.tensors.len());
    for (name, info) in raw.tensors {
        let bad = |r: String| malformed(path, format!("tensor '{name}': {r}"));
        let dtype = Dtype::parse(&info.dtype).ok_or_else(|| Error::Dtype { path: path.into(), name: name.clone(), dtype: info.dtype.clone() })?;
        let shape: Vec<usize> = info.shape.iter().map(|&d| usize::try_from(d).ok()).collect::<Option<_>>().ok_or_else(|| bad(format!("shape {:?} overflows", info.shape)))?;
        let nbytes = shape
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d))
            .and_then(|n| n.checked_mul(dtype.size()))
            .ok_or_else(|| bad(format!("shape {shape:?} overflows")))?;
        let (a, b) = info.data_offsets;
        if b < a || b - a != nbytes as u64 {
            return Err(bad(format!("data_offsets [{a}, {b}] do not match shape {shape:?} of {} ({nbytes} bytes)", dtype.name())));
        }
        if b > data_len as u64 {
            return Err(bad(format!("data ends at byte {b} but the file has {data_len} data bytes (truncated?)")));
        }
        entries.push(Entry { name, dtype, shape, begin: a as usize, end: b as usize });
    }
    // Data order; a zero-size tensor at k sorts before one that starts at k.
    entries.sort_by_key(|e| (e.begin, e.end));
    let mut at = 0usize;
    let mut prev: Option<&str> = None;
    for e in &entries {
        if e.begin != at {
            let what = if e.begin < at { "overlaps" } else { "leaves a gap after" };
            let before = prev.map(|p| format!("tensor '{p}'")).unwrap_or_else(|| "the start of the data".into());
            return Err(malformed(path, format!("tensor '{}' at data_offsets [{}, {}] {what} {before} (which ends at byte {at})", e.name, e.begin, e.end)));
        }
        at = e.end;
        prev = Some(&e.name);
    }
    if at != data_len {
        return Err(malformed(path, format!("{} bytes after the last tensor (the tensors cover {at} of the {data_len} data bytes)", data_len - at)));
    }
    Ok((raw.metadata, entries))
}

/// Reads only the header of a safetensors file: tensor names, dtypes and shapes (no
/// data) and the `__metadata__` strings — for scanning many large files cheaply. The
/// header is validated as fully as [`parse`] validates it.
pub fn read_header(path: impl AsRef<Path>) -> Result<StFile> {
    use std::io::Read;
    let path = path.as_ref();
    let io = |e| Error::Io { path: path.into(), err: e };
    let mut f = std::fs::File::open(path).map_err(io)?;
    let size = f.metadata().map_err(io)?.len();
    let mut prefix = Vec::with_capacity(8);
    (&mut f).take(8).read_to_end(&mut prefix).map_err(io)?;
    let hlen = header_len(path, &prefix, size)?;
    let mut header = Vec::new();
    header.try_reserve_exact(hlen).map_err(|_| malformed(path, format!("no memory for a {hlen}-byte header")))?;
    f.take(hlen as u64).read_to_end(&mut header).map_err(io)?;
    if header.len() != hlen {
        return Err(malformed(path, format!("file shrank while reading its {hlen}-byte header")));
    }
    let data_len = usize::try_from(size - 8 - hlen as u64).map_err(|_| malformed(path, "data section too large"))?;
    let (metadata, entries) = parse_header(path, &header, data_len)?;
    let tensors = entries.into_iter().map(|e| (e.name, StTensor { shape: e.shape, dtype: e.dtype, data: Vec::new() })).collect();
    Ok(StFile { path: path.into(), tensors, metadata })
}

/// Reads and validates a whole safetensors file.
pub fn read(path: impl AsRef<Path>) -> Result<StFile> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|e| Error::Io { path: path.into(), err: e })?;
    parse(path, &bytes)
}

/// Validates the bytes of a safetensors file and converts every tensor to f32, in data order.
pub fn parse(path: &Path, bytes: &[u8]) -> Result<StFile> {
    let hlen = header_len(path, bytes, bytes.len() as u64)?;
    let data = &bytes[8 + hlen..];
    let (metadata, entries) = parse_header(path, &bytes[8..8 + hlen], data.len())?;
    let mut out = StFile { path: path.into(), tensors: Vec::with_capacity(entries.len()), metadata };
    for e in entries {
        let raw = &data[e.begin..e.end];
        let vals: Vec<f32> = match e.dtype {
            Dtype::F32 => raw.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect(),
            Dtype::F16 => raw.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            Dtype::BF16 => raw.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        };
        out.tensors.push((e.name, StTensor { shape: e.shape, dtype: e.dtype, data: vals }));
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
