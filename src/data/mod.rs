//! Training data (DESIGN.md §5): the built-in Fashion-MNIST split, folders and zips of
//! PNG/JPEG images in the layout of the official dataset tool (optional `dataset.json`
//! labels), and latent datasets (per-item `.npy` float32 `[8, H, W]` = VAE mean ‖ std).
//!
//! Items are stored CHW (as in the files) and handed to the network NHWC after encoding:
//! pixels `x/127.5 − 1`; latents `(mean + std·n)·scale + bias` with the official
//! constants. With `xflip` the dataset is twice as long: item `i + N` is item `i`
//! mirrored (as the official `ImageFolderDataset`).

pub mod decode;
pub mod loader;
pub mod transform;

use crate::error::{Error, Result};
use crate::rng::Rng;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// The Fashion-MNIST test split (10,000 images, MIT licence: data/fashion-mnist/LICENSE),
/// embedded so that `edm2 train` needs no download.
const FMNIST_TEST_IMAGES: &[u8] = include_bytes!("../../data/fashion-mnist/t10k-images-idx3-ubyte.gz");
const FMNIST_TEST_LABELS: &[u8] = include_bytes!("../../data/fashion-mnist/t10k-labels-idx1-ubyte.gz");
/// Where Debian's `dataset-fashion-mnist` package puts the full split.
pub const FMNIST_DEBIAN_DIR: &str = "/usr/share/datasets/fashion-mnist";

/// Official latent normalization of the Stability VAE encoder (DESIGN.md §5).
pub const LATENT_RAW_MEAN: [f32; 4] = [5.81, 3.25, 0.12, -2.15];
pub const LATENT_RAW_STD: [f32; 4] = [4.17, 4.62, 3.71, 3.28];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Encoding {
    /// uint8 pixels, 1 or 3 channels.
    Pixels,
    /// float32 `[2C, H, W]`: the VAE mean then std of a C-channel latent.
    Latents,
}

/// One item as stored (CHW).
#[derive(Clone, Debug, PartialEq)]
pub enum RawItem {
    U8(Vec<u8>),
    F32(Vec<f32>),
}

enum Store {
    /// All items in memory, CHW uint8, one after another.
    Memory(Vec<u8>),
    Dir { root: PathBuf, names: Vec<String> },
    /// A pool of open archives (one per concurrent reader; the central directory is
    /// parsed once per archive, not per item).
    Zip { path: PathBuf, names: Vec<String>, pool: Mutex<Vec<zip::ZipArchive<std::fs::File>>> },
}

/// How to open a dataset.
#[derive(Clone, Debug, Default)]
pub struct DataOptions {
    /// Mirror augmentation: doubles the dataset.
    pub xflip: bool,
    /// Use only the first N items (before x-flip).
    pub max_size: Option<usize>,
    /// Images of any size and aspect (a source for `edm2 encode --transform`): the first
    /// item fixes nothing and items are read with [`Dataset::load_image`] only.
    pub any_size: bool,
}

pub struct Dataset {
    /// Short name for run directories (`fmnist10k`, `fmnist`, the folder or zip stem).
    pub name: String,
    /// Where it came from, for logs and metadata.
    pub source: String,
    pub resolution: usize,
    /// Channels of a stored item (1/3 for pixels, 8 for latents).
    pub raw_channels: usize,
    pub encoding: Encoding,
    /// Integer class of every stored item, if the dataset has labels.
    pub labels: Option<Vec<u32>>,
    pub xflip: bool,
    store: Store,
    raw_len: usize,
}

impl std::fmt::Debug for Dataset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Dataset({}, {} items, {}x{}x{})", self.source, self.len(), self.resolution, self.resolution, self.raw_channels)
    }
}

fn data_err(m: impl Into<String>) -> Error {
    Error::Data(m.into())
}

/// Largest `dataset.json` read: the official tool's labels for ImageNet's 1.28M images
/// are about 60 MB.
pub const MAX_LABELS_JSON_BYTES: u64 = 256 << 20;
/// Largest inflated IDX file (Fashion-MNIST's 60k training images are 47 MB).
const MAX_IDX_BYTES: u64 = 256 << 20;

/// Reads `r` to its end, refusing more than `cap` bytes: a stream that claims little and
/// inflates to much (a zip or gzip bomb) stops at the cap instead of filling memory.
/// `hint` (a size the input claims, at most `cap`) sizes the buffer up front; allocation
/// failure is an error, not an abort.
fn read_capped(r: impl Read, cap: u64, hint: u64, what: &str) -> Result<Vec<u8>> {
    let mut buf = Vec::new();
    buf.try_reserve_exact(hint.min(cap) as usize).map_err(|_| data_err(format!("{what}: cannot allocate {hint} bytes")))?;
    r.take(cap + 1).read_to_end(&mut buf).map_err(|e| data_err(format!("{what}: {e}")))?;
    if buf.len() as u64 > cap {
        return Err(data_err(format!("{what}: more than {cap} bytes; refusing to read it into memory")));
    }
    Ok(buf)
}

/// A regular file read whole, after checking its size against `cap`.
fn read_file_capped(p: &Path, cap: u64) -> Result<Vec<u8>> {
    let io = |e| Error::Io { path: p.into(), err: e };
    let f = std::fs::File::open(p).map_err(io)?;
    let len = f.metadata().map_err(io)?.len();
    if len > cap {
        return Err(data_err(format!("{}: {len} bytes, over the limit of {cap} for this file", p.display())));
    }
    read_capped(f, cap, len, &p.display().to_string())
}

/// A zip entry read whole: its declared size is checked against `cap` before inflating,
/// and it may not inflate past what it declares.
fn read_zip_entry(f: &mut zip::read::ZipFile<'_, std::fs::File>, cap: u64, what: &str) -> Result<Vec<u8>> {
    let declared = f.size();
    if declared > cap {
        return Err(data_err(format!("{what}: zip entry declares {declared} bytes inflated, over the limit of {cap}")));
    }
    let mut buf = Vec::new();
    buf.try_reserve_exact(declared as usize).map_err(|_| data_err(format!("{what}: cannot allocate {declared} bytes")))?;
    // One byte more than declared tells a lying size from an honest one.
    f.take(declared + 1).read_to_end(&mut buf).map_err(|e| data_err(format!("{what}: {e}")))?;
    if buf.len() as u64 > declared {
        return Err(data_err(format!("{what}: zip entry inflates past its declared size of {declared} bytes (corrupt or a zip bomb)")));
    }
    if (buf.len() as u64) != declared {
        return Err(data_err(format!("{what}: zip entry inflates to {} bytes, it declares {declared} (corrupt)", buf.len())));
    }
    Ok(buf)
}

/// Parses a gzip-compressed IDX file (MNIST format) → (dims, bytes).
fn read_idx_gz(name: &str, gz: &[u8], expect_dims: usize) -> Result<(Vec<usize>, Vec<u8>)> {
    let mut raw = Vec::new();
    let mut gz = flate2::read::GzDecoder::new(gz).take(MAX_IDX_BYTES + 1);
    gz.read_to_end(&mut raw).map_err(|e| data_err(format!("{name}: not a valid gzip file: {e}")))?;
    if raw.len() as u64 > MAX_IDX_BYTES {
        return Err(data_err(format!("{name}: inflates to more than {MAX_IDX_BYTES} bytes")));
    }
    if raw.len() < 4 + 4 * expect_dims || raw[0] != 0 || raw[1] != 0 || raw[2] != 8 || raw[3] as usize != expect_dims {
        return Err(data_err(format!("{name}: not an IDX file of {expect_dims}-d uint8 data")));
    }
    let dims: Vec<usize> = (0..expect_dims).map(|i| u32::from_be_bytes(raw[4 + 4 * i..8 + 4 * i].try_into().unwrap()) as usize).collect();
    let body = raw.split_off(4 + 4 * expect_dims);
    if Some(body.len()) != dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d)) {
        return Err(data_err(format!("{name}: truncated ({} bytes of data, the header says {:?})", body.len(), dims)));
    }
    Ok((dims, body))
}

/// Fashion-MNIST from its IDX files, padded 28 → 32 with black (so that the 3-level
/// U-Net divides it), labels 0..9.
fn fashion_mnist(images_gz: &[u8], labels_gz: &[u8], what: &str) -> Result<(Vec<u8>, Vec<u32>)> {
    let (dims, px) = read_idx_gz(&format!("{what} images"), images_gz, 3)?;
    let (ldims, lab) = read_idx_gz(&format!("{what} labels"), labels_gz, 1)?;
    if dims[1] != 28 || dims[2] != 28 || ldims[0] != dims[0] {
        return Err(data_err(format!("{what}: expected N×28×28 images with N labels, found {dims:?} and {ldims:?}")));
    }
    let n = dims[0];
    let mut out = vec![0u8; n * 32 * 32];
    for i in 0..n {
        for y in 0..28 {
            let src = &px[(i * 28 + y) * 28..(i * 28 + y + 1) * 28];
            out[i * 1024 + (y + 2) * 32 + 2..i * 1024 + (y + 2) * 32 + 30].copy_from_slice(src);
        }
    }
    Ok((out, lab.into_iter().map(u32::from).collect()))
}

fn ext_of(name: &str) -> Option<String> {
    let e = name.rsplit_once('.')?.1.to_ascii_lowercase();
    matches!(e.as_str(), "png" | "jpg" | "jpeg" | "npy").then_some(e)
}

fn list_dir(root: &Path) -> Result<Vec<String>> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        let rd = std::fs::read_dir(&d).map_err(|e| Error::Io { path: d.clone(), err: e })?;
        for ent in rd {
            let ent = ent.map_err(|e| Error::Io { path: d.clone(), err: e })?;
            let p = ent.path();
            // file_type() does not follow symlinks: a linked folder is not walked (no loops).
            let ft = ent.file_type().map_err(|e| Error::Io { path: p.clone(), err: e })?;
            if ft.is_dir() {
                stack.push(p);
            } else if let Ok(rel) = p.strip_prefix(root) {
                let rel = rel.to_string_lossy().replace('\\', "/");
                if ext_of(&rel).is_some() {
                    out.push(rel);
                }
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Largest accepted class count (label_dim sizes the network's label embedding).
const MAX_CLASSES: u64 = 100_000;

/// Labels from `dataset.json` (`{"labels": [["rel/path.png", int], …]}` or `null`), in the
/// order of `names`. Every file needs a label and every label a file.
fn parse_labels(json: &str, source: &str, names: &[String]) -> Result<Option<Vec<u32>>> {
    let v: serde_json::Value = serde_json::from_str(json).map_err(|e| data_err(format!("{source}/dataset.json: not valid JSON: {e}")))?;
    let list = match v.get("labels") {
        None | Some(serde_json::Value::Null) => return Ok(None),
        Some(serde_json::Value::Array(a)) => a,
        Some(_) => return Err(data_err(format!("{source}/dataset.json: \"labels\" must be a list of [file, class] pairs or null"))),
    };
    let mut map = std::collections::HashMap::with_capacity(list.len());
    for (i, e) in list.iter().enumerate() {
        let pair = e.as_array().filter(|a| a.len() == 2);
        let (f, l) = match pair.map(|a| (a[0].as_str(), a[1].as_u64())) {
            Some((Some(f), Some(l))) => (f.replace('\\', "/"), l),
            _ => return Err(data_err(format!("{source}/dataset.json: labels[{i}] is {e}, expected [\"file\", non-negative integer]"))),
        };
        if l >= MAX_CLASSES {
            return Err(data_err(format!("{source}/dataset.json: labels[{i}] has class {l}; classes must be below {MAX_CLASSES}")));
        }
        if map.insert(f.clone(), l as u32).is_some() {
            return Err(data_err(format!("{source}/dataset.json: {f} is labelled more than once")));
        }
    }
    let mut out = Vec::with_capacity(names.len());
    for n in names {
        match map.remove(n) {
            Some(l) => out.push(l),
            None => return Err(data_err(format!("{source}: {n} has no label in dataset.json"))),
        }
    }
    if let Some(f) = map.keys().min() {
        return Err(data_err(format!("{source}/dataset.json: label for {f}, which is not an image file of the dataset ({} such labels)", map.len())));
    }
    Ok(Some(out))
}

fn json_text(bytes: Vec<u8>, source: &str) -> Result<String> {
    String::from_utf8(bytes).map_err(|e| data_err(format!("{source}/dataset.json: not UTF-8: {e}")))
}

impl Dataset {
    /// Opens a dataset: `None` → the built-in Fashion-MNIST test split; `fashion-mnist` →
    /// the full 60k training split from Debian's package; otherwise a folder or `.zip`.
    /// The first item fixes the resolution and channels; [`Dataset::verify`] checks the rest.
    pub fn open(spec: Option<&str>, opts: &DataOptions) -> Result<Dataset> {
        let mut ds = match spec {
            None | Some("fashion-mnist-10k") | Some("builtin") => {
                let (px, lab) = fashion_mnist(FMNIST_TEST_IMAGES, FMNIST_TEST_LABELS, "built-in Fashion-MNIST")?;
                Self::memory("fmnist10k", "Fashion-MNIST test split (built in, 10k images)", px, lab)
            }
            Some("fashion-mnist") => {
                let dir = Path::new(FMNIST_DEBIAN_DIR);
                let read = |f: &str| {
                    read_file_capped(&dir.join(f), MAX_IDX_BYTES).map_err(|e| match e {
                        Error::Io { err, path } => data_err(format!(
                            "{}: {err}; the full Fashion-MNIST split comes from Debian's dataset-fashion-mnist package \
                             (apt install dataset-fashion-mnist); without --data the built-in 10k split is used",
                            path.display()
                        )),
                        e => e,
                    })
                };
                let (px, lab) = fashion_mnist(&read("train-images-idx3-ubyte.gz")?, &read("train-labels-idx1-ubyte.gz")?, "Fashion-MNIST")?;
                Self::memory("fmnist", &format!("Fashion-MNIST training split ({FMNIST_DEBIAN_DIR})"), px, lab)
            }
            Some(p) => Self::open_path(Path::new(p), opts.any_size)?,
        };
        if let Some(m) = opts.max_size {
            if m == 0 {
                return Err(data_err("--max-size must be positive"));
            }
            ds.raw_len = ds.raw_len.min(m);
            if let Some(l) = ds.labels.as_mut() {
                l.truncate(ds.raw_len);
            }
        }
        ds.xflip = opts.xflip;
        Ok(ds)
    }

    fn memory(name: &str, source: &str, px: Vec<u8>, labels: Vec<u32>) -> Dataset {
        let n = labels.len();
        Dataset {
            name: name.into(),
            source: source.into(),
            resolution: 32,
            raw_channels: 1,
            encoding: Encoding::Pixels,
            labels: Some(labels),
            xflip: false,
            store: Store::Memory(px),
            raw_len: n,
        }
    }

    fn open_path(path: &Path, any_size: bool) -> Result<Dataset> {
        let source = path.display().to_string();
        let name = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "data".into());
        if !path.exists() {
            return Err(data_err(format!("{source}: no such file or directory (give a folder or .zip of images, or fashion-mnist)")));
        }
        let (store, labels_json) = if path.is_dir() {
            let names = list_dir(path)?;
            let jp = path.join("dataset.json");
            let json = match std::fs::symlink_metadata(&jp) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                _ => Some(json_text(read_file_capped(&jp, MAX_LABELS_JSON_BYTES)?, &source)?),
            };
            (Store::Dir { root: path.to_path_buf(), names }, json)
        } else {
            let f = std::fs::File::open(path).map_err(|e| Error::Io { path: path.into(), err: e })?;
            let mut z = zip::ZipArchive::new(f).map_err(|e| data_err(format!("{source}: not a readable zip archive: {e}")))?;
            let mut names: Vec<String> = z.file_names().map(|n| n.replace('\\', "/")).filter(|n| ext_of(n).is_some()).collect();
            names.sort();
            let json = match z.by_name("dataset.json") {
                Ok(mut f) => Some(json_text(read_zip_entry(&mut f, MAX_LABELS_JSON_BYTES, &format!("{source}:dataset.json"))?, &source)?),
                Err(zip::result::ZipError::FileNotFound) => None,
                Err(e) => return Err(data_err(format!("{source}: dataset.json: {e}"))),
            };
            (Store::Zip { path: path.to_path_buf(), names, pool: Mutex::new(vec![z]) }, json)
        };
        let names = match &store {
            Store::Dir { names, .. } | Store::Zip { names, .. } => names.clone(),
            Store::Memory(_) => unreachable!(),
        };
        if names.is_empty() {
            return Err(data_err(format!("{source}: no images (.png, .jpg, .jpeg) or latents (.npy) found")));
        }
        let labels = match labels_json {
            Some(j) => parse_labels(&j, &source, &names)?,
            None => None,
        };
        let mut ds = Dataset {
            name,
            source,
            resolution: 0,
            raw_channels: 0,
            encoding: Encoding::Pixels,
            labels,
            xflip: false,
            store,
            raw_len: names.len(),
        };
        if any_size {
            return Ok(ds);
        }
        // The first item fixes the geometry (as in the official dataset class).
        let (item, c, h, w) = ds.load_checked_shape(0, None)?;
        if h != w {
            return Err(data_err(format!("{}: {}x{} is not square", ds.item_name(0), w, h)));
        }
        ds.resolution = h;
        ds.raw_channels = c;
        ds.encoding = match item {
            RawItem::U8(_) => Encoding::Pixels,
            RawItem::F32(_) => Encoding::Latents,
        };
        match (ds.encoding, c) {
            (Encoding::Pixels, 1 | 3) | (Encoding::Latents, 8) => {}
            (Encoding::Pixels, _) => {
                return Err(data_err(format!("{}: {c} channels; images must be grayscale or RGB (no alpha)", ds.item_name(0))))
            }
            (Encoding::Latents, _) => {
                return Err(data_err(format!("{}: {c} channels; latents must be [8, H, W] (VAE mean ‖ std)", ds.item_name(0))))
            }
        }
        Ok(ds)
    }

    /// Items including mirrored copies.
    pub fn len(&self) -> usize {
        self.raw_len * if self.xflip { 2 } else { 1 }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Stored items (without mirrored copies).
    pub fn raw_len(&self) -> usize {
        self.raw_len
    }

    /// A short identity of what the training reads, for checking that the ranks of a
    /// data-parallel run read the same data (their paths may differ between machines):
    /// the geometry, the item count, x-flip, a 64-bit FNV-1a hash of every label and of the
    /// contents of the first and last stored items, e.g.
    /// `1000 items (500 stored, x-flip), 3x32x32 pixels, hash 9f…`.
    pub fn identity(&self) -> Result<String> {
        const PRIME: u64 = 0x0000_0100_0000_01b3;
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        let mut eat = |bytes: &[u8]| {
            for b in bytes {
                h = (h ^ *b as u64).wrapping_mul(PRIME);
            }
        };
        for l in self.labels.iter().flatten() {
            eat(&l.to_le_bytes());
        }
        for i in [0, self.raw_len.saturating_sub(1)].into_iter().filter(|_| self.raw_len > 0) {
            match self.load_raw(i)? {
                RawItem::U8(px) => eat(&px),
                RawItem::F32(v) => v.iter().for_each(|x| eat(&x.to_le_bytes())),
            }
        }
        let kind = match self.encoding {
            Encoding::Pixels => "pixels",
            Encoding::Latents => "latents",
        };
        Ok(format!(
            "{} items ({} stored{}), {}x{}x{} {kind}, {} labels, hash {h:016x}",
            self.len(),
            self.raw_len,
            if self.xflip { ", x-flip" } else { "" },
            self.raw_channels,
            self.resolution,
            self.resolution,
            if self.labels.is_some() { "with" } else { "no" }
        ))
    }

    /// Channels the network sees (latents: half of the stored mean ‖ std).
    pub fn net_channels(&self) -> usize {
        match self.encoding {
            Encoding::Pixels => self.raw_channels,
            Encoding::Latents => self.raw_channels / 2,
        }
    }

    /// max label + 1, or 0 without labels.
    pub fn label_dim(&self) -> usize {
        self.labels.as_ref().map(|l| l.iter().max().map(|m| *m as usize + 1).unwrap_or(0)).unwrap_or(0)
    }

    /// The file an item comes from (for error messages).
    pub fn item_name(&self, i: usize) -> String {
        let i = i % self.raw_len.max(1);
        match &self.store {
            Store::Memory(_) => format!("{} item {i}", self.source),
            Store::Dir { root, names } => root.join(&names[i]).display().to_string(),
            Store::Zip { path, names, .. } => format!("{}:{}", path.display(), names[i]),
        }
    }

    fn read_bytes(&self, i: usize) -> Result<Vec<u8>> {
        match &self.store {
            Store::Memory(_) => unreachable!(),
            Store::Dir { root, names } => read_file_capped(&root.join(&names[i]), decode::MAX_ITEM_FILE_BYTES),
            Store::Zip { path, names, pool } => {
                let taken = pool.lock().unwrap().pop();
                let mut z = match taken {
                    Some(z) => z,
                    None => {
                        let f = std::fs::File::open(path).map_err(|e| Error::Io { path: path.clone(), err: e })?;
                        zip::ZipArchive::new(f).map_err(|e| data_err(format!("{}: {e}", path.display())))?
                    }
                };
                let r = match z.by_name(&names[i]) {
                    Ok(mut f) => read_zip_entry(&mut f, decode::MAX_ITEM_FILE_BYTES, &self.item_name(i)),
                    Err(e) => Err(data_err(format!("{}: {e}", self.item_name(i)))),
                };
                pool.lock().unwrap().push(z);
                r
            }
        }
    }

    /// Decodes stored item `i` (< raw_len) → (data CHW, C, H, W); with `expect`, a header
    /// claiming another geometry is refused before decoding.
    fn load_checked_shape(&self, i: usize, expect: Option<&decode::Expect>) -> Result<(RawItem, usize, usize, usize)> {
        if let Store::Memory(px) = &self.store {
            let per = self.raw_channels * self.resolution * self.resolution;
            return Ok((RawItem::U8(px[i * per..(i + 1) * per].to_vec()), self.raw_channels, self.resolution, self.resolution));
        }
        let bytes = self.read_bytes(i)?;
        let name = self.item_name(i);
        decode::decode_expecting(&bytes, &name, expect)
    }

    /// Stored image `i` (< raw_len) of any size → (pixels CHW, C, H, W), within the
    /// absolute limits of [`decode`] only (datasets opened with `any_size`).
    pub fn load_image(&self, i: usize) -> Result<(Vec<u8>, usize, usize, usize)> {
        match self.load_checked_shape(i, None)? {
            (RawItem::U8(px), c, h, w) => Ok((px, c, h, w)),
            (RawItem::F32(_), ..) => Err(data_err(format!("{}: a latent (.npy), not an image", self.item_name(i)))),
        }
    }

    /// The stored items' names relative to the folder or zip (None for built-in data).
    pub fn stored_names(&self) -> Option<&[String]> {
        match &self.store {
            Store::Dir { names, .. } | Store::Zip { names, .. } => Some(names),
            Store::Memory(_) => None,
        }
    }

    /// Stored item `i` (< raw_len), checked against the dataset's geometry.
    pub fn load_raw(&self, i: usize) -> Result<RawItem> {
        let first = self.item_name(0);
        let expect = decode::Expect { channels: self.raw_channels, resolution: self.resolution, encoding: self.encoding, first: &first };
        let (item, c, h, w) = self.load_checked_shape(i, Some(&expect))?;
        if (c, h, w) != (self.raw_channels, self.resolution, self.resolution) {
            return Err(data_err(format!(
                "{}: {c}x{h}x{w} (CxHxW), but the dataset's first item {} is {}x{}x{}; all items must have the same size and channels",
                self.item_name(i),
                self.item_name(0),
                self.raw_channels,
                self.resolution,
                self.resolution
            )));
        }
        if (matches!(item, RawItem::F32(_))) != (self.encoding == Encoding::Latents) {
            return Err(data_err(format!("{}: mixes images and latents", self.item_name(i))));
        }
        Ok(item)
    }

    /// Decodes every stored item once (in parallel), so bad data fails before training.
    /// `progress(done, total)` is called as items finish.
    pub fn verify(&self, progress: &(dyn Fn(usize, usize) + Sync)) -> Result<()> {
        use rayon::prelude::*;
        if matches!(self.store, Store::Memory(_)) {
            progress(self.raw_len, self.raw_len);
            return Ok(());
        }
        let done = std::sync::atomic::AtomicUsize::new(0);
        let chunk = 256;
        let starts: Vec<usize> = (0..self.raw_len).step_by(chunk).collect();
        // Each chunk stops at its first bad file; the error reported is the first to occur.
        starts.par_iter().try_for_each(|&s| -> Result<()> {
            for i in s..(s + chunk).min(self.raw_len) {
                let it = self.load_raw(i)?;
                if let RawItem::F32(v) = &it {
                    if let Some(k) = v.iter().position(|x| !x.is_finite()) {
                        return Err(data_err(format!("{}: non-finite value at flat index {k}", self.item_name(i))));
                    }
                }
            }
            let d = done.fetch_add((s + chunk).min(self.raw_len) - s, std::sync::atomic::Ordering::Relaxed);
            progress(d + (s + chunk).min(self.raw_len) - s, self.raw_len);
            Ok(())
        })
    }

    /// Item `i` (< len) as the network sees it, HWC f32: pixels `x/127.5 − 1`, latents
    /// `(mean + std·n)·scale + bias` with `n` from `Rng::new(noise_seed)`; mirrored for
    /// `i ≥ raw_len`.
    pub fn encoded(&self, i: usize, noise_seed: u64) -> Result<Vec<f32>> {
        let flip = i >= self.raw_len;
        let raw = self.load_raw(i % self.raw_len)?;
        let (c, r) = (self.net_channels(), self.resolution);
        let chw: Vec<f32> = match raw {
            RawItem::U8(px) => px.iter().map(|&v| v as f32 / 127.5 - 1.0).collect(),
            RawItem::F32(v) => {
                let plane = r * r;
                let mut rng = Rng::new(noise_seed);
                let n = rng.normal_vec(c * plane);
                (0..c * plane)
                    .map(|k| {
                        let ch = k / plane;
                        let scale = 0.5 / LATENT_RAW_STD[ch % 4];
                        let bias = -LATENT_RAW_MEAN[ch % 4] * scale;
                        (v[k] + v[c * plane + k] * n[k]) * scale + bias
                    })
                    .collect()
            }
        };
        let mut hwc = vec![0.0f32; c * r * r];
        for ch in 0..c {
            for y in 0..r {
                for x in 0..r {
                    let sx = if flip { r - 1 - x } else { x };
                    hwc[(y * r + x) * c + ch] = chw[(ch * r + y) * r + sx];
                }
            }
        }
        Ok(hwc)
    }

    /// Class of item `i` (< len), if labelled.
    pub fn label(&self, i: usize) -> Option<u32> {
        self.labels.as_ref().map(|l| l[i % self.raw_len])
    }
}
