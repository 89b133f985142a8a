//! Uses only the public API: build a network from a preset (or load one from a
//! safetensors file given as the first argument), denoise a noisy batch and report how
//! much closer to the clean images the denoiser got.
//!
//! ```text
//! cargo run --release --example denoise_batch                      # fresh cpu-xs16 net
//! cargo run --release --example denoise_batch -- net.safetensors   # a trained net
//! ```

use edm2::{LoadedNet, Mode, NetConfig, Precond, Tensor};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let net: LoadedNet = match std::env::args().nth(1) {
        Some(path) => edm2::load_net(&path, None)?,
        None => {
            let cfg = NetConfig::resolve("cpu-xs16")?;
            let net = Precond::new(&cfg)?;
            let params = net.init_params(0);
            LoadedNet { net, params, metadata: Default::default() }
        }
    };
    let cfg = net.net.config.clone();
    let (n, r, c) = (4, cfg.img_resolution, cfg.img_channels);
    let mut rng = edm2::rng::Rng::new(42);
    // Clean "images" (NCHW, as in files) and a noisy copy at sigma = 0.5.
    let clean = Tensor::from_vec(&[n, c, r, r], rng.normal_vec(n * c * r * r).iter().map(|v| 0.5 * v).collect());
    let sigma = vec![0.5f32; n];
    let noisy = Tensor::from_vec(&clean.shape, clean.data.iter().map(|v| v + 0.5 * rng.normal() as f32).collect());
    let (d, logvar) = edm2::denoise(&net, &noisy, &sigma, None)?;
    let mse = |a: &Tensor| a.data.iter().zip(&clean.data).map(|(x, y)| ((x - y) as f64).powi(2)).sum::<f64>() / a.numel() as f64;
    println!("network: {} parameters, {}x{}x{}", net.net.num_params(), r, r, c);
    println!("MSE noisy vs clean:    {:.4}", mse(&noisy));
    println!("MSE denoised vs clean: {:.4}", mse(&d));
    println!("logvar: {logvar:?}");
    let _ = Mode::eval();
    Ok(())
}
