//! Network configuration: the official `Precond` keyword arguments (DESIGN.md §1), the
//! paper's presets (DESIGN.md §6) and CPU-sized presets.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};

/// The `Precond(**kwargs)` of the official code, with the official names and defaults.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    pub img_resolution: usize,
    pub img_channels: usize,
    pub label_dim: usize,
    #[serde(default = "d_model_channels")]
    pub model_channels: usize,
    #[serde(default = "d_channel_mult")]
    pub channel_mult: Vec<usize>,
    #[serde(default)]
    pub channel_mult_noise: Option<usize>,
    #[serde(default)]
    pub channel_mult_emb: Option<usize>,
    #[serde(default = "d_num_blocks")]
    pub num_blocks: usize,
    #[serde(default = "d_attn_resolutions")]
    pub attn_resolutions: Vec<usize>,
    #[serde(default = "d_half")]
    pub label_balance: f32,
    #[serde(default = "d_half")]
    pub concat_balance: f32,
    #[serde(default = "d_channels_per_head")]
    pub channels_per_head: usize,
    #[serde(default)]
    pub dropout: f32,
    #[serde(default = "d_balance")]
    pub res_balance: f32,
    #[serde(default = "d_balance")]
    pub attn_balance: f32,
    /// `null` disables clipping, as in the official code.
    #[serde(default = "d_clip_act")]
    pub clip_act: Option<f32>,
    #[serde(default = "d_half")]
    pub sigma_data: f32,
    #[serde(default = "d_logvar_channels")]
    pub logvar_channels: usize,
    #[serde(default = "d_true")]
    pub use_fp16: bool,
    /// Only the official default `[1, 1]` (box filter) is supported.
    #[serde(default = "d_resample_filter")]
    pub resample_filter: Vec<usize>,
}

fn d_model_channels() -> usize {
    192
}
fn d_channel_mult() -> Vec<usize> {
    vec![1, 2, 3, 4]
}
fn d_num_blocks() -> usize {
    3
}
fn d_attn_resolutions() -> Vec<usize> {
    vec![16, 8]
}
fn d_half() -> f32 {
    0.5
}
fn d_channels_per_head() -> usize {
    64
}
fn d_balance() -> f32 {
    0.3
}
fn d_clip_act() -> Option<f32> {
    Some(256.0)
}
fn d_logvar_channels() -> usize {
    128
}
fn d_true() -> bool {
    true
}
fn d_resample_filter() -> Vec<usize> {
    vec![1, 1]
}

/// The training hyper-parameters a preset carries besides the network (DESIGN.md §6).
#[derive(Clone, Debug, PartialEq)]
pub struct TrainPreset {
    pub batch: usize,
    pub lr: f64,
    pub decay_batches: f64,
    pub p_mean: f64,
    pub p_std: f64,
    pub duration_img: u64,
    /// Linear learning-rate ramp-up, in millions of images (decimal, as the official
    /// `rampup_Mimg`).
    pub rampup_mimg: f64,
    /// Status, snapshot and checkpoint intervals, in images.
    pub status_img: u64,
    pub snapshot_img: u64,
    pub checkpoint_img: u64,
}

pub struct Preset {
    pub name: &'static str,
    pub net: NetConfig,
    pub train: TrainPreset,
}

const MI: u64 = 1 << 20;

impl NetConfig {
    /// A config with the official defaults for everything but the image geometry.
    pub fn with_defaults(img_resolution: usize, img_channels: usize, label_dim: usize) -> Self {
        NetConfig {
            img_resolution,
            img_channels,
            label_dim,
            model_channels: d_model_channels(),
            channel_mult: d_channel_mult(),
            channel_mult_noise: None,
            channel_mult_emb: None,
            num_blocks: d_num_blocks(),
            attn_resolutions: d_attn_resolutions(),
            label_balance: 0.5,
            concat_balance: 0.5,
            channels_per_head: 64,
            dropout: 0.0,
            res_balance: 0.3,
            attn_balance: 0.3,
            clip_act: Some(256.0),
            sigma_data: 0.5,
            logvar_channels: 128,
            use_fp16: true,
            resample_filter: d_resample_filter(),
        }
    }

    /// Parses a config from JSON: either the flat Precond kwargs or an object with a
    /// `kwargs` field (the golden `*.config.json` form and our `edm2.config` metadata).
    pub fn from_json_str(s: &str) -> Result<Self> {
        let v: serde_json::Value = serde_json::from_str(s).map_err(|e| Error::Config(format!("not valid JSON: {e}")))?;
        let kw = match v.get("kwargs") {
            Some(k) => k.clone(),
            None => v,
        };
        let cfg: NetConfig = serde_json::from_value(kw).map_err(|e| Error::Config(e.to_string()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// JSON of the flat kwargs (what `edm2.config` stores).
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("config serializes")
    }

    /// A preset name or a path to a JSON file.
    pub fn resolve(name_or_path: &str) -> Result<Self> {
        if let Some(p) = preset(name_or_path) {
            return Ok(p.net);
        }
        let path = std::path::Path::new(name_or_path);
        if path.exists() {
            let s = std::fs::read_to_string(path).map_err(|e| Error::Io { path: path.into(), err: e })?;
            return Self::from_json_str(&s).map_err(|e| match e {
                Error::Config(m) => Error::Config(format!("{}: {m}", path.display())),
                e => e,
            });
        }
        Err(Error::Config(format!(
            "'{name_or_path}' is neither a preset nor an existing JSON file; presets: {}",
            preset_names().join(", ")
        )))
    }

    pub fn cblock(&self) -> Vec<usize> {
        self.channel_mult.iter().map(|m| m.saturating_mul(self.model_channels)).collect()
    }
    pub fn cnoise(&self) -> usize {
        self.channel_mult_noise.map(|m| m.saturating_mul(self.model_channels)).unwrap_or(self.cblock()[0])
    }
    pub fn cemb(&self) -> usize {
        self.channel_mult_emb
            .map(|m| m.saturating_mul(self.model_channels))
            .unwrap_or_else(|| *self.cblock().iter().max().unwrap())
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
        if self.img_resolution == 0 || self.img_channels == 0 {
            return bad("img_resolution and img_channels must be positive".into());
        }
        if self.channel_mult.is_empty() || self.channel_mult.contains(&0) {
            return bad("channel_mult must be a non-empty list of positive integers".into());
        }
        if self.model_channels == 0 || self.channels_per_head == 0 || self.logvar_channels == 0 {
            return bad("model_channels, channels_per_head and logvar_channels must be positive".into());
        }
        // Bounds far past any EDM2 network (XXL: 448 channels x 4, 512 px), so that every
        // size computed from a config fits in 64 bits and a typo is an error here, not an
        // allocation of exabytes.
        let widest = self.cblock().into_iter().chain([self.cnoise(), self.cemb(), self.logvar_channels]).max().unwrap_or(0);
        let limits = [
            ("img_resolution", self.img_resolution, 8192),
            ("img_channels", self.img_channels, 64),
            ("label_dim", self.label_dim, 100_000),
            ("the widest layer (model_channels x channel_mult)", widest, 1 << 16),
            ("num_blocks", self.num_blocks, 64),
            ("the number of levels (channel_mult)", self.channel_mult.len(), 12),
        ];
        for (what, v, max) in limits {
            if v > max {
                return bad(format!("{what} is {v}; at most {max} is supported"));
            }
        }
        let levels = self.channel_mult.len();
        if self.img_resolution % (1 << (levels - 1)) != 0 {
            return bad(format!(
                "img_resolution {} is not divisible by 2^{} (channel_mult has {levels} levels)",
                self.img_resolution,
                levels - 1
            ));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return bad(format!("dropout {} must be in [0, 1)", self.dropout));
        }
        if self.resample_filter != [1, 1] {
            return bad(format!("resample_filter {:?} is not supported (only [1, 1])", self.resample_filter));
        }
        if self.sigma_data <= 0.0 {
            return bad("sigma_data must be positive".into());
        }
        Ok(())
    }
}

fn paper(name: &'static str, img512: bool, ch: usize, lr: f64, dropout: f32, dur_mi: u64) -> Preset {
    let mut net = if img512 { NetConfig::with_defaults(64, 4, 1000) } else { NetConfig::with_defaults(64, 3, 1000) };
    net.model_channels = ch;
    net.dropout = dropout;
    let (decay, p_mean, p_std) = if img512 { (70000.0, -0.4, 1.0) } else { (35000.0, -0.8, 1.6) };
    Preset {
        name,
        net,
        train: TrainPreset {
            batch: 2048,
            lr,
            decay_batches: decay,
            p_mean,
            p_std,
            duration_img: dur_mi * MI,
            rampup_mimg: 10.0,
            status_img: 128 << 10,
            snapshot_img: 8 * MI,
            checkpoint_img: 128 * MI,
        },
    }
}

fn cpu(name: &'static str, res: usize, img_ch: usize, ch: usize, mult: &[usize], blocks: usize, attn: &[usize]) -> Preset {
    let mut net = NetConfig::with_defaults(res, img_ch, 10);
    net.model_channels = ch;
    net.channel_mult = mult.to_vec();
    net.num_blocks = blocks;
    net.attn_resolutions = attn.to_vec();
    net.use_fp16 = false;
    Preset {
        name,
        net,
        train: TrainPreset {
            batch: 32,
            lr: 0.01,
            decay_batches: 4000.0,
            p_mean: -0.8,
            p_std: 1.6,
            duration_img: 8 * MI,
            rampup_mimg: 0.05,
            status_img: 4 << 10,
            snapshot_img: 64 << 10,
            checkpoint_img: 256 << 10,
        },
    }
}

/// The default training preset: a ~1.4 M-parameter net for the built-in Fashion-MNIST
/// (32x32x1, 10 classes) sized for tens of minutes on two CPU cores — short ramp-up and
/// decay, a status line every 4Ki images, snapshots every 32Ki, checkpoints every 64Ki.
fn cpu_fmnist() -> Preset {
    let mut p = cpu("cpu-fmnist", 32, 1, 32, &[1, 2, 2], 1, &[8]);
    p.train = TrainPreset {
        batch: 64,
        lr: 0.01,
        decay_batches: 2000.0,
        p_mean: -0.8,
        p_std: 1.6,
        duration_img: 2 * MI,
        rampup_mimg: 0.01,
        status_img: 4 << 10,
        snapshot_img: 32 << 10,
        checkpoint_img: 64 << 10,
    };
    p
}

/// All presets: the paper's (DESIGN.md §6) and CPU-sized ones.
pub fn presets() -> Vec<Preset> {
    vec![
        paper("edm2-img512-xxs", true, 64, 0.0170, 0.0, 2048),
        paper("edm2-img512-xs", true, 128, 0.0120, 0.0, 2048),
        paper("edm2-img512-s", true, 192, 0.0100, 0.0, 2048),
        paper("edm2-img512-m", true, 256, 0.0090, 0.10, 2048),
        paper("edm2-img512-l", true, 320, 0.0080, 0.10, 1792),
        paper("edm2-img512-xl", true, 384, 0.0070, 0.10, 1280),
        paper("edm2-img512-xxl", true, 448, 0.0065, 0.10, 896),
        paper("edm2-img64-xs", false, 128, 0.0120, 0.0, 1024),
        paper("edm2-img64-s", false, 192, 0.0100, 0.0, 1024),
        paper("edm2-img64-m", false, 256, 0.0090, 0.10, 2048),
        paper("edm2-img64-l", false, 320, 0.0080, 0.10, 1024),
        paper("edm2-img64-xl", false, 384, 0.0070, 0.10, 640),
        // CPU-sized: the shapes of the torch CPU baseline (golden/torch_cpu_baseline.json).
        cpu("cpu-s32", 32, 3, 64, &[1, 2, 2], 2, &[16, 8]),
        cpu("cpu-xs16", 16, 3, 32, &[1, 2], 1, &[8]),
        cpu_fmnist(),
    ]
}

pub fn preset(name: &str) -> Option<Preset> {
    presets().into_iter().find(|p| p.name == name)
}

pub fn preset_names() -> Vec<&'static str> {
    presets().iter().map(|p| p.name).collect()
}
