//! The Stability VAE (diffusers' `AutoencoderKL`, e.g. `stabilityai/sd-vae-ft-mse`) that
//! the paper's ImageNet-512 networks work in, described once and run on any backend that
//! has [`VaeOps`]. With it a latent network's samples become images, and image datasets
//! become latent datasets, without Python.
//!
//! Structure (diffusers `models/autoencoders/vae.py`; widths and depth from `config.json`):
//! * encoder: `conv_in` → per `down_blocks.i`: `layers_per_block` ResNet blocks, then (all
//!   but the last block) a stride-2 3x3 conv padded (0, 1, 0, 1) → `mid_block` (ResNet,
//!   single-head attention, ResNet) → GroupNorm + SiLU → `conv_out` (2·latent channels);
//!   then `quant_conv` (1x1). The posterior is `mean ‖ logvar`, logvar clamped to
//!   [−30, 20], `std = exp(logvar / 2)`.
//! * decoder: `post_quant_conv` (1x1) → `conv_in` → `mid_block` → per `up_blocks.i`
//!   (`block_out_channels` reversed): `layers_per_block + 1` ResNet blocks, then (all but
//!   the last) nearest 2x upsampling and a 3x3 conv → GroupNorm + SiLU → `conv_out`.
//! * ResNet block: `x + conv2(silu(gn2(conv1(silu(gn1(x))))))`, the skip through the 1x1
//!   `conv_shortcut` where the width changes. GroupNorm: `norm_num_groups` groups, eps 1e-6.
//! * attention: `x + to_out(softmax(q·kᵀ/sqrt(C))·v)` with `q, k, v = to_q/k/v(gn(x))`
//!   over the pixels; the older names `query`, `key`, `value`, `proj_attn` are accepted.
//!
//! The official EDM2 encoder semantics ([`LatentCodec`], `training/encoders.py`,
//! `StabilityVAEEncoder`) sit on top: encoding feeds `pixels / 255` and keeps `mean ‖ std`;
//! decoding undoes the latent scale and bias, decodes, and returns
//! `uint8(clamp(x, 0, 1)·255)` (truncated, as torch's `.to(torch.uint8)`).
//!
//! Activations are NHWC like the rest of the crate; files and the codec's tensors are NCHW.

use crate::backend::{ConvGeom, Nhwc, VaeOps};
use crate::error::{Error, Result};
use crate::io::safetensors::{self, StFile};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// GroupNorm epsilon of every norm in the VAE (diffusers builds them with 1e-6).
const GN_EPS: f32 = 1e-6;
/// Limits on what a config may ask for (every allocation a file sizes is bounded).
const MAX_CHANNELS: usize = 4096;
const MAX_BLOCKS: usize = 8;
const MAX_LAYERS: usize = 8;

/// The parts of `config.json` the network's shape depends on.
#[derive(Clone, Debug, PartialEq)]
pub struct VaeConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub latent_channels: usize,
    pub norm_num_groups: usize,
    pub use_quant_conv: bool,
    pub use_post_quant_conv: bool,
    pub mid_block_add_attention: bool,
}

impl VaeConfig {
    /// Parses and checks a diffusers `AutoencoderKL` `config.json`; `path` names it in errors.
    pub fn parse(path: &Path, text: &str) -> Result<VaeConfig> {
        let bad = |m: String| Error::Config(format!("{}: {m}", path.display()));
        let v: serde_json::Value = serde_json::from_str(text).map_err(|e| bad(format!("not valid JSON: {e}")))?;
        let obj = v.as_object().ok_or_else(|| bad("not a JSON object".into()))?;
        let uint = |k: &str, default: Option<usize>| -> Result<usize> {
            match obj.get(k) {
                Some(x) => x.as_u64().map(|u| u as usize).ok_or_else(|| bad(format!("'{k}' must be a non-negative integer"))),
                None => default.ok_or_else(|| bad(format!("'{k}' is missing"))),
            }
        };
        let flag = |k: &str| -> Result<bool> {
            match obj.get(k) {
                None | Some(serde_json::Value::Null) => Ok(true),
                Some(x) => x.as_bool().ok_or_else(|| bad(format!("'{k}' must be true or false"))),
            }
        };
        let list = |k: &str| -> Result<Vec<serde_json::Value>> {
            obj.get(k).and_then(|x| x.as_array()).cloned().ok_or_else(|| bad(format!("'{k}' must be a list")))
        };
        if let Some(act) = obj.get("act_fn") {
            if act.as_str() != Some("silu") {
                return Err(bad(format!("act_fn {act} is not supported (only \"silu\")")));
            }
        }
        let block_out_channels = list("block_out_channels")?
            .iter()
            .map(|x| x.as_u64().map(|u| u as usize).ok_or_else(|| bad("'block_out_channels' must hold integers".into())))
            .collect::<Result<Vec<_>>>()?;
        let n = block_out_channels.len();
        for (k, expect) in [("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")] {
            if let Some(types) = obj.get(k) {
                let types = types.as_array().ok_or_else(|| bad(format!("'{k}' must be a list")))?;
                if types.len() != n || types.iter().any(|t| t.as_str() != Some(expect)) {
                    return Err(bad(format!("'{k}' must be {n} × \"{expect}\" (one per block_out_channels entry)")));
                }
            }
        }
        let cfg = VaeConfig {
            in_channels: uint("in_channels", Some(3))?,
            out_channels: uint("out_channels", Some(3))?,
            block_out_channels,
            layers_per_block: uint("layers_per_block", Some(1))?,
            latent_channels: uint("latent_channels", Some(4))?,
            norm_num_groups: uint("norm_num_groups", Some(32))?,
            use_quant_conv: flag("use_quant_conv")?,
            use_post_quant_conv: flag("use_post_quant_conv")?,
            mid_block_add_attention: flag("mid_block_add_attention")?,
        };
        if cfg.block_out_channels.is_empty() || cfg.block_out_channels.len() > MAX_BLOCKS {
            return Err(bad(format!("block_out_channels must have 1 to {MAX_BLOCKS} entries")));
        }
        if cfg.layers_per_block == 0 || cfg.layers_per_block > MAX_LAYERS {
            return Err(bad(format!("layers_per_block must be 1 to {MAX_LAYERS}")));
        }
        let g = cfg.norm_num_groups;
        for &c in &cfg.block_out_channels {
            if c == 0 || c > MAX_CHANNELS || g == 0 || c % g != 0 {
                return Err(bad(format!("block width {c} must be 1..{MAX_CHANNELS} and a multiple of norm_num_groups {g}")));
            }
        }
        for (k, c) in [("in_channels", cfg.in_channels), ("out_channels", cfg.out_channels), ("latent_channels", cfg.latent_channels)] {
            if c == 0 || c > 64 {
                return Err(bad(format!("{k} {c} must be 1..64")));
            }
        }
        Ok(cfg)
    }

    /// Pixels per latent pixel along each side (2^(blocks − 1): 8 for the Stability VAE).
    pub fn downscale(&self) -> usize {
        1 << (self.block_out_channels.len() - 1)
    }
}

/// Where a VAE's weights and config are: a diffusers model directory (with
/// `diffusion_pytorch_model.safetensors` and `config.json`, also under a `vae/`
/// subdirectory as in a pipeline), or a `.safetensors` file with `config.json` or
/// `<stem>.config.json` beside it.
pub fn locate(path: &Path) -> Result<(PathBuf, PathBuf)> {
    let missing = |what: &str| Error::Input(format!("--vae {}: {what}", path.display()));
    if path.is_dir() {
        for dir in [path.to_path_buf(), path.join("vae")] {
            let w = dir.join("diffusion_pytorch_model.safetensors");
            let c = dir.join("config.json");
            if w.is_file() && c.is_file() {
                return Ok((w, c));
            }
        }
        return Err(missing("no diffusion_pytorch_model.safetensors with a config.json in this directory (or in vae/ under it)"));
    }
    if !path.is_file() {
        return Err(missing("no such file or directory"));
    }
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("");
    for c in [dir.join(format!("{stem}.config.json")), dir.join("config.json")] {
        if c.is_file() {
            return Ok((path.to_path_buf(), c));
        }
    }
    Err(missing(&format!("no config.json or {stem}.config.json beside the weights (the diffusers AutoencoderKL config)")))
}

/// Which halves of the autoencoder to load.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Parts {
    pub encoder: bool,
    pub decoder: bool,
}

/// Weights read from a diffusers file, checked against the config as they are taken.
struct Loader<'a> {
    file: &'a StFile,
    used: BTreeSet<String>,
}

impl Loader<'_> {
    /// The tensor `name` (or, for attention projections, its older name) with `shape`
    /// (`[O, I, 1, 1]` accepted for `[O, I]`).
    fn take(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let legacy = [(".to_q.", ".query."), (".to_k.", ".key."), (".to_v.", ".value."), (".to_out.0.", ".proj_attn.")]
            .iter()
            .find(|(new, _)| name.contains(new))
            .map(|(new, old)| name.replace(new, old));
        let (found, t) = match (self.file.get(name), legacy.as_deref().and_then(|l| self.file.get(l).map(|t| (l, t)))) {
            (Some(t), _) => (name, t),
            (None, Some((l, t))) => (l, t),
            (None, None) => return Err(Error::MissingTensor { path: self.file.path.clone(), name: name.into() }),
        };
        let squeezed = t.shape.len() == 4 && shape.len() == 2 && t.shape[2..] == [1, 1] && t.shape[..2] == *shape;
        if t.shape != shape && !squeezed {
            return Err(Error::Shape { path: self.file.path.clone(), name: found.into(), expected: shape.to_vec(), found: t.shape.clone() });
        }
        self.used.insert(found.to_string());
        Ok(t.data.clone())
    }
}

/// A convolution or linear layer with a bias.
struct Conv<B: VaeOps> {
    eff: B::Eff,
    bias: B::Chan,
    geom: ConvGeom,
}

impl<B: VaeOps> Conv<B> {
    /// `name.weight` `[out, in, k, k]` and `name.bias`; `k` = 0 reads a linear `[out, in]`
    /// and runs it as a 1x1 convolution over the pixels.
    fn load(be: &B, l: &mut Loader, name: &str, out_ch: usize, in_ch: usize, k: usize) -> Result<Self> {
        let shape: Vec<usize> = if k == 0 { vec![out_ch, in_ch] } else { vec![out_ch, in_ch, k, k] };
        let w = l.take(&format!("{name}.weight"), &shape)?;
        let b = l.take(&format!("{name}.bias"), &[out_ch])?;
        let geom = ConvGeom { out_ch, in_ch, k: k.max(1) };
        Ok(Conv { eff: be.plain_weight(&w, geom)?, bias: be.upload_chan(&b)?, geom })
    }

    /// The q, k, v projections of an attention as one linear layer `[3C, C]`.
    fn load_qkv(be: &B, l: &mut Loader, name: &str, c: usize) -> Result<Self> {
        let (mut w, mut b) = (Vec::with_capacity(3 * c * c), Vec::with_capacity(3 * c));
        for part in ["to_q", "to_k", "to_v"] {
            w.extend(l.take(&format!("{name}.{part}.weight"), &[c, c])?);
            b.extend(l.take(&format!("{name}.{part}.bias"), &[c])?);
        }
        let geom = ConvGeom { out_ch: 3 * c, in_ch: c, k: 1 };
        Ok(Conv { eff: be.plain_weight(&w, geom)?, bias: be.upload_chan(&b)?, geom })
    }

    /// `conv(x) + bias`, 'same' padding, stride 1.
    fn forward(&self, be: &B, x: &B::Buf, s: Nhwc) -> Result<(B::Buf, Nhwc)> {
        let so = Nhwc { c: self.geom.out_ch, ..s };
        let mut y = be.alloc_like(x, so.numel())?;
        be.conv_forward(&self.eff, x, s, &mut y)?;
        be.add_channel_bias(&mut y, &self.bias, so.c)?;
        Ok((y, so))
    }

    /// diffusers' `Downsample2D`: pad (0, 1, 0, 1), 3x3 conv at stride 2.
    fn forward_stride2(&self, be: &B, x: &B::Buf, s: Nhwc) -> Result<(B::Buf, Nhwc)> {
        let full = Nhwc { c: self.geom.out_ch, ..s };
        let mut y = be.alloc_like(x, full.numel())?;
        be.conv_forward(&self.eff, x, s, &mut y)?;
        let so = Nhwc { h: s.h / 2, w: s.w / 2, ..full };
        let mut out = be.alloc_like(x, so.numel())?;
        be.subsample2_odd(&y, full, &mut out)?;
        be.add_channel_bias(&mut out, &self.bias, so.c)?;
        Ok((out, so))
    }
}

/// GroupNorm's scale and shift.
struct Norm<B: VaeOps> {
    gamma: B::Chan,
    beta: B::Chan,
    groups: usize,
}

impl<B: VaeOps> Norm<B> {
    fn load(be: &B, l: &mut Loader, name: &str, c: usize, groups: usize) -> Result<Self> {
        let g = l.take(&format!("{name}.weight"), &[c])?;
        let b = l.take(&format!("{name}.bias"), &[c])?;
        Ok(Norm { gamma: be.upload_chan(&g)?, beta: be.upload_chan(&b)?, groups })
    }
    fn forward(&self, be: &B, x: &B::Buf, s: Nhwc, silu: bool) -> Result<B::Buf> {
        let mut y = be.alloc_like(x, s.numel())?;
        be.group_norm(x, s, self.groups, GN_EPS, &self.gamma, &self.beta, silu, &mut y)?;
        Ok(y)
    }
}

struct Resnet<B: VaeOps> {
    norm1: Norm<B>,
    conv1: Conv<B>,
    norm2: Norm<B>,
    conv2: Conv<B>,
    shortcut: Option<Conv<B>>,
}

impl<B: VaeOps> Resnet<B> {
    fn load(be: &B, l: &mut Loader, name: &str, cin: usize, cout: usize, groups: usize) -> Result<Self> {
        Ok(Resnet {
            norm1: Norm::load(be, l, &format!("{name}.norm1"), cin, groups)?,
            conv1: Conv::load(be, l, &format!("{name}.conv1"), cout, cin, 3)?,
            norm2: Norm::load(be, l, &format!("{name}.norm2"), cout, groups)?,
            conv2: Conv::load(be, l, &format!("{name}.conv2"), cout, cout, 3)?,
            shortcut: if cin != cout { Some(Conv::load(be, l, &format!("{name}.conv_shortcut"), cout, cin, 1)?) } else { None },
        })
    }
    fn forward(&self, be: &B, x: &B::Buf, s: Nhwc) -> Result<(B::Buf, Nhwc)> {
        let h = self.norm1.forward(be, x, s, true)?;
        let (h, so) = self.conv1.forward(be, &h, s)?;
        let h = self.norm2.forward(be, &h, so, true)?;
        let (mut h, so) = self.conv2.forward(be, &h, so)?;
        match &self.shortcut {
            Some(sc) => be.add(&mut h, &sc.forward(be, x, s)?.0)?,
            None => be.add(&mut h, x)?,
        }
        Ok((h, so))
    }
}

/// The mid-block's single-head self-attention over all pixels of an image.
struct Attention<B: VaeOps> {
    norm: Norm<B>,
    qkv: Conv<B>,
    out: Conv<B>,
}

impl<B: VaeOps> Attention<B> {
    fn load(be: &B, l: &mut Loader, name: &str, c: usize, groups: usize) -> Result<Self> {
        Ok(Attention {
            norm: Norm::load(be, l, &format!("{name}.group_norm"), c, groups)?,
            qkv: Conv::load_qkv(be, l, name, c)?,
            out: Conv::load(be, l, &format!("{name}.to_out.0"), c, c, 0)?,
        })
    }
    fn forward(&self, be: &B, x: &B::Buf, s: Nhwc) -> Result<B::Buf> {
        let h = self.norm.forward(be, x, s, false)?;
        let (qkv, _) = self.qkv.forward(be, &h, s)?;
        let mut a = be.alloc_like(x, s.numel())?;
        be.dot_attention(&qkv, s.n, s.h * s.w, s.c, &mut a)?;
        let (mut y, _) = self.out.forward(be, &a, s)?;
        be.add(&mut y, x)?;
        Ok(y)
    }
}

struct Mid<B: VaeOps> {
    res0: Resnet<B>,
    attn: Option<Attention<B>>,
    res1: Resnet<B>,
}

impl<B: VaeOps> Mid<B> {
    fn load(be: &B, l: &mut Loader, name: &str, c: usize, cfg: &VaeConfig) -> Result<Self> {
        let g = cfg.norm_num_groups;
        Ok(Mid {
            res0: Resnet::load(be, l, &format!("{name}.resnets.0"), c, c, g)?,
            attn: if cfg.mid_block_add_attention { Some(Attention::load(be, l, &format!("{name}.attentions.0"), c, g)?) } else { None },
            res1: Resnet::load(be, l, &format!("{name}.resnets.1"), c, c, g)?,
        })
    }
    fn forward(&self, be: &B, x: &B::Buf, s: Nhwc) -> Result<B::Buf> {
        let (mut h, _) = self.res0.forward(be, x, s)?;
        if let Some(a) = &self.attn {
            h = a.forward(be, &h, s)?;
        }
        Ok(self.res1.forward(be, &h, s)?.0)
    }
}

/// One resolution level: ResNet blocks then an optional resampling conv.
struct Level<B: VaeOps> {
    resnets: Vec<Resnet<B>>,
    resample: Option<Conv<B>>,
}

struct Encoder<B: VaeOps> {
    conv_in: Conv<B>,
    down: Vec<Level<B>>,
    mid: Mid<B>,
    norm_out: Norm<B>,
    conv_out: Conv<B>,
    quant: Option<Conv<B>>,
}

struct Decoder<B: VaeOps> {
    post_quant: Option<Conv<B>>,
    conv_in: Conv<B>,
    mid: Mid<B>,
    up: Vec<Level<B>>,
    norm_out: Norm<B>,
    conv_out: Conv<B>,
}

/// A loaded VAE (either half or both) on backend `B`.
pub struct Vae<B: VaeOps> {
    pub config: VaeConfig,
    /// The weights file it came from (named in errors and reports).
    pub path: PathBuf,
    encoder: Option<Encoder<B>>,
    decoder: Option<Decoder<B>>,
}

impl<B: VaeOps> Vae<B> {
    /// Loads `parts` of the VAE at `path` (see [`locate`]). Every tensor of a loaded half
    /// must be present with its shape, and none may be left over in that half's namespace.
    pub fn load(be: &B, path: &Path, parts: Parts) -> Result<Self> {
        let (weights, config) = locate(path)?;
        let text = std::fs::read_to_string(&config).map_err(|e| Error::Io { path: config.clone(), err: e })?;
        let cfg = VaeConfig::parse(&config, &text)?;
        let file = safetensors::read(&weights)?;
        Self::from_file(be, cfg, &file, parts)
    }

    /// Builds the VAE from an already read weights file and its config.
    pub fn from_file(be: &B, cfg: VaeConfig, file: &StFile, parts: Parts) -> Result<Self> {
        let mut l = Loader { file, used: BTreeSet::new() };
        let g = cfg.norm_num_groups;
        let ch = &cfg.block_out_channels;
        let lat = cfg.latent_channels;
        let last = ch.len() - 1;
        let encoder = if parts.encoder {
            let conv_in = Conv::load(be, &mut l, "encoder.conv_in", ch[0], cfg.in_channels, 3)?;
            let mut down = Vec::new();
            let mut cin = ch[0];
            for (i, &c) in ch.iter().enumerate() {
                let mut resnets = Vec::new();
                for j in 0..cfg.layers_per_block {
                    resnets.push(Resnet::load(be, &mut l, &format!("encoder.down_blocks.{i}.resnets.{j}"), if j == 0 { cin } else { c }, c, g)?);
                }
                let resample =
                    if i < last { Some(Conv::load(be, &mut l, &format!("encoder.down_blocks.{i}.downsamplers.0.conv"), c, c, 3)?) } else { None };
                down.push(Level { resnets, resample });
                cin = c;
            }
            Some(Encoder {
                conv_in,
                down,
                mid: Mid::load(be, &mut l, "encoder.mid_block", ch[last], &cfg)?,
                norm_out: Norm::load(be, &mut l, "encoder.conv_norm_out", ch[last], g)?,
                conv_out: Conv::load(be, &mut l, "encoder.conv_out", 2 * lat, ch[last], 3)?,
                quant: if cfg.use_quant_conv { Some(Conv::load(be, &mut l, "quant_conv", 2 * lat, 2 * lat, 1)?) } else { None },
            })
        } else {
            None
        };
        let decoder = if parts.decoder {
            let post_quant = if cfg.use_post_quant_conv { Some(Conv::load(be, &mut l, "post_quant_conv", lat, lat, 1)?) } else { None };
            let conv_in = Conv::load(be, &mut l, "decoder.conv_in", ch[last], lat, 3)?;
            let mid = Mid::load(be, &mut l, "decoder.mid_block", ch[last], &cfg)?;
            let mut up = Vec::new();
            let mut cin = ch[last];
            for (i, &c) in ch.iter().rev().enumerate() {
                let mut resnets = Vec::new();
                for j in 0..=cfg.layers_per_block {
                    resnets.push(Resnet::load(be, &mut l, &format!("decoder.up_blocks.{i}.resnets.{j}"), if j == 0 { cin } else { c }, c, g)?);
                }
                let resample =
                    if i < last { Some(Conv::load(be, &mut l, &format!("decoder.up_blocks.{i}.upsamplers.0.conv"), c, c, 3)?) } else { None };
                up.push(Level { resnets, resample });
                cin = c;
            }
            Some(Decoder {
                post_quant,
                conv_in,
                mid,
                up,
                norm_out: Norm::load(be, &mut l, "decoder.conv_norm_out", ch[0], g)?,
                conv_out: Conv::load(be, &mut l, "decoder.conv_out", cfg.out_channels, ch[0], 3)?,
            })
        } else {
            None
        };
        // A tensor of a loaded half that the config does not account for means the config
        // and the weights disagree (e.g. another layers_per_block): refuse, naming it.
        let prefixes: Vec<&str> = [(parts.encoder, ["encoder.", "quant_conv."]), (parts.decoder, ["decoder.", "post_quant_conv."])]
            .iter()
            .filter(|(on, _)| *on)
            .flat_map(|(_, p)| p.to_vec())
            .collect();
        if let Some((name, _)) = file.tensors.iter().find(|(n, _)| prefixes.iter().any(|p| n.starts_with(p)) && !l.used.contains(n)) {
            return Err(Error::Input(format!(
                "{}: tensor '{name}' is not part of the VAE its config describes (wrong config.json?)",
                file.path.display()
            )));
        }
        Ok(Vae { config: cfg, path: file.path.clone(), encoder, decoder })
    }

    /// Encoder: NHWC `x` `[n, H, W, in_channels]` (H, W multiples of [`VaeConfig::downscale`])
    /// → the posterior's moments NHWC `[n, h, w, 2·latent]` (mean ‖ logvar, unclamped).
    pub fn encode_moments(&self, be: &B, x: &B::Buf, s: Nhwc) -> Result<(B::Buf, Nhwc)> {
        let e = self.encoder.as_ref().ok_or_else(|| Error::Input("this VAE was loaded without its encoder".into()))?;
        self.check_input(s, self.config.in_channels, self.config.downscale())?;
        let (mut h, mut s) = e.conv_in.forward(be, x, s)?;
        for level in &e.down {
            for r in &level.resnets {
                (h, s) = r.forward(be, &h, s)?;
            }
            if let Some(d) = &level.resample {
                (h, s) = d.forward_stride2(be, &h, s)?;
            }
        }
        h = e.mid.forward(be, &h, s)?;
        let h = e.norm_out.forward(be, &h, s, true)?;
        let (mut h, mut s) = e.conv_out.forward(be, &h, s)?;
        if let Some(q) = &e.quant {
            (h, s) = q.forward(be, &h, s)?;
        }
        Ok((h, s))
    }

    /// Decoder: NHWC latents `z` `[n, h, w, latent]` → NHWC images `[n, 8h, 8w, out]`
    /// (diffusers' `decode(z).sample`, nominally in [−1, 1]).
    pub fn decode(&self, be: &B, z: &B::Buf, s: Nhwc) -> Result<(B::Buf, Nhwc)> {
        let d = self.decoder.as_ref().ok_or_else(|| Error::Input("this VAE was loaded without its decoder".into()))?;
        self.check_input(s, self.config.latent_channels, 1)?;
        let (mut h, mut s) = match &d.post_quant {
            Some(q) => q.forward(be, z, s)?,
            None => (be.copy(z)?, s),
        };
        (h, s) = d.conv_in.forward(be, &h, s)?;
        h = d.mid.forward(be, &h, s)?;
        for level in &d.up {
            for r in &level.resnets {
                (h, s) = r.forward(be, &h, s)?;
            }
            if let Some(u) = &level.resample {
                let su = Nhwc { h: 2 * s.h, w: 2 * s.w, ..s };
                let mut up = be.alloc_like(&h, su.numel())?;
                be.upsample2(&h, s, &mut up)?;
                (h, s) = u.forward(be, &up, su)?;
            }
        }
        let h = d.norm_out.forward(be, &h, s, true)?;
        d.conv_out.forward(be, &h, s)
    }

    fn check_input(&self, s: Nhwc, c: usize, multiple: usize) -> Result<()> {
        if s.c != c || s.n == 0 || s.h == 0 || s.w == 0 || s.h % multiple != 0 || s.w % multiple != 0 {
            return Err(Error::Input(format!(
                "{}: input of {}x{}x{} (batch {}); this VAE takes {c} channels and sides that are multiples of {multiple}",
                self.path.display(),
                s.h,
                s.w,
                s.c,
                s.n
            )));
        }
        Ok(())
    }
}

/// The official EDM2 latent normalization (`StabilityVAEEncoder`): final latents are
/// `raw·scale + bias` per channel with `scale = final_std / raw_std`,
/// `bias = final_mean − raw_mean·scale` (float32, as numpy computes them).
#[derive(Clone, Debug, PartialEq)]
pub struct LatentCodec {
    pub scale: Vec<f32>,
    pub bias: Vec<f32>,
}

impl Default for LatentCodec {
    fn default() -> Self {
        Self::new(&crate::data::LATENT_RAW_MEAN, &crate::data::LATENT_RAW_STD, 0.0, 0.5)
    }
}

impl LatentCodec {
    pub fn new(raw_mean: &[f32], raw_std: &[f32], final_mean: f32, final_std: f32) -> Self {
        let scale: Vec<f32> = raw_std.iter().map(|s| final_std / s).collect();
        let bias = raw_mean.iter().zip(&scale).map(|(m, s)| final_mean - m * s).collect();
        LatentCodec { scale, bias }
    }

    /// `encode_pixels`: uint8 NCHW images → raw latents NCHW `[n, 2·latent, h, w]`
    /// (posterior mean ‖ std).
    pub fn encode_pixels<B: VaeOps>(&self, be: &B, vae: &Vae<B>, pixels: &[u8], n: usize, h: usize, w: usize) -> Result<Vec<f32>> {
        let c = vae.config.in_channels;
        check_len(pixels.len(), n * c * h * w, "pixels")?;
        let x: Vec<f32> = pixels.iter().map(|&p| p as f32 / 255.0).collect();
        let x = be.upload(&nchw_to_nhwc(&x, n, c, h, w))?;
        let (m, s) = vae.encode_moments(be, &x, Nhwc { n, h, w, c })?;
        let mut m = be.download(&m)?;
        // Posterior: logvar clamped to [−30, 20], std = exp(logvar / 2) (diffusers'
        // DiagonalGaussianDistribution); the mean stays as is.
        let lat = s.c / 2;
        for row in m.chunks_exact_mut(s.c) {
            for v in &mut row[lat..] {
                *v = (0.5 * v.clamp(-30.0, 20.0)).exp();
            }
        }
        Ok(nhwc_to_nchw(&m, s.n, s.h, s.w, s.c))
    }

    /// `decode`: final latents NCHW `[n, latent, h, w]` → uint8 NCHW images, and the
    /// decoder's float output (NCHW) before clamping.
    pub fn decode<B: VaeOps>(&self, be: &B, vae: &Vae<B>, latents: &[f32], n: usize, h: usize, w: usize) -> Result<(Vec<u8>, Vec<f32>)> {
        let c = vae.config.latent_channels;
        check_len(latents.len(), n * c * h * w, "latents")?;
        if self.scale.len() != c {
            return Err(Error::Input(format!("the latent normalization has {} channels, the VAE {c}", self.scale.len())));
        }
        let mut z = latents.to_vec();
        for (i, v) in z.iter_mut().enumerate() {
            let ch = (i / (h * w)) % c;
            *v = (*v - self.bias[ch]) / self.scale[ch];
        }
        let z = be.upload(&nchw_to_nhwc(&z, n, c, h, w))?;
        let (y, s) = vae.decode(be, &z, Nhwc { n, h, w, c })?;
        let y = nhwc_to_nchw(&be.download(&y)?, s.n, s.h, s.w, s.c);
        // clamp(0, 1)·255 in f32, then truncation toward zero (torch's float → uint8).
        let px = y.iter().map(|&v| (v.clamp(0.0, 1.0) * 255.0) as u8).collect();
        Ok((px, y))
    }

    /// `encode_latents`: raw latents (mean ‖ std, NCHW) and standard normal noise `eps`
    /// (NCHW, like the mean) → final latents `(mean + eps·std)·scale + bias`.
    pub fn encode_latents(&self, raw: &[f32], eps: &[f32], n: usize, h: usize, w: usize) -> Result<Vec<f32>> {
        let c = self.scale.len();
        check_len(raw.len(), n * 2 * c * h * w, "raw latents")?;
        check_len(eps.len(), n * c * h * w, "noise")?;
        let hw = h * w;
        let mut out = vec![0.0f32; n * c * hw];
        for b in 0..n {
            for ch in 0..c {
                for p in 0..hw {
                    let mean = raw[(b * 2 * c + ch) * hw + p];
                    let std = raw[(b * 2 * c + c + ch) * hw + p];
                    let i = (b * c + ch) * hw + p;
                    out[i] = (mean + eps[i] * std) * self.scale[ch] + self.bias[ch];
                }
            }
        }
        Ok(out)
    }
}

fn check_len(got: usize, want: usize, what: &str) -> Result<()> {
    if got != want {
        return Err(Error::Input(format!("{what}: {got} values where the shape needs {want}")));
    }
    Ok(())
}

/// NCHW → NHWC.
pub fn nchw_to_nhwc(x: &[f32], n: usize, c: usize, h: usize, w: usize) -> Vec<f32> {
    let hw = h * w;
    let mut y = vec![0.0f32; x.len()];
    for b in 0..n {
        for ch in 0..c {
            for p in 0..hw {
                y[(b * hw + p) * c + ch] = x[(b * c + ch) * hw + p];
            }
        }
    }
    y
}

/// NHWC → NCHW.
pub fn nhwc_to_nchw(x: &[f32], n: usize, h: usize, w: usize, c: usize) -> Vec<f32> {
    let hw = h * w;
    let mut y = vec![0.0f32; x.len()];
    for b in 0..n {
        for p in 0..hw {
            for ch in 0..c {
                y[(b * c + ch) * hw + p] = x[(b * hw + p) * c + ch];
            }
        }
    }
    y
}

/// A VAE loaded onto a chosen device: the CPU backend, or the CUDA one (with the given
/// activation precision) in a build that has it. What the commands use.
pub enum DeviceVae {
    /// The CPU backend (fp32, or its bf16 products) and the VAE on it.
    Cpu(crate::backend::cpu::Cpu, Vae<crate::backend::cpu::Cpu>),
    #[cfg(any(feature = "cuda", feature = "cuda-sim"))]
    Cuda(Box<crate::backend::gpu::Gpu>, Vae<crate::backend::gpu::Gpu>),
}

impl DeviceVae {
    /// Loads `parts` of the VAE at `path` on `device` (`Auto` and `Cpu`: the CPU).
    pub fn load(path: &Path, parts: Parts, device: crate::backend::Device, precision: crate::backend::Precision) -> Result<Self> {
        use crate::backend::Device;
        match device {
            Device::Cpu | Device::Auto => {
                // bf16: the convolutions' products in bf16 where the CPU has AVX512-BF16.
                let cpu = crate::backend::cpu::Cpu::for_precision(precision).map_err(Error::Input)?;
                Ok(DeviceVae::Cpu(cpu, Vae::load(&cpu, path, parts)?))
            }
            #[cfg(any(feature = "cuda", feature = "cuda-sim"))]
            Device::Cuda => {
                let gpu = crate::backend::gpu::Gpu::open(0)?;
                gpu.set_precision(precision);
                let vae = Vae::load(&gpu, path, parts)?;
                Ok(DeviceVae::Cuda(Box::new(gpu), vae))
            }
            #[cfg(not(any(feature = "cuda", feature = "cuda-sim")))]
            Device::Cuda => Err(Error::DeviceUnavailable("this edm2 was built without the CUDA backend; use the CPU".into())),
        }
    }

    pub fn config(&self) -> &VaeConfig {
        match self {
            DeviceVae::Cpu(_, v) => &v.config,
            #[cfg(any(feature = "cuda", feature = "cuda-sim"))]
            DeviceVae::Cuda(_, v) => &v.config,
        }
    }

    /// [`LatentCodec::encode_pixels`] on this device.
    pub fn encode_pixels(&self, codec: &LatentCodec, pixels: &[u8], n: usize, h: usize, w: usize) -> Result<Vec<f32>> {
        match self {
            DeviceVae::Cpu(cpu, v) => codec.encode_pixels(cpu, v, pixels, n, h, w),
            #[cfg(any(feature = "cuda", feature = "cuda-sim"))]
            DeviceVae::Cuda(g, v) => codec.encode_pixels(g.as_ref(), v, pixels, n, h, w),
        }
    }

    /// [`LatentCodec::decode`] on this device.
    pub fn decode(&self, codec: &LatentCodec, latents: &[f32], n: usize, h: usize, w: usize) -> Result<(Vec<u8>, Vec<f32>)> {
        match self {
            DeviceVae::Cpu(cpu, v) => codec.decode(cpu, v, latents, n, h, w),
            #[cfg(any(feature = "cuda", feature = "cuda-sim"))]
            DeviceVae::Cuda(g, v) => codec.decode(g.as_ref(), v, latents, n, h, w),
        }
    }

    /// Whether it runs on the CPU (host memory bounds the batch there).
    pub fn on_cpu(&self) -> bool {
        matches!(self, DeviceVae::Cpu(..))
    }
}
