//! The Stability VAE on the CUDA backend (the simulated device in CI, a GPU with
//! `--features cuda`): the whole small VAE of the golden fixtures against the official
//! outputs — fp32 within 1e-5 relative L2, bf16 storage within 2e-2 (issue 17's bounds).
//! Its own kernels are checked op by op in `tests/gpu_kernels.rs`.
#![cfg(any(feature = "cuda", feature = "cuda-sim"))]

mod common;
use common::{device, golden_path, rel_l2};
use edm2::backend::gpu::Gpu;
use edm2::backend::Precision;
use edm2::nn::vae::{LatentCodec, Parts, Vae};

fn io_f32(name: &str) -> (Vec<usize>, Vec<f32>) {
    common::vae_io(name)
}

fn on_device(gpu: &Gpu, precision: Precision) -> (f64, f64) {
    gpu.set_precision(precision);
    let vae = Vae::load(gpu, &golden_path("vae/vae_tiny.safetensors"), Parts { encoder: true, decoder: true }).unwrap();
    let codec = LatentCodec::default();
    // One image keeps the simulated run short.
    let (shape, px) = io_f32("pixels");
    let per = shape[1] * shape[2] * shape[3];
    let px: Vec<u8> = px[..per].iter().map(|&v| v as u8).collect();
    let raw = codec.encode_pixels(gpu, &vae, &px, 1, shape[2], shape[3]).unwrap();
    let want = io_f32("raw_latents").1;
    let e_enc = rel_l2(&raw, &want[..raw.len()]);
    let (ls, z) = io_f32("final_latents");
    let lper = ls[1] * ls[2] * ls[3];
    let (_, y) = codec.decode(gpu, &vae, &z[..lper], 1, ls[2], ls[3]).unwrap();
    let want = io_f32("decoded_float").1;
    let e_dec = rel_l2(&y, &want[..y.len()]);
    gpu.set_precision(Precision::Fp32);
    (e_enc, e_dec)
}

#[test]
fn the_small_vae_matches_the_official_outputs_on_the_device() {
    let Some(gpu) = device() else { return };
    let (e, d) = on_device(&gpu, Precision::Fp32);
    eprintln!("fp32: raw latents rel L2 {e:.3e}, decoded {d:.3e}");
    assert!(e < 1e-5 && d < 1e-5, "fp32: encoder {e:.3e}, decoder {d:.3e}");
    let (e, d) = on_device(&gpu, Precision::Bf16);
    eprintln!("bf16: raw latents rel L2 {e:.3e}, decoded {d:.3e}");
    assert!(e < 2e-2 && d < 2e-2, "bf16: encoder {e:.3e}, decoder {d:.3e}");
}
