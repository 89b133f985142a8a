//! Compute backends. The CPU backend is always built; the CUDA backend is behind the
//! `cuda` cargo feature.

pub mod cpu;
#[cfg(any(feature = "cuda", feature = "cuda-sim"))]
pub mod gpu;

/// The shape `[n, h, w, c]` of an NHWC activation.
#[derive(Clone, Copy, Debug)]
pub struct Nhwc {
    pub n: usize,
    pub h: usize,
    pub w: usize,
    pub c: usize,
}

impl Nhwc {
    pub fn numel(&self) -> usize {
        self.n * self.h * self.w * self.c
    }
    pub fn pixels(&self) -> usize {
        self.n * self.h * self.w
    }
}

/// Geometry of an MP-Conv / MP-Linear: `k` = 3, 1 or 0 (linear).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvGeom {
    pub out_ch: usize,
    pub in_ch: usize,
    pub k: usize,
}

impl ConvGeom {
    pub fn taps(&self) -> usize {
        if self.k == 3 {
            9
        } else {
            1
        }
    }
    pub fn fan_in(&self) -> usize {
        self.in_ch * self.taps()
    }
    pub fn numel(&self) -> usize {
        self.out_ch * self.fan_in()
    }
    pub fn validate(&self, kernel: &str) -> crate::error::Result<()> {
        if matches!(self.k, 0 | 1 | 3) && self.out_ch > 0 && self.in_ch > 0 {
            Ok(())
        } else {
            Err(crate::Error::Input(format!("{kernel}: unsupported conv {self:?}")))
        }
    }
}


/// The operations the one network description (`nn::layers`, `nn::unet`) runs on: one
/// implementation per backend, each a thin layer over that backend's kernels. The CPU
/// backend (`Cpu`) is the reference; the CUDA backend (`gpu::Gpu`) runs the same
/// sequence of operations on device buffers, so a network forward/backward on either is
/// the same code.
///
/// Buffers are flat f32 arrays (`Buf`); an activation is a `Tensor<Buf>` (shape + buffer).
/// Unless stated, an op overwrites its output and the output was allocated by the caller
/// with [`Backend::alloc`] (contents unspecified) or [`Backend::zeros`].
pub trait Backend {
    /// A flat f32 buffer.
    type Buf;
    /// A full parameter set (and, with the same type, gradients).
    type Params;
    /// An effective MP weight (paper Eq. 47) in the layout this backend's conv reads.
    type Eff;
    /// What the attention backward needs from the forward.
    type Attn;
    /// Where a clip clipped.
    type Mask;

    /// A buffer of `n` values that the next op overwrites (contents unspecified).
    fn alloc(&self, n: usize) -> crate::error::Result<Self::Buf>;
    fn zeros(&self, n: usize) -> crate::error::Result<Self::Buf>;
    fn upload(&self, host: &[f32]) -> crate::error::Result<Self::Buf>;
    fn download(&self, b: &Self::Buf) -> crate::error::Result<Vec<f32>>;
    /// A copy of `b` (same storage type).
    fn copy(&self, b: &Self::Buf) -> crate::error::Result<Self::Buf>;
    /// A buffer of `n` values for the network output D: full precision on every backend (the
    /// official mixed precision also keeps D, like the input x, in fp32).
    fn alloc_output(&self, n: usize) -> crate::error::Result<Self::Buf> {
        self.alloc(n)
    }
    /// A buffer of `n` values of `like`'s storage type (contents unspecified). With bf16
    /// activations the small per-image tensors of the embedding, the modulation and the
    /// logvar head stay fp32, as in the official mixed precision: a layer's output takes
    /// its input's storage type.
    fn alloc_like(&self, _like: &Self::Buf, n: usize) -> crate::error::Result<Self::Buf> {
        self.alloc(n)
    }
    /// `n` zeros of `like`'s storage type.
    fn zeros_like(&self, _like: &Self::Buf, n: usize) -> crate::error::Result<Self::Buf> {
        self.zeros(n)
    }
    /// `b` converted to `like`'s storage type (a copy when they match).
    fn convert_like(&self, b: &Self::Buf, _like: &Self::Buf) -> crate::error::Result<Self::Buf> {
        self.copy(b)
    }
    /// Waits until all queued work is done (timing; a no-op on synchronous backends).
    fn synchronize(&self) -> crate::error::Result<()> {
        Ok(())
    }

    /// Zero gradients shaped like `p`.
    fn zero_grads(&self, p: &Self::Params) -> crate::error::Result<Self::Params>;
    /// Forced weight normalization of parameter `id` (rows of `row_len`), in place.
    fn force_normalize(&self, p: &mut Self::Params, id: crate::nn::params::ParamId, row_len: usize) -> crate::error::Result<()>;
    /// [`Backend::force_normalize`] of every `(id, row_len)` of `weights` (the CUDA backend:
    /// one launch for all of them).
    fn force_normalize_all(&self, p: &mut Self::Params, weights: &[(crate::nn::params::ParamId, usize)]) -> crate::error::Result<()> {
        for &(id, row_len) in weights {
            self.force_normalize(p, id, row_len)?;
        }
        Ok(())
    }

    /// `normalize(W[id])·gain/sqrt(fan_in)`, with the gain the scalar parameter `gain` (read
    /// where the parameters live: on the CUDA backend, on the device) or 1.
    fn effective(
        &self,
        p: &Self::Params,
        id: crate::nn::params::ParamId,
        geom: ConvGeom,
        gain: Option<crate::nn::params::ParamId>,
    ) -> crate::error::Result<Self::Eff>;
    /// Whether a forward pass should make all its effective weights in one
    /// [`Backend::effective_all`] (the CUDA backend: one launch) rather than each where it
    /// is used (the default: fewer live at once).
    fn batches_effective(&self) -> bool {
        false
    }
    /// [`Backend::effective`] of every `(weight, geometry, gain)` of `jobs`, in order;
    /// `backward`: whether the pass will run a backward (what only a backward reads may
    /// be left out otherwise).
    fn effective_all(
        &self,
        p: &Self::Params,
        jobs: &[(crate::nn::params::ParamId, ConvGeom, Option<crate::nn::params::ParamId>)],
        _backward: bool,
    ) -> crate::error::Result<Vec<Self::Eff>> {
        jobs.iter().map(|&(id, geom, gain)| self.effective(p, id, geom, gain)).collect()
    }
    /// `y = conv(x)` ('same', stride 1; linear layers are 1x1 images).
    fn conv_forward(&self, eff: &Self::Eff, x: &Self::Buf, s: Nhwc, y: &mut Self::Buf) -> crate::error::Result<()>;
    /// Backward of [`Backend::conv_forward`] and of the effective weight: writes `dx` if
    /// given, adds the stored weight's gradient into `g[id]` and, for a layer whose gain is
    /// the scalar parameter `gain`, the gain's gradient into `g[gain]` (on the CUDA backend
    /// without a round trip to the host).
    #[allow(clippy::too_many_arguments)]
    fn conv_backward(
        &self,
        p: &Self::Params,
        id: crate::nn::params::ParamId,
        eff: &Self::Eff,
        x: &Self::Buf,
        s: Nhwc,
        dy: &Self::Buf,
        dx: Option<&mut Self::Buf>,
        gain: Option<crate::nn::params::ParamId>,
        g: &mut Self::Params,
    ) -> crate::error::Result<()>;
    /// `y_b = linear_b(x)` for every `(effective weight, geometry)` of `layers`, all linear
    /// layers of the same input `x` `[n, in]` (the blocks' `emb_linear`): the CUDA backend
    /// runs them in one launch; the default one [`Backend::conv_forward`] each.
    fn linear_group_forward(&self, layers: &[(&Self::Eff, ConvGeom)], x: &Self::Buf, n: usize) -> crate::error::Result<Vec<Self::Buf>> {
        layers
            .iter()
            .map(|&(eff, g)| {
                let mut y = self.alloc_like(x, n * g.out_ch)?;
                self.conv_forward(eff, x, Nhwc { n, h: 1, w: 1, c: g.in_ch }, &mut y)?;
                Ok(y)
            })
            .collect()
    }
    /// The backward of [`Backend::linear_group_forward`]: for every `(weight, geometry,
    /// effective weight, dy_b, gain)` of `layers`, in order, the weight's (and the gain's)
    /// gradient into `g` and `dx += dy_b·W_b` (added in that order: the bits of one
    /// [`Backend::conv_backward_acc`] per layer, which is the default; the CUDA backend
    /// launches twice for all of them).
    #[allow(clippy::type_complexity)]
    fn linear_group_backward(
        &self,
        p: &Self::Params,
        layers: &[(crate::nn::params::ParamId, ConvGeom, &Self::Eff, &Self::Buf, Option<crate::nn::params::ParamId>)],
        x: &Self::Buf,
        n: usize,
        dx: &mut Self::Buf,
        g: &mut Self::Params,
    ) -> crate::error::Result<()> {
        for &(id, geom, eff, dy, gain) in layers {
            self.conv_backward_acc(p, id, eff, x, Nhwc { n, h: 1, w: 1, c: geom.in_ch }, dy, dx, gain, g)?;
        }
        Ok(())
    }
    /// [`Backend::conv_backward`] adding the data gradient into `dx` instead of overwriting
    /// it (gradients joining: the embedding's, summed over the blocks). The default makes it
    /// into a temporary and adds; the CUDA backend adds in its kernel where it can.
    #[allow(clippy::too_many_arguments)]
    fn conv_backward_acc(
        &self,
        p: &Self::Params,
        id: crate::nn::params::ParamId,
        eff: &Self::Eff,
        x: &Self::Buf,
        s: Nhwc,
        dy: &Self::Buf,
        dx: &mut Self::Buf,
        gain: Option<crate::nn::params::ParamId>,
        g: &mut Self::Params,
    ) -> crate::error::Result<()> {
        let mut t = self.alloc_like(dx, s.numel())?;
        self.conv_backward(p, id, eff, x, s, dy, Some(&mut t), gain, g)?;
        self.add(dx, &t)
    }
    /// From now on [`Backend::conv_backward`] may leave the effective-weight part of each
    /// weight's gradient in `g` (and its gain's) to [`Backend::finish_weight_grads`], which
    /// must run before `g` is read: a backend that batches them (the CUDA backend: one
    /// launch for all layers of a pass instead of one or two per layer). The default makes
    /// each at once.
    fn defer_weight_grads(&self, _g: &mut Self::Params) {}
    /// Completes the gradients [`Backend::defer_weight_grads`] left waiting and stops
    /// deferring.
    fn finish_weight_grads(&self, _p: &Self::Params, _g: &mut Self::Params) -> crate::error::Result<()> {
        Ok(())
    }

    fn mp_silu(&self, x: &Self::Buf, y: &mut Self::Buf) -> crate::error::Result<()>;
    fn mp_silu_backward(&self, x: &Self::Buf, dy: &Self::Buf, dx: &mut Self::Buf) -> crate::error::Result<()>;
    /// `dx += dy·mp_silu'(x)`.
    fn mp_silu_backward_acc(&self, x: &Self::Buf, dy: &Self::Buf, dx: &mut Self::Buf) -> crate::error::Result<()>;
    /// `a ← wa·a + wb·b`.
    fn axpby(&self, a: &mut Self::Buf, b: &Self::Buf, wa: f32, wb: f32) -> crate::error::Result<()>;
    /// `a ← wa·a + wb·b`, then clamped to ±limit where a limit is given, with the mask of
    /// [`Backend::clip`]: a block's last mp_sum and its clip (one pass on a device).
    fn axpby_clip(&self, a: &mut Self::Buf, b: &Self::Buf, wa: f32, wb: f32, limit: Option<f32>) -> crate::error::Result<Option<Self::Mask>> {
        self.axpby(a, b, wa, wb)?;
        match limit {
            Some(l) => self.clip(a, l),
            None => Ok(None),
        }
    }
    /// `a ← a + b`.
    fn add(&self, a: &mut Self::Buf, b: &Self::Buf) -> crate::error::Result<()> {
        self.axpby(a, b, 1.0, 1.0)
    }
    fn scale(&self, a: &mut Self::Buf, k: f32) -> crate::error::Result<()>;
    /// `k·a` as a new buffer.
    fn scaled(&self, a: &Self::Buf, k: f32) -> crate::error::Result<Self::Buf>;
    /// `kb·a` as a new buffer, and `a ← ka·a`: the two branches of an mp_sum's backward
    /// (the bits of [`Backend::scaled`] then [`Backend::scale`]; a device does it in one pass).
    fn split_scaled(&self, a: &mut Self::Buf, ka: f32, kb: f32) -> crate::error::Result<Self::Buf> {
        let out = self.scaled(a, kb)?;
        self.scale(a, ka)?;
        Ok(out)
    }
    /// [`Backend::split_scaled`] of `a` zeroed first where `mask` is set: the backward of
    /// [`Backend::axpby_clip`] (the clip's, then the mp_sum's; one pass on a device).
    fn split_scaled_masked(&self, a: &mut Self::Buf, ka: f32, kb: f32, mask: Option<&Self::Mask>) -> crate::error::Result<Self::Buf> {
        if let Some(m) = mask {
            self.clip_backward(a, m)?;
        }
        self.split_scaled(a, ka, kb)
    }
    /// `a ← a + v` for every element.
    fn add_scalar(&self, a: &mut Self::Buf, v: f32) -> crate::error::Result<()>;
    /// Pixel norm: `normalize` over rows of `k`.
    fn normalize_rows(&self, x: &Self::Buf, k: usize, y: &mut Self::Buf) -> crate::error::Result<()>;
    fn normalize_rows_backward(&self, x: &Self::Buf, k: usize, dy: &Self::Buf, dx: &mut Self::Buf) -> crate::error::Result<()>;
    /// [`Backend::normalize_rows`] into `y` and `a = mp_silu(y)`: an encoder block's pixel
    /// norm and its residual branch's first op (one pass on a device).
    fn normalize_rows_silu(&self, x: &Self::Buf, k: usize, y: &mut Self::Buf, a: &mut Self::Buf) -> crate::error::Result<()> {
        self.normalize_rows(x, k, y)?;
        self.mp_silu(y, a)
    }
    /// The backward of an encoder block's pixel norm whose output `xm` also fed mp_silu:
    /// `dy += da0·mp_silu'(xm)` ([`Backend::mp_silu_backward_acc`]), then
    /// [`Backend::normalize_rows_backward`] of `dy` into `dx` (one pass on a device, which
    /// leaves `dy` as it was: it is not read afterwards).
    #[allow(clippy::too_many_arguments)]
    fn normalize_rows_backward_silu(
        &self,
        x: &Self::Buf,
        k: usize,
        dy: &mut Self::Buf,
        xm: &Self::Buf,
        da0: &Self::Buf,
        dx: &mut Self::Buf,
    ) -> crate::error::Result<()> {
        self.mp_silu_backward_acc(xm, da0, dy)?;
        self.normalize_rows_backward(x, k, dy, dx)
    }
    /// 2x2 average pooling of `x` (shape `s`).
    fn downsample2(&self, x: &Self::Buf, s: Nhwc, y: &mut Self::Buf) -> crate::error::Result<()>;
    fn downsample2_backward(&self, dy: &Self::Buf, s: Nhwc, dx: &mut Self::Buf) -> crate::error::Result<()>;
    /// Nearest 2x upsampling of `x` (shape `s`).
    fn upsample2(&self, x: &Self::Buf, s: Nhwc, y: &mut Self::Buf) -> crate::error::Result<()>;
    fn upsample2_backward(&self, dy: &Self::Buf, s: Nhwc, dx: &mut Self::Buf) -> crate::error::Result<()>;
    /// `y[n, p, c] = mp_silu(h[n, p, c]·(s[n, c] + 1))`: the block's modulation with
    /// `s` = emb_linear's output (the official `c = emb_linear(emb) + 1`, the + 1 done here).
    fn modulate_silu(&self, h: &Self::Buf, s: &Self::Buf, c: usize, pixels: usize, y: &mut Self::Buf) -> crate::error::Result<()>;
    #[allow(clippy::too_many_arguments)]
    fn modulate_silu_backward(
        &self,
        h: &Self::Buf,
        s: &Self::Buf,
        dy: &Self::Buf,
        c: usize,
        pixels: usize,
        dh: &mut Self::Buf,
        ds: &mut Self::Buf,
    ) -> crate::error::Result<()>;
    /// Inverted dropout in place, mask a function of (seed, element index).
    fn dropout(&self, x: &mut Self::Buf, p: f32, seed: u64) -> crate::error::Result<()>;
    /// Clamp to ±limit in place; the mask (None: nothing was clipped, if the backend knows).
    fn clip(&self, x: &mut Self::Buf, limit: f32) -> crate::error::Result<Option<Self::Mask>>;
    fn clip_backward(&self, dy: &mut Self::Buf, mask: &Self::Mask) -> crate::error::Result<()>;
    /// Cosine attention `qkv` `[n, p, 3c]` → `y` `[n, p, c]`.
    #[allow(clippy::too_many_arguments)]
    fn attention_forward(&self, qkv: &Self::Buf, n: usize, p: usize, c: usize, heads: usize, y: &mut Self::Buf) -> crate::error::Result<Self::Attn>;
    /// Its gradient into `dqkv` (overwritten); `y` is the forward's output.
    #[allow(clippy::too_many_arguments)]
    fn attention_backward(
        &self,
        qkv: &Self::Buf,
        cache: &Self::Attn,
        y: &Self::Buf,
        dy: &Self::Buf,
        n: usize,
        p: usize,
        c: usize,
        heads: usize,
        dqkv: &mut Self::Buf,
    ) -> crate::error::Result<()>;
    /// MP-cat over channels of `[pixels, na]` and `[pixels, nb]`.
    #[allow(clippy::too_many_arguments)]
    fn mp_cat(&self, a: &Self::Buf, na: usize, b: &Self::Buf, nb: usize, t: f32, out: &mut Self::Buf) -> crate::error::Result<()>;
    #[allow(clippy::too_many_arguments)]
    fn mp_cat_backward(&self, dout: &Self::Buf, na: usize, nb: usize, t: f32, da: &mut Self::Buf, db: &mut Self::Buf) -> crate::error::Result<()>;
    /// MP-Fourier features of the host values `x` with the buffers `freqs`, `phases`.
    fn mp_fourier(
        &self,
        x: &[f32],
        p: &Self::Params,
        freqs: crate::nn::params::ParamId,
        phases: crate::nn::params::ParamId,
    ) -> crate::error::Result<Self::Buf>;
    /// `x[b, ...] *= k[b]` (one factor per image of equal size).
    fn scale_images(&self, x: &mut Self::Buf, k: &[f32]) -> crate::error::Result<()>;
    /// The network input `[c_in·x, 1]` along channels (NHWC, `ch` image channels).
    fn precond_input(&self, x: &Self::Buf, c_in: &[f32], ch: usize, out: &mut Self::Buf) -> crate::error::Result<()>;
    /// `D = c_skip·x + c_out·F` per image.
    fn precond_output(&self, x: &Self::Buf, f: &Self::Buf, c_skip: &[f32], c_out: &[f32], d: &mut Self::Buf) -> crate::error::Result<()>;
}

/// The forward operations of ordinary (not magnitude-preserving) convolutional networks
/// that the EDM2 network does not use: the Stability VAE (`nn::vae`) runs on them plus
/// [`Backend`]'s convolutions, upsampling and sums. Forward only (the VAE is not trained
/// here). Per-channel vectors (biases, GroupNorm scale and shift) are fp32 in every
/// precision ([`VaeOps::Chan`]).
pub trait VaeOps: Backend {
    /// A per-channel fp32 vector (bias, GroupNorm scale or shift) on this backend.
    type Chan;
    fn upload_chan(&self, v: &[f32]) -> crate::error::Result<Self::Chan>;
    /// An ordinary conv / linear weight (`[O, I, k, k]` or `[O, I]`, values as given) in
    /// the layout [`Backend::conv_forward`] reads.
    fn plain_weight(&self, w: &[f32], geom: ConvGeom) -> crate::error::Result<Self::Eff>;
    /// `y[p, c] += bias[c]` over rows of `c` channels.
    fn add_channel_bias(&self, y: &mut Self::Buf, bias: &Self::Chan, c: usize) -> crate::error::Result<()>;
    /// GroupNorm of `x` (shape `s`): per image and group of `s.c / groups` consecutive
    /// channels, `(x − mean)/sqrt(var + eps)·gamma[c] + beta[c]` (biased variance over the
    /// group's channels and pixels, as torch), then SiLU `v·sigmoid(v)` when `silu`.
    #[allow(clippy::too_many_arguments)]
    fn group_norm(
        &self,
        x: &Self::Buf,
        s: Nhwc,
        groups: usize,
        eps: f32,
        gamma: &Self::Chan,
        beta: &Self::Chan,
        silu: bool,
        y: &mut Self::Buf,
    ) -> crate::error::Result<()>;
    /// `y[n, i, j, c] = x[n, 2i+1, 2j+1, c]`, `y` of shape `[n, h/2, w/2, c]`: a 'same'
    /// 3x3 convolution sampled this way is the stride-2 convolution with one zero row and
    /// column padded after the image (diffusers' `Downsample2D`, padding (0, 1, 0, 1)).
    fn subsample2_odd(&self, x: &Self::Buf, s: Nhwc, y: &mut Self::Buf) -> crate::error::Result<()>;
    /// Single-head dot-product attention: `qkv` `[n, p, 3c]` (q ‖ k ‖ v per pixel) →
    /// `y[n, i, :] = Σ_j softmax_j(q_i·k_j / sqrt(c)) v_j`, `y` `[n, p, c]`.
    fn dot_attention(&self, qkv: &Self::Buf, n: usize, p: usize, c: usize, y: &mut Self::Buf) -> crate::error::Result<()>;
}

/// Storage and arithmetic of the activations on the CUDA backend (the CPU backend is
/// always fp32).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Precision {
    /// Everything fp32: the mode for exact comparison with the CPU backend.
    #[default]
    Fp32,
    /// Activations and their gradients stored as bf16 (half the memory and traffic);
    /// products with bf16 operands and fp32 accumulation (tensor-core arithmetic);
    /// elementwise arithmetic in fp32. fp32 master weights, effective weights, weight
    /// gradients and optimizer state; the network input x and output D stay fp32.
    Bf16,
}

impl std::str::FromStr for Precision {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "fp32" => Ok(Precision::Fp32),
            "bf16" => Ok(Precision::Bf16),
            _ => Err(format!("unknown precision '{s}' (expected fp32 or bf16)")),
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Precision::Fp32 => "fp32",
            Precision::Bf16 => "bf16",
        })
    }
}

/// Which device a command runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Device {
    #[default]
    Cpu,
    Cuda,
    /// CUDA when this build has the CUDA backend and a GPU is present, else the CPU.
    Auto,
}

impl std::str::FromStr for Device {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda),
            "auto" => Ok(Device::Auto),
            _ => Err(format!("unknown device '{s}' (expected cpu, cuda or auto)")),
        }
    }
}

/// Resolves `device` for a command and says on stderr which device was chosen. `cuda`
/// without a usable GPU (or in a build without the backend) is an error naming the
/// reason; `auto` falls back to the CPU. With the `cuda-sim` feature, `cuda` is the
/// simulated device (for tests; `auto` never picks it).
pub fn resolve_device(device: Device) -> Result<Device, crate::Error> {
    resolve_device_saying(device, true)
}

/// [`resolve_device`], saying which device was chosen only when `say` (the ranks other
/// than 0 of a data-parallel run stay quiet).
pub fn resolve_device_saying(device: Device, say: bool) -> Result<Device, crate::Error> {
    let (chosen, name) = match device {
        Device::Cpu => (Device::Cpu, None),
        Device::Cuda => (Device::Cuda, Some(cuda_device_name()?)),
        Device::Auto => match cuda_device_name() {
            Ok(name) if cfg!(feature = "cuda") => (Device::Cuda, Some(name)),
            _ => (Device::Cpu, None),
        },
    };
    if device != Device::Cpu && say {
        match name {
            Some(n) => eprintln!("device: cuda ({n})"),
            None => eprintln!("device: cpu ({} threads)", rayon::current_num_threads()),
        }
    }
    Ok(chosen)
}

/// The name of this process's CUDA device, or why there is none.
#[cfg(any(feature = "cuda", feature = "cuda-sim"))]
fn cuda_device_name() -> Result<String, crate::Error> {
    // The device this process trains on (its launcher's local rank; 0 alone).
    let local = crate::dist::local_rank_from_env(&|k| std::env::var(k).ok())?;
    Ok(gpu::Gpu::open(gpu::device_of_local_rank(local))?.name().to_string())
}

#[cfg(not(any(feature = "cuda", feature = "cuda-sim")))]
fn cuda_device_name() -> Result<String, crate::Error> {
    Err(crate::Error::DeviceUnavailable(
        "this edm2 was built without the CUDA backend (cargo build --release --features cuda); \
         use --device cpu"
            .into(),
    ))
}
