//! Runtime CPU dispatch for the hot scalar loops. The crate is compiled for the x86-64
//! baseline (so the binary runs anywhere); [`multiversion!`] compiles a loop a second
//! time with AVX2 + FMA enabled and picks that copy when the CPU has them, which lets
//! LLVM vectorize it 8 lanes wide (e.g. SiLU with [`super::ops::fast_exp`]).

/// The instruction-set path of the CPU kernels, chosen once per process: the best the
/// CPU has, unless `EDM2_CPU_ISA=avx512|avx2|portable` asks for another (a path the CPU
/// lacks falls back to the best it has, with a warning) or `EDM2_DISABLE_AVX2=1` asks for
/// the portable one (CI runs the parity tests on every path the machine has).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum CpuIsa {
    /// Plain Rust loops (x86-64 baseline or any other architecture).
    Portable,
    /// 8-wide AVX2 + FMA register tiles.
    Avx2,
    /// 16-wide AVX-512F register tiles (32 zmm registers: 12x32 tiles).
    Avx512,
}

impl CpuIsa {
    pub fn name(self) -> &'static str {
        match self {
            CpuIsa::Portable => "portable",
            CpuIsa::Avx2 => "avx2",
            CpuIsa::Avx512 => "avx512",
        }
    }
}

/// The best path this CPU supports.
pub fn best_isa() -> CpuIsa {
    #[cfg(target_arch = "x86_64")]
    {
        let v3 = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
        if v3 && is_x86_feature_detected!("avx512f") {
            return CpuIsa::Avx512;
        }
        if v3 {
            return CpuIsa::Avx2;
        }
    }
    CpuIsa::Portable
}

/// The path in use (see [`CpuIsa`]).
pub fn isa() -> CpuIsa {
    static ISA: std::sync::OnceLock<CpuIsa> = std::sync::OnceLock::new();
    *ISA.get_or_init(|| {
        let best = best_isa();
        if std::env::var("EDM2_DISABLE_AVX2").is_ok_and(|v| v != "0") {
            return CpuIsa::Portable;
        }
        let want = match std::env::var("EDM2_CPU_ISA").as_deref() {
            Ok("avx512") => CpuIsa::Avx512,
            Ok("avx2") => CpuIsa::Avx2,
            Ok("portable") => CpuIsa::Portable,
            Ok(other) => {
                eprintln!("warning: EDM2_CPU_ISA={other} is not avx512, avx2 or portable; using {}", best.name());
                best
            }
            Err(_) => best,
        };
        if want > best {
            eprintln!("warning: EDM2_CPU_ISA={} but this CPU supports at most {}; using {}", want.name(), best.name(), best.name());
            return best;
        }
        want
    })
}

/// True when the AVX2+FMA kernels (or better) are in use.
pub fn avx2_fma() -> bool {
    isa() >= CpuIsa::Avx2
}

/// True when the AVX-512 kernels are in use.
pub fn avx512() -> bool {
    isa() == CpuIsa::Avx512
}

/// The CPU's model name (Linux: /proc/cpuinfo), for reports.
pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("model name")).and_then(|l| l.split_once(':')).map(|(_, v)| v.trim().to_string()))
        .unwrap_or_else(|| std::env::consts::ARCH.to_string())
}

/// `multiversion! { pub fn name(a: T, ...) -> R { body } }` defines `name`, which runs
/// `body` compiled for AVX2+FMA when available and for the baseline otherwise.
#[macro_export]
macro_rules! multiversion {
    ($($t:tt)*) => {
        $crate::multiversion_copies!(false, $($t)*);
    };
}

/// [`multiversion!`] with a third copy compiled for AVX-512 (16 lanes), picked on the
/// avx512 path. Not for every loop: measured per op on a cpu-s32 training step (AVX-512
/// Xeon, 2026-12-07), the flat SiLU loops ran 1.2–1.5x faster with it (mp_silu 48 → 33–38
/// ms, its backward 57 → 46–50 ms), while the modulation loops (then indexing 64–128
/// channels per pixel) ran 1.3–1.5x *slower* and the softmax did not change. The same
/// operations per element in the same order: the same bits as the AVX2 copy.
#[macro_export]
macro_rules! multiversion_wide {
    ($($t:tt)*) => {
        $crate::multiversion_copies!(true, $($t)*);
    };
}

/// The body of [`multiversion!`] (`wide` false) and [`multiversion_wide!`] (true).
#[macro_export]
#[doc(hidden)]
macro_rules! multiversion_copies {
    ($wide:literal, $(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$m])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn imp($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
                unsafe fn v4($($arg: $ty),*) $(-> $ret)? { imp($($arg),*) }
                if $wide && $crate::backend::cpu::simd::avx512() {
                    // SAFETY: the CPU supports the features v4 was compiled for.
                    return unsafe { v4($($arg),*) };
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn v3($($arg: $ty),*) $(-> $ret)? { imp($($arg),*) }
                if $crate::backend::cpu::simd::avx2_fma() {
                    // SAFETY: the CPU supports the features v3 was compiled for.
                    return unsafe { v3($($arg),*) };
                }
            }
            imp($($arg),*)
        }
    };
}

/// The machine's measured FMA rate, GFLOP/s over all worker threads, with the widest
/// vectors of the path in use ([`isa`]): 16 independent FMA chains per thread (enough to
/// cover the latency of two FMA pipes) for about `seconds`. None on the portable path.
/// The ceiling the kernels' GFLOP/s are reported against.
pub fn fma_peak_gflops(seconds: f64) -> Option<f64> {
    #[cfg(target_arch = "x86_64")]
    {
        // FLOPs per call iteration: 16 chains × lanes × 2 (multiply and add).
        let (flops, run): (f64, unsafe fn(u64) -> f32) = match isa() {
            CpuIsa::Avx512 => (16.0 * 16.0 * 2.0, fma_chains512),
            CpuIsa::Avx2 => (16.0 * 8.0 * 2.0, fma_chains256),
            CpuIsa::Portable => return None,
        };
        // SAFETY: the CPU supports the path `isa()` chose.
        Some(unsafe { peak_gflops(seconds, flops, run) })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = seconds;
        None
    }
}

/// The machine's measured rate of bf16 pair dot products (`vdpbf16ps` on zmm, the
/// CPU's `--precision bf16` mode), GFLOP/s over all worker threads (4 FLOPs per lane: two
/// products and two additions), measured like [`fma_peak_gflops`]. None where the mode
/// cannot run. Twice the FMA peak when the processor runs `vdpbf16ps` at the rate of
/// `vfmadd231ps`; on some (an AVX-512 Xeon without AMX, 2026-12-07) it is lower, and
/// the bf16 mode is slower than fp32 there.
pub fn bf16_dot_peak_gflops(seconds: f64) -> Option<f64> {
    #[cfg(target_arch = "x86_64")]
    if super::bf16::available() {
        // SAFETY: AVX512-BF16 checked just above.
        return Some(unsafe { peak_gflops(seconds, 16.0 * 16.0 * 4.0, bf16_chains512) });
    }
    let _ = seconds;
    None
}

/// Runs `run` (FLOPs `flops` per iteration) on every worker thread for about `seconds`
/// after calibrating the iteration count on one; GFLOP/s over all threads.
///
/// # Safety
/// The CPU must support what `run` uses.
#[cfg(target_arch = "x86_64")]
pub(crate) unsafe fn peak_gflops(seconds: f64, flops: f64, run: unsafe fn(u64) -> f32) -> f64 {
    use rayon::prelude::*;
    let mut iters = 1u64 << 16;
    loop {
        let t = std::time::Instant::now();
        std::hint::black_box(run(iters));
        let dt = t.elapsed().as_secs_f64();
        if dt > 0.02 || iters > 1 << 34 {
            iters = ((iters as f64) * (seconds / dt.max(1e-9))).max(1.0) as u64;
            break;
        }
        iters *= 4;
    }
    let threads = rayon::current_num_threads();
    let t = std::time::Instant::now();
    // SAFETY: as for the caller.
    let sink: f32 = (0..threads).into_par_iter().map(|_| unsafe { run(iters) }).sum();
    std::hint::black_box(sink);
    flops * iters as f64 * threads as f64 / t.elapsed().as_secs_f64() / 1e9
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn bf16_chains512(iters: u64) -> f32 {
    use std::arch::x86_64::*;
    // Tiny bf16 pairs (0x3400 ≈ 1.2e-7): the accumulators stay finite for any count.
    let ab = std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(0x3400_3400));
    let mut acc = [_mm512_set1_ps(1.0); 16];
    for _ in 0..iters {
        for r in acc.iter_mut() {
            *r = _mm512_dpbf16_ps(*r, ab, ab);
        }
    }
    acc.iter().map(|v| _mm512_reduce_add_ps(*v)).sum()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn fma_chains512(iters: u64) -> f32 {
    use std::arch::x86_64::*;
    let (a, b) = (_mm512_set1_ps(0.999_999), _mm512_set1_ps(1e-7));
    let mut acc = [_mm512_set1_ps(1.0); 16];
    for _ in 0..iters {
        for r in acc.iter_mut() {
            *r = _mm512_fmadd_ps(*r, a, b);
        }
    }
    acc.iter().map(|v| _mm512_reduce_add_ps(*v)).sum()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn fma_chains256(iters: u64) -> f32 {
    use std::arch::x86_64::*;
    let (a, b) = (_mm256_set1_ps(0.999_999), _mm256_set1_ps(1e-7));
    let mut acc = [_mm256_set1_ps(1.0); 16];
    for _ in 0..iters {
        for r in acc.iter_mut() {
            *r = _mm256_fmadd_ps(*r, a, b);
        }
    }
    let mut out = [0.0f32; 8];
    for v in acc {
        let mut lanes = [0.0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), v);
        for (o, l) in out.iter_mut().zip(lanes) {
            *o += l;
        }
    }
    out.iter().sum()
}
