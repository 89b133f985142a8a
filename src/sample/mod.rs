//! The EDM sampler (Karras et al. 2022, Alg. 2; DESIGN.md §3): 2nd-order Heun steps on the
//! σ schedule `σ_i = (σmax^(1/ρ) + i/(n−1)·(σmin^(1/ρ) − σmax^(1/ρ)))^ρ` computed in f32 as
//! the official code does, optional stochastic churn, and guidance
//! `D = g + w·(D_net − g)` by a separate guiding network (classifier-free guidance when it
//! is unconditional, autoguidance when it is a smaller / less-trained model).

use crate::error::Result;

#[cfg(any(feature = "cuda", feature = "cuda-sim"))]
pub mod device;
use crate::nn::{Mode, Params, Precond};
use crate::train::ema::torch_lerp;
use crate::tensor::Tensor;

/// Sampler settings (the official `edm_sampler` keyword names).
#[derive(Clone, Debug)]
pub struct SamplerOpts {
    pub num_steps: usize,
    pub sigma_min: f64,
    pub sigma_max: f64,
    pub rho: f64,
    pub guidance: f32,
    pub s_churn: f64,
    pub s_min: f64,
    pub s_max: f64,
    pub s_noise: f64,
}

impl Default for SamplerOpts {
    fn default() -> Self {
        SamplerOpts {
            num_steps: 32,
            sigma_min: 0.002,
            sigma_max: 80.0,
            rho: 7.0,
            guidance: 1.0,
            s_churn: 0.0,
            s_min: 0.0,
            s_max: f64::INFINITY,
            s_noise: 1.0,
        }
    }
}

/// The `num_steps + 1` noise levels, the last one 0, in f32 arithmetic as the official
/// code evaluates them (so σ_0 = 79.99998, not 80).
pub fn sigma_steps(o: &SamplerOpts) -> Vec<f32> {
    let a = o.sigma_max.powf(1.0 / o.rho) as f32;
    let ba = (o.sigma_min.powf(1.0 / o.rho) - o.sigma_max.powf(1.0 / o.rho)) as f32;
    let n1 = (o.num_steps.max(2) - 1) as f32;
    let mut t: Vec<f32> = (0..o.num_steps).map(|i| (a + (i as f32 / n1) * ba).powf(o.rho as f32)).collect();
    t.push(0.0);
    t
}

/// A network with its weights.
pub type Net<'a> = (&'a Precond, &'a Params);

/// The sampler for any denoiser `denoise(x, σ) → D(x; σ)` (NHWC or any layout: the
/// sampler is elementwise). `churn_noise(k)` gives the unit normal noise for the k-th
/// churned step (in step order).
///
/// ```
/// use edm2::sample::{sample_with, SamplerOpts};
/// use edm2::Tensor;
/// // Data N(μ = 2, s² = 0.25): the ideal denoiser is μ + s²/(s²+σ²)·(x − μ).
/// let ideal = |x: &Tensor, t: f32| {
///     let k = 0.25 / (0.25 + t * t);
///     Tensor::from_vec(&x.shape, x.data.iter().map(|v| 2.0 + k * (v - 2.0)).collect())
/// };
/// let noise = Tensor::from_vec(&[1, 1], vec![0.3]);
/// let x = sample_with(&mut |x, t| ideal(x, t), &noise, &SamplerOpts::default(), &mut |_| unreachable!());
/// // The probability-flow ODE keeps (x − μ)/sqrt(s² + σ²) constant.
/// let x_t = 0.3 * 79.99998_f32;
/// let want = 2.0 + 0.5 * (x_t - 2.0) / (0.25f32 + 79.99998 * 79.99998).sqrt();
/// assert!((x.data[0] - want).abs() < 5e-3); // Heun discretization error at 32 steps: 2e-3
/// ```
pub fn sample_with(
    denoise: &mut dyn FnMut(&Tensor, f32) -> Tensor,
    noise: &Tensor,
    o: &SamplerOpts,
    churn_noise: &mut dyn FnMut(usize) -> Tensor,
) -> Tensor {
    match try_sample_with(&mut |x, t| Ok(denoise(x, t)), noise, o, churn_noise) {
        Ok(x) => x,
        Err(_) => unreachable!("an infallible denoiser"),
    }
}

/// [`sample_with`] for a denoiser that can fail (a device): the first error stops the
/// sampler and is returned.
pub fn try_sample_with(
    denoise: &mut dyn FnMut(&Tensor, f32) -> Result<Tensor>,
    noise: &Tensor,
    o: &SamplerOpts,
    churn_noise: &mut dyn FnMut(usize) -> Tensor,
) -> Result<Tensor> {
    sample_in(&mut HostSpace { denoise }, noise, o, churn_noise)
}

/// The sampler's arithmetic on its state, wherever the state lives: on the host
/// ([`HostSpace`], `Tensor`s) or on a device (`api::DeviceNet::sample`: device buffers,
/// `kernels/sampler.cu`). Every space evaluates each step in the same order of rounded
/// operations, so given the same network outputs they give the same bits.
pub trait SampleSpace {
    /// A batch of images in the sampler's state (fp32).
    type V;
    /// `noise · s`.
    fn scaled(&mut self, noise: &Tensor, s: f32) -> Result<Self::V>;
    /// `x + k·eps` (the churn's added noise; `k` = sqrt(t_hat² − t²)·S_noise).
    fn add_noise(&mut self, x: &Self::V, eps: &Tensor, k: f32) -> Result<Self::V>;
    /// `D(x; t)` (guidance included).
    fn denoise(&mut self, x: &Self::V, t: f32) -> Result<Self::V>;
    /// `(dc, next) = ((x − d) / t_hat, x + h·dc)`.
    fn euler(&mut self, x: &Self::V, d: &Self::V, t_hat: f32, h: f32) -> Result<(Self::V, Self::V)>;
    /// `x + h·(0.5·dc + 0.5·(xn − dn) / t_next)`.
    fn heun(&mut self, x: &Self::V, dc: &Self::V, xn: &Self::V, dn: &Self::V, t_next: f32, h: f32) -> Result<Self::V>;
}

/// The state on the host: `Tensor`s, a denoiser closure.
pub struct HostSpace<'a> {
    pub denoise: &'a mut dyn FnMut(&Tensor, f32) -> Result<Tensor>,
}

impl SampleSpace for HostSpace<'_> {
    type V = Tensor;
    fn scaled(&mut self, noise: &Tensor, s: f32) -> Result<Tensor> {
        Ok(Tensor::from_vec(&noise.shape, noise.data.iter().map(|v| v * s).collect()))
    }
    fn add_noise(&mut self, x: &Tensor, eps: &Tensor, k: f32) -> Result<Tensor> {
        Ok(Tensor::from_vec(&x.shape, x.data.iter().zip(&eps.data).map(|(x, e)| x + k * e).collect()))
    }
    fn denoise(&mut self, x: &Tensor, t: f32) -> Result<Tensor> {
        (self.denoise)(x, t)
    }
    fn euler(&mut self, x: &Tensor, d: &Tensor, t_hat: f32, h: f32) -> Result<(Tensor, Tensor)> {
        let dc: Vec<f32> = x.data.iter().zip(&d.data).map(|(x, d)| (x - d) / t_hat).collect();
        let next = x.data.iter().zip(&dc).map(|(x, dc)| x + h * dc).collect();
        Ok((Tensor::from_vec(&x.shape, dc), Tensor::from_vec(&x.shape, next)))
    }
    fn heun(&mut self, x: &Tensor, dc: &Tensor, xn: &Tensor, dn: &Tensor, t_next: f32, h: f32) -> Result<Tensor> {
        let data = x
            .data
            .iter()
            .zip(&dc.data)
            .zip(xn.data.iter().zip(&dn.data))
            .map(|((x, dc), (xn, dn))| {
                let d_prime = (xn - dn) / t_next;
                x + h * (0.5 * dc + 0.5 * d_prime)
            })
            .collect();
        Ok(Tensor::from_vec(&x.shape, data))
    }
}

/// The EDM sampler (Alg. 2 of Karras et al. 2022) on any [`SampleSpace`].
pub fn sample_in<S: SampleSpace>(s: &mut S, noise: &Tensor, o: &SamplerOpts, churn_noise: &mut dyn FnMut(usize) -> Tensor) -> Result<S::V> {
    let t = sigma_steps(o);
    let mut x_next = s.scaled(noise, t[0])?;
    let mut churned = 0;
    for i in 0..o.num_steps {
        let (t_cur, t_next) = (t[i], t[i + 1]);
        let x_cur = x_next;
        let (t_hat, x_hat) = if o.s_churn > 0.0 && o.s_min <= t_cur as f64 && t_cur as f64 <= o.s_max {
            let gamma = (o.s_churn / o.num_steps as f64).min(std::f64::consts::SQRT_2 - 1.0) as f32;
            let t_hat = t_cur + gamma * t_cur;
            let eps = churn_noise(churned);
            churned += 1;
            let k = (t_hat * t_hat - t_cur * t_cur).sqrt();
            (t_hat, s.add_noise(&x_cur, &eps, k * o.s_noise as f32)?)
        } else {
            (t_cur, x_cur)
        };
        let d = s.denoise(&x_hat, t_hat)?;
        let h = t_next - t_hat;
        let (d_cur, mut next) = s.euler(&x_hat, &d, t_hat, h)?;
        if i < o.num_steps - 1 {
            let d2 = s.denoise(&next, t_next)?;
            next = s.heun(&x_hat, &d_cur, &next, &d2, t_next, h)?;
        }
        x_next = next;
    }
    Ok(x_next)
}

/// The sampler with an EDM2 network (eval mode) and optional guiding network:
/// `D = g + w (D_net − g)` (PyTorch's `lerp`), `labels` given to both.
/// `on_eval(σ)` is called before each denoiser evaluation (progress, tests).
pub fn edm_sampler(
    net: Net,
    gnet: Option<Net>,
    noise: &Tensor,
    labels: Option<&Tensor>,
    o: &SamplerOpts,
    churn_noise: &mut dyn FnMut(usize) -> Tensor,
    on_eval: &mut dyn FnMut(f32),
) -> Tensor {
    let mut main = |x: &Tensor, sig: &[f32]| Ok(net.0.forward(net.1, x, sig, labels, &Mode::eval(), false).d);
    let mut guide = gnet.map(|g| move |x: &Tensor, sig: &[f32]| Ok(g.0.forward(g.1, x, sig, labels, &Mode::eval(), false).d));
    let guide_dyn = guide.as_mut().map(|g| g as &mut dyn FnMut(&Tensor, &[f32]) -> Result<Tensor>);
    match edm_sampler_on(&mut main, guide_dyn, noise, o, churn_noise, on_eval) {
        Ok(x) => x,
        Err(_) => unreachable!("the CPU backend does not fail"),
    }
}

/// [`edm_sampler`] with the networks given as evaluators `(x, σ per image) → D` (NHWC),
/// e.g. a network on the CUDA backend (`api::DeviceNet`); labels are the evaluators'.
pub fn edm_sampler_on(
    net: &mut dyn FnMut(&Tensor, &[f32]) -> Result<Tensor>,
    mut gnet: Option<&mut dyn FnMut(&Tensor, &[f32]) -> Result<Tensor>>,
    noise: &Tensor,
    o: &SamplerOpts,
    churn_noise: &mut dyn FnMut(usize) -> Tensor,
    on_eval: &mut dyn FnMut(f32),
) -> Result<Tensor> {
    let n = noise.shape[0];
    if o.guidance != 1.0 && gnet.is_none() {
        return Err(crate::Error::Input("guidance != 1 needs a guiding network".into()));
    }
    let mut denoise = |x: &Tensor, t: f32| -> Result<Tensor> {
        on_eval(t);
        let sig = vec![t; n];
        let d = net(x, &sig)?;
        if o.guidance == 1.0 {
            return Ok(d);
        }
        let g = gnet.as_mut().expect("checked above");
        let gd = g(x, &sig)?;
        let data = gd.data.iter().zip(&d.data).map(|(&a, &b)| torch_lerp(a, b, o.guidance)).collect();
        Ok(Tensor::from_vec(&d.shape, data))
    };
    try_sample_with(&mut denoise, noise, o, churn_noise)
}
