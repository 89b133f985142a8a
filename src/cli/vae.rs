//! The Stability VAE's commands (`nn::vae`, the official `StabilityVAEEncoder`):
//! `edm2 encode` (an image dataset → a latent dataset in the official layout),
//! `edm2 decode` (latent `.npy` files → PNG images) and the decoder of `generate --vae`.

use anyhow::{bail, Context, Result};
use edm2::backend::{resolve_device, Device, Precision};
use edm2::data::decode::{decode_npy, MAX_ITEM_FILE_BYTES};
use edm2::data::RawItem;
use edm2::io::image::write_png;
use edm2::nn::vae::{DeviceVae, LatentCodec, Parts};
use std::io::Read;
use std::path::{Path, PathBuf};

use super::checks::output_dir;

/// Images encoded or decoded at once at most (the automatic batch is also bounded by memory).
const MAX_DECODE_BATCH: usize = 64;

#[derive(clap::Args)]
pub struct DecodeArgs {
    /// The VAE: a diffusers model directory (diffusion_pytorch_model.safetensors +
    /// config.json, e.g. stabilityai/sd-vae-ft-mse) or a .safetensors file with its
    /// config.json (or <stem>.config.json) beside it.
    #[arg(long)]
    pub vae: PathBuf,
    /// A latent .npy file ([4, h, w] float32, the final latents a latent network samples,
    /// as `generate` writes them) or a directory of them.
    #[arg(long)]
    pub source: PathBuf,
    /// Output directory: one PNG per latent file, with the same name.
    #[arg(long)]
    pub dest: PathBuf,
    /// Images decoded at once (default: as many as fit in half the available memory, at
    /// most 64).
    #[arg(long)]
    pub batch: Option<usize>,
    /// Redo images whose PNG already exists (by default they are skipped, so an
    /// interrupted run resumes).
    #[arg(long)]
    pub overwrite: bool,
    /// cpu, cuda, or auto (cuda when this build has the CUDA backend and a GPU is present).
    #[arg(long, default_value = "auto")]
    pub device: Device,
    /// Arithmetic: fp32, or bf16 (on the CUDA backend activations stored as bf16, products
    /// with fp32 accumulation; on a CPU with AVX512-BF16 the convolutions' products in
    /// bf16, activations fp32; refused on other CPUs).
    #[arg(long, default_value = "fp32")]
    pub precision: Precision,
}

/// The VAE's decoder, loaded once, with the official latent normalization.
pub struct Decoder {
    vae: DeviceVae,
    codec: LatentCodec,
}

impl Decoder {
    /// Loads the decoder half of the VAE at `path` (`--vae`) on `device` (CUDA: with the
    /// command's activation `precision`).
    pub fn load(path: &Path, device: Device, precision: Precision) -> Result<Decoder> {
        let vae = DeviceVae::load(path, Parts { encoder: false, decoder: true }, device, precision).with_context(|| format!("--vae {}", path.display()))?;
        let codec = LatentCodec::default();
        anyhow::ensure!(
            vae.config().latent_channels == codec.scale.len() && vae.config().out_channels == 3,
            "--vae {}: {} latent and {} image channels; the official latent normalization is for 4 latent channels and RGB",
            path.display(),
            vae.config().latent_channels,
            vae.config().out_channels
        );
        Ok(Decoder { vae, codec })
    }

    /// Latent channels the decoder takes.
    pub fn latent_channels(&self) -> usize {
        self.vae.config().latent_channels
    }

    /// Image side per latent side.
    pub fn factor(&self) -> usize {
        self.vae.config().downscale()
    }

    /// Images of `h x w` latents decoded at once: `requested`, else what fits in half the
    /// available memory (at least 1, at most [`MAX_DECODE_BATCH`]).
    pub fn batch_size(&self, h: usize, w: usize, requested: Option<usize>) -> usize {
        if let Some(b) = requested {
            return b.max(1);
        }
        // The largest activations are at the decoder's last levels: after each 2x
        // upsampling, (side·2)² pixels of that level's width; about five such tensors are
        // alive at once in a ResNet block.
        let mut peak = 0;
        for (i, &c) in self.vae.config().block_out_channels.iter().rev().enumerate() {
            let side = 1 << i; // this level's resolution over the latent's
            let last = i + 1 == self.vae.config().block_out_channels.len();
            let out_side = if last { side } else { 2 * side };
            peak = peak.max(h * out_side * w * out_side * c);
        }
        let per_image = (5 * peak * 4) as u64;
        if !self.vae.on_cpu() {
            // On a GPU: a 16 GiB budget (the device allocator refuses what does not fit,
            // naming the size; --batch overrides).
            return ((16u64 << 30) / per_image.max(1)).clamp(1, MAX_DECODE_BATCH as u64) as usize;
        }
        let avail = edm2::train::memory::host_available().unwrap_or(4 << 30) / 2;
        ((avail / per_image.max(1)) as usize).clamp(1, MAX_DECODE_BATCH)
    }

    /// Decodes final latents NCHW `[n, 4, h, w]` → uint8 images `[n, f·h, f·w, 3]` (HWC
    /// per image, as PNGs store them).
    pub fn decode(&self, latents: &[f32], n: usize, h: usize, w: usize) -> Result<Vec<u8>> {
        let chw = self.vae.decode(&self.codec, latents, n, h, w)?.0;
        let (c, hw) = (self.vae.config().out_channels, h * w * self.factor() * self.factor());
        let mut hwc = vec![0u8; chw.len()];
        for (src, dst) in chw.chunks_exact(c * hw).zip(hwc.chunks_exact_mut(c * hw)) {
            for ch in 0..c {
                for p in 0..hw {
                    dst[p * c + ch] = src[ch * hw + p];
                }
            }
        }
        Ok(hwc)
    }
}

/// Reads one latent `.npy` (`[C, h, w]` float32; size bounded like dataset items).
pub fn read_latent(path: &Path) -> Result<(Vec<f32>, usize, usize, usize)> {
    let f = std::fs::File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    let mut bytes = Vec::new();
    f.take(MAX_ITEM_FILE_BYTES + 1).read_to_end(&mut bytes).with_context(|| format!("{}: cannot read", path.display()))?;
    if bytes.len() as u64 > MAX_ITEM_FILE_BYTES {
        bail!("{}: larger than the limit of {} MiB for one latent", path.display(), MAX_ITEM_FILE_BYTES >> 20);
    }
    let name = path.display().to_string();
    match decode_npy(&bytes, &name)? {
        (RawItem::F32(v), c, h, w) => Ok((v, c, h, w)),
        _ => bail!("{name}: not float32 latents"),
    }
}

pub fn run_decode(a: DecodeArgs) -> Result<()> {
    edm2::profile::enable_from_env();
    let device = resolve_device(a.device)?;
    anyhow::ensure!(a.batch != Some(0), "--batch must be at least 1");
    edm2::nn::vae::locate(&a.vae)?;
    let mut files: Vec<PathBuf> = if a.source.is_dir() {
        let rd = std::fs::read_dir(&a.source).with_context(|| format!("--source {}: cannot list", a.source.display()))?;
        let mut v = Vec::new();
        for e in rd {
            let p = e.with_context(|| format!("--source {}: cannot list", a.source.display()))?.path();
            if p.extension().and_then(|x| x.to_str()) == Some("npy") {
                v.push(p);
            }
        }
        v
    } else if a.source.is_file() {
        vec![a.source.clone()]
    } else {
        bail!("--source {}: no such file or directory", a.source.display());
    };
    files.sort();
    anyhow::ensure!(!files.is_empty(), "--source {}: no .npy latents found", a.source.display());
    output_dir("dest", &a.dest)?;
    let out_of = |p: &Path| a.dest.join(Path::new(p.file_name().unwrap()).with_extension("png"));
    let todo: Vec<&PathBuf> = files.iter().filter(|p| a.overwrite || !out_of(p).exists()).collect();
    if todo.len() < files.len() {
        eprintln!("{} of {} images exist already (--overwrite redoes them)", files.len() - todo.len(), files.len());
    }
    if todo.is_empty() {
        return Ok(());
    }
    let dec = Decoder::load(&a.vae, device, a.precision)?;
    // Latents are grouped into batches of equal shape, in file order.
    let first = read_latent(todo[0])?;
    let batch = dec.batch_size(first.2, first.3, a.batch);
    eprintln!("decoding {} latents of {}x{} in batches of {batch}", todo.len(), first.2, first.3);
    let t0 = std::time::Instant::now();
    let mut done = 0;
    for chunk in todo.chunks(batch) {
        let mut data = Vec::new();
        let mut shape = None;
        for p in chunk {
            let (v, c, h, w) = read_latent(p)?;
            anyhow::ensure!(c == dec.latent_channels(), "{}: {c} channels; the VAE takes {}", p.display(), dec.latent_channels());
            match shape {
                None => shape = Some((h, w)),
                Some(s) => anyhow::ensure!(s == (h, w), "{}: {h}x{w} latents among {}x{} ones; decode them separately", p.display(), s.0, s.1),
            }
            data.extend(v);
        }
        let (h, w) = shape.unwrap();
        let px = dec.decode(&data, chunk.len(), h, w)?;
        let (ih, iw) = (h * dec.factor(), w * dec.factor());
        let per = 3 * ih * iw;
        for (i, p) in chunk.iter().enumerate() {
            write_png(&out_of(p), &px[i * per..(i + 1) * per], 3, ih, iw)?;
        }
        done += chunk.len();
        eprintln!("  {done}/{} images ({:.2} s per image)", todo.len(), t0.elapsed().as_secs_f64() / done as f64);
    }
    eprintln!("done: {} images in {}", todo.len(), a.dest.display());
    if edm2::profile::enabled() {
        eprintln!("profile (EDM2_PROFILE):\n{}", edm2::profile::report());
    }
    Ok(())
}

#[derive(clap::Args)]
pub struct EncodeArgs {
    /// The VAE (as for `decode`: a diffusers model directory or a .safetensors file with
    /// its config.json beside it).
    #[arg(long)]
    pub vae: PathBuf,
    /// Image dataset: a folder (searched recursively) or .zip of PNG/JPEG images, with its
    /// dataset.json labels if any (a folder without them: labels from its top-level
    /// folder names, as the official tool does, e.g. ImageNet's class folders). Without
    /// --transform/--resolution all images must be square, of one size, a multiple of 8.
    #[arg(long)]
    pub source: String,
    /// Latent dataset to write: a folder, or a .zip (written at the end from a resumable
    /// working folder DEST.partial beside it). Layout of the official dataset_tool encode:
    /// `{idx/1000:05}/img-mean-std-{idx:08}.npy` (float32 [8, h, w]: posterior mean ‖ std)
    /// and dataset.json with the labels carried over.
    #[arg(long)]
    pub dest: PathBuf,
    /// Crop/resize each image first, bit for bit as the official `dataset_tool.py convert
    /// --transform=...` does (Pillow's resampling): center-crop-dhariwal is the one of
    /// EDM2's ImageNet-512 data (`--transform center-crop-dhariwal --resolution 512x512`).
    /// Grayscale images become RGB. Needs --resolution.
    #[arg(long, value_enum)]
    pub transform: Option<edm2::data::transform::Transform>,
    /// Output size WxH of the transform; without --transform, images of another size are
    /// resized to it (Lanczos), as the official tool does.
    #[arg(long, value_parser = edm2::data::transform::parse_resolution)]
    pub resolution: Option<(usize, usize)>,
    /// Encode only the first N images.
    #[arg(long = "max-images")]
    pub max_images: Option<usize>,
    /// Images encoded at once (default: by available memory, at most 64).
    #[arg(long)]
    pub batch: Option<usize>,
    /// cpu, cuda, or auto (cuda when this build has the CUDA backend and a GPU is present).
    #[arg(long, default_value = "auto")]
    pub device: Device,
    /// Arithmetic: fp32, or bf16 (on the CUDA backend activations stored as bf16, products
    /// with fp32 accumulation; on a CPU with AVX512-BF16 the convolutions' products in
    /// bf16, activations fp32; refused on other CPUs).
    #[arg(long, default_value = "fp32")]
    pub precision: Precision,
}

/// The official name of item `idx` in a latent dataset.
pub fn latent_item_name(idx: usize) -> String {
    let s = format!("{idx:08}");
    format!("{}/img-mean-std-{s}.npy", &s[..5])
}

/// Labels from top-level folder names (the official tool's rule for a folder whose
/// dataset.json gives none): the index of the item's first path component among the
/// sorted distinct ones ('' for items at the root), when there are at least two.
pub fn toplevel_labels(names: &[String]) -> Option<Vec<u32>> {
    let top = |n: &str| n.split_once('/').map(|(t, _)| t.to_string()).unwrap_or_default();
    let distinct: std::collections::BTreeSet<String> = names.iter().map(|n| top(n)).collect();
    if distinct.len() < 2 {
        return None;
    }
    let index: std::collections::HashMap<&String, u32> = distinct.iter().enumerate().map(|(i, t)| (t, i as u32)).collect();
    Some(names.iter().map(|n| index[&top(n)]).collect())
}

/// One source image, read and transformed → RGB CHW pixels and side, or None where the
/// transform skips it.
fn encode_input(ds: &edm2::data::Dataset, a: &EncodeArgs, i: usize) -> Result<Option<(Vec<u8>, usize)>> {
    let (px, c, h, w) = ds.load_image(i)?;
    let name = || ds.item_name(i);
    anyhow::ensure!(c == 1 || c == 3, "{}: {c} channels; expected grayscale or RGB", name());
    let Some((px, oh, ow)) = edm2::data::transform::apply(a.transform, a.resolution, &px, c, h, w).with_context(name)? else {
        return Ok(None);
    };
    if oh != ow {
        bail!("{}: {ow}x{oh} after the transform; the latent dataset needs square images (give --transform/--resolution)", name());
    }
    // Grayscale → RGB by repeating the plane (PIL's convert('RGB') of an 'L' image).
    let rgb = if c == 1 { px.repeat(3) } else { px };
    Ok(Some((rgb, oh)))
}

pub fn run_encode(a: EncodeArgs) -> Result<()> {
    edm2::profile::enable_from_env();
    let device = resolve_device(a.device)?;
    anyhow::ensure!(a.batch != Some(0), "--batch must be at least 1");
    if a.transform.is_some() && a.resolution.is_none() {
        bail!("--transform needs --resolution WxH (e.g. --resolution 512x512)");
    }
    edm2::nn::vae::locate(&a.vae)?;
    let opts = edm2::data::DataOptions { xflip: false, max_size: a.max_images, any_size: true };
    let ds = edm2::data::Dataset::open(Some(&a.source), &opts).with_context(|| format!("--source {}", a.source))?;
    let n = ds.raw_len();
    let labels = match (&ds.labels, ds.stored_names()) {
        (Some(l), _) => Some(l.clone()),
        (None, Some(names)) if Path::new(&a.source).is_dir() => toplevel_labels(&names[..n]),
        _ => None,
    };
    let vae = DeviceVae::load(&a.vae, Parts { encoder: true, decoder: false }, device, a.precision)
        .with_context(|| format!("--vae {}", a.vae.display()))?;
    let f = vae.config().downscale();
    // The first image the transform keeps fixes the side (as the official tool's first
    // image fixes the dataset's attributes).
    let mut r = None;
    for i in 0..n {
        if let Some((_, side)) = encode_input(&ds, &a, i)? {
            r = Some(side);
            break;
        }
    }
    let Some(r) = r else { bail!("--source {}: the transform skips every image (too small for --resolution)", a.source) };
    anyhow::ensure!(r % f == 0, "--source {}: {r}x{r} images; the VAE needs sides that are multiples of {f}", a.source);
    let to_zip = a.dest.extension().and_then(|e| e.to_str()).is_some_and(|e| e.eq_ignore_ascii_case("zip"));
    let work = if to_zip { PathBuf::from(format!("{}.partial", a.dest.display())) } else { a.dest.clone() };
    output_dir("dest", &work)?;
    let todo: Vec<usize> = (0..n).filter(|&i| !work.join(latent_item_name(i)).exists()).collect();
    if todo.len() < n {
        eprintln!("{} of {n} latents exist in {} already; encoding the other {}", n - todo.len(), work.display(), todo.len());
    }
    // Peak memory of the encoder: its first level, at full resolution, about five tensors
    // of that level's width alive at once.
    let per_image = (5 * r * r * vae.config().block_out_channels[0] * 4) as u64;
    let batch = a.batch.unwrap_or_else(|| {
        let avail = edm2::train::memory::host_available().unwrap_or(4 << 30) / 2;
        ((avail / per_image.max(1)) as usize).clamp(1, MAX_DECODE_BATCH)
    });
    eprintln!("encoding {} images of {r}x{r} into {} in batches of {batch}", todo.len(), work.display());
    let codec = LatentCodec::default();
    let t0 = std::time::Instant::now();
    let (mut done, mut skipped) = (0, std::collections::BTreeSet::new());
    for chunk in todo.chunks(batch) {
        // Reading, decoding and transforming in parallel; the order stays the items'.
        let inputs: Vec<Result<Option<(Vec<u8>, usize)>>> = {
            use rayon::prelude::*;
            chunk.par_iter().map(|&i| encode_input(&ds, &a, i)).collect()
        };
        let mut px = Vec::with_capacity(chunk.len() * 3 * r * r);
        let mut kept = Vec::with_capacity(chunk.len());
        for (&i, input) in chunk.iter().zip(inputs) {
            match input? {
                None => {
                    skipped.insert(i);
                }
                Some((p, side)) => {
                    if side != r {
                        bail!("{}: {side}x{side} after the transform, but the first image is {r}x{r}; all must have one size (give --resolution)", ds.item_name(i));
                    }
                    px.extend(p);
                    kept.push(i);
                }
            }
        }
        done += chunk.len();
        if kept.is_empty() {
            continue;
        }
        let raw = vae.encode_pixels(&codec, &px, kept.len(), r, r)?;
        let per = raw.len() / kept.len();
        let (c, h) = (2 * vae.config().latent_channels, r / f);
        for (k, &i) in kept.iter().enumerate() {
            let p = work.join(latent_item_name(i));
            std::fs::create_dir_all(p.parent().unwrap()).with_context(|| format!("creating {}", p.parent().unwrap().display()))?;
            edm2::io::npy::write(&p, &raw[k * per..(k + 1) * per], &[c, h, h])?;
        }
        eprintln!("  {done}/{} images ({:.2} s per image)", todo.len(), t0.elapsed().as_secs_f64() / done as f64);
    }
    if !skipped.is_empty() {
        eprintln!("skipped {} images the transform does not keep (as the official tool does)", skipped.len());
    }
    // The items written (this run's and earlier runs'), in order; dataset.json labels
    // them as the official tool writes it (null when the source has none).
    let items: Vec<usize> = (0..n).filter(|&i| work.join(latent_item_name(i)).exists()).collect();
    let labels = match &labels {
        Some(l) if !items.is_empty() => serde_json::Value::Array(items.iter().map(|&i| serde_json::json!([latent_item_name(i), l[i]])).collect()),
        _ => serde_json::Value::Null,
    };
    let meta = serde_json::json!({ "labels": labels });
    edm2::io::write_atomic(work.join("dataset.json"), meta.to_string().as_bytes())?;
    if to_zip {
        write_zip_of(&work, &items, &a.dest)?;
        std::fs::remove_dir_all(&work).with_context(|| format!("removing the working folder {}", work.display()))?;
    }
    eprintln!("done: {} latents in {}", items.len(), a.dest.display());
    if edm2::profile::enabled() {
        eprintln!("profile (EDM2_PROFILE):\n{}", edm2::profile::report());
    }
    Ok(())
}

/// `dest` (.zip, atomically) from the `items` and dataset.json in `work`.
fn write_zip_of(work: &Path, items: &[usize], dest: &Path) -> Result<()> {
    let tmp = PathBuf::from(format!("{}.tmp{}", dest.display(), std::process::id()));
    let file = std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let mut z = zip::ZipWriter::new(std::io::BufWriter::new(file));
    let opts = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    let names = items.iter().map(|&i| latent_item_name(i)).chain(std::iter::once("dataset.json".to_string()));
    let res = (|| -> Result<()> {
        for name in names {
            let bytes = std::fs::read(work.join(&name)).with_context(|| format!("reading {}", work.join(&name).display()))?;
            z.start_file(name.as_str(), opts)?;
            std::io::Write::write_all(&mut z, &bytes)?;
        }
        let mut w = z.finish()?;
        std::io::Write::flush(&mut w)?;
        w.get_ref().sync_all()?;
        Ok(())
    })();
    if let Err(e) = res {
        let _ = std::fs::remove_file(&tmp);
        return Err(e.context(format!("writing {}", dest.display())));
    }
    std::fs::rename(&tmp, dest).with_context(|| format!("renaming {} to {}", tmp.display(), dest.display()))?;
    Ok(())
}
