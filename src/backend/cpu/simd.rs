//! Runtime CPU dispatch for the hot scalar loops. The crate is compiled for the x86-64
//! baseline (so the binary runs anywhere); [`multiversion!`] compiles a loop a second
//! time with AVX2 + FMA enabled and picks that copy when the CPU has them, which lets
//! LLVM vectorize it 8 lanes wide (e.g. SiLU with [`super::ops::fast_exp`]).

/// True when the CPU has AVX2 and FMA (checked once). Setting the environment variable
/// `EDM2_DISABLE_AVX2=1` forces the portable paths (CI runs the parity tests both ways).
pub fn avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static AVAIL: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *AVAIL.get_or_init(|| {
            std::env::var("EDM2_DISABLE_AVX2").map(|v| v == "0").unwrap_or(true)
                && is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `multiversion! { pub fn name(a: T, ...) -> R { body } }` defines `name`, which runs
/// `body` compiled for AVX2+FMA when available and for the baseline otherwise.
#[macro_export]
macro_rules! multiversion {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$m])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn imp($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
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
