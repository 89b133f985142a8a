//! AMX tiles (Intel Advanced Matrix Extensions: `tdpbf16ps` on eight 16-row × 64-byte
//! tile registers) for the products of the CPU's bf16 mode where the processor has them
//! (Sapphire Rapids and later): the 3x3 and 1x1 convolutions (forward, data gradient,
//! weight gradient) and the attention's products ([`gemm_seq`]). The operands are
//! rounded to bf16 (nearest even) right before the product and the products accumulate
//! in fp32, as on the `vdpbf16ps` path ([`super::bf16`]): the same error bounds, another
//! summation order.
//!
//! Rates measured on a 2-vCPU AVX-512 Xeon with AMX (2026-12-07): [`peak_gflops`] (2x2
//! blocks, operands fixed in L1) 6.0 TFLOP/s on two threads, 16 cycles per `tdpbf16ps`;
//! with the operands rotating through 32 KB, 1.5 per thread; against 0.41 for fp32 FMAs
//! (zmm) and 0.21 for `vdpbf16ps` on the same machine. So the products stop being the
//! step's cost; the kernels below run at 1.0–1.5 TFLOP/s per layer, limited by their
//! operand streams, and the operand layouts are what they are built around.
//!
//! Tiles (palette 1, all eight 16 rows × 64 bytes): a 32×32 fp32 block of C lives in
//! tmm0..tmm3 (tmm0 rows 0–15 × columns 0–15, tmm1 rows 0–15 × columns 16–31, tmm2 and
//! tmm3 rows 16–31), A in tmm4/tmm5 (16 rows × 32 bf16 of the reduction), B in tmm6/tmm7
//! (16 rows of 16 bf16 pairs: each `u32` two consecutive reduction elements of one
//! column — the pairs of [`super::bf16::pack_pairs`]). One step: 4 tile loads, 4
//! `tdpbf16ps` (32·32·32 products). Every operand buffer starts on a 64-byte boundary, so
//! each tile row is one cache line.
//!
//! Operand layouts:
//! * **Forward and data gradient of a 3x3** (the data gradient is the forward on dy with
//!   the transposed, flipped weights): the input with a one-pixel zero halo,
//!   `[N][H+2][W+2][Cp/2]` pairs (Cp = channels rounded up to 32, zero-filled). The rows
//!   of the product run over the padded grid's width, `q = y·(W+2) + x`, so every tap is
//!   one constant row offset (`ky·(W+2) + kx`) and the two columns past the right edge
//!   are computed and dropped: (W+2)/W the work (6% more at 32x32, 25% at 8x8) for no
//!   edge cases at all. The 1x1 is the same with no halo and one tap.
//! * **Weight gradient** (`d_eff[o, tap, ci] = Σ_p dy[p, o] · x[p + tap, ci]`, a
//!   reduction over pixels): pairs along the reduction are the same pixel of two images
//!   (as on the `vdpbf16ps` path: every tap shifts both alike). dy is transposed to
//!   `[N/2][O][Q]` on the q grid (A: rows are output channels, the reduction contiguous;
//!   the dropped columns zero, so they add nothing), x is `[N/2][Cp/32][P][32]` on the
//!   padded grid (B: a tap's shift moves whole 128-byte rows). C blocks (32 output × 32
//!   input channels, tap) stay in tiles over a few image pairs whose operands stay in L2.
//!
//! Deterministic: each output element is one chain of tile products in a fixed order,
//! whatever the thread count (the weight gradient's blocks are split between threads,
//! never its reduction).

use rayon::prelude::*;

/// Rows of a C block (two A tiles) and columns (two B tiles).
const BLOCK: usize = 32;
/// bf16 pairs per tile row (64 bytes): one reduction step is 16 pairs = 32 elements.
const STEP_PAIRS: usize = 16;

/// True when the AMX kernels run: the bf16 mode's `vdpbf16ps` path is possible
/// ([`super::bf16::available`]), the CPU has AMX-TILE and AMX-BF16, the kernel granted
/// this process the tile state, and `EDM2_DISABLE_AMX` is unset (or `0`). Checked once.
pub fn available() -> bool {
    static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HAS.get_or_init(|| {
        !std::env::var("EDM2_DISABLE_AMX").is_ok_and(|v| v != "0") && super::bf16::available() && detect::cpu_and_os()
    })
}

/// Why [`available`] is false on this machine (for `info` and the bench), or None.
pub fn unavailable_reason() -> Option<&'static str> {
    if available() {
        return None;
    }
    Some(if std::env::var("EDM2_DISABLE_AMX").is_ok_and(|v| v != "0") {
        "switched off by EDM2_DISABLE_AMX"
    } else if !super::bf16::available() {
        "no AVX512-BF16 path"
    } else if !detect::cpu() {
        "the CPU has no AMX-TILE/AMX-BF16"
    } else {
        "the kernel refused the tile state (arch_prctl ARCH_REQ_XCOMP_PERM)"
    })
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
mod detect {
    /// CPUID leaf 7: AMX-BF16 is EDX bit 22, AMX-TILE bit 24.
    pub fn cpu() -> bool {
        // Leaf 7 exists on every x86-64 that reports AVX-512 (the callers check that
        // first); on older ones it reads as zeros.
        let l7 = std::arch::x86_64::__cpuid_count(7, 0);
        (l7.edx >> 22) & 1 == 1 && (l7.edx >> 24) & 1 == 1
    }

    /// The CPU has the tiles and Linux grants them: the 8 KB tile data state is handed
    /// out only on request (`arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`, for the
    /// whole process); without it the first tile instruction faults.
    pub fn cpu_and_os() -> bool {
        if !cpu() {
            return false;
        }
        const SYS_ARCH_PRCTL: isize = 158;
        const ARCH_REQ_XCOMP_PERM: usize = 0x1023;
        const XFEATURE_XTILEDATA: usize = 18;
        let ret: isize;
        // SAFETY: a plain system call that changes only the process's permitted xsave
        // features; the syscall instruction clobbers rcx and r11.
        unsafe {
            std::arch::asm!("syscall", inlateout("rax") SYS_ARCH_PRCTL => ret, in("rdi") ARCH_REQ_XCOMP_PERM,
                in("rsi") XFEATURE_XTILEDATA, lateout("rcx") _, lateout("r11") _, options(nostack));
        }
        ret == 0
    }
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
mod detect {
    pub fn cpu() -> bool {
        false
    }
    pub fn cpu_and_os() -> bool {
        false
    }
}

/// The machine's measured rate of tile products, GFLOP/s over all worker threads: a
/// loop of 2x2 blocks of `tdpbf16ps` on operands in L1 for about `seconds` (the
/// ceiling of the kernels here). None where [`available`] is false.
pub fn peak_gflops(seconds: f64) -> Option<f64> {
    #[cfg(target_arch = "x86_64")]
    if available() {
        /// `iters` steps of one C block; A rows 0–31 and B rows 0–31 from a 4 KB buffer.
        unsafe fn run(iters: u64) -> f32 {
            #[repr(C, align(64))]
            struct Operands([u32; 1024]);
            let ops = Operands([0; 1024]);
            let _tiles = tiles::Scope::enter();
            let (a, b) = (ops.0.as_ptr() as *const u8, ops.0.as_ptr().wrapping_add(512) as *const u8);
            tiles::zero_c();
            for _ in 0..iters {
                tiles::step::<2>(a, 64, b, b.add(1024), 64);
            }
            let mut c = [0.0f32; BLOCK * BLOCK];
            tiles::store_c::<2>(c.as_mut_ptr(), BLOCK * 4);
            c[0]
        }
        // SAFETY: `available()` checked just above.
        return Some(unsafe { super::simd::peak_gflops(seconds, (2 * BLOCK * BLOCK * 2 * STEP_PAIRS) as f64, run) });
    }
    let _ = seconds;
    None
}

/// What runs the bf16 mode's convolution products here: "AMX tiles" or "vdpbf16ps".
pub fn products_name() -> &'static str {
    if available() {
        "AMX tiles"
    } else {
        "vdpbf16ps"
    }
}

/// Channels as the A operand stores them: rounded up to a whole reduction step (32).
pub fn padded_channels(c: usize) -> usize {
    c.div_ceil(2 * STEP_PAIRS) * 2 * STEP_PAIRS
}

#[cfg(target_arch = "x86_64")]
mod tiles {
    use std::arch::asm;

    /// The tile configuration of this thread for the life of the value (all eight tiles
    /// 16 rows × 64 bytes); released on drop, so the thread's context switches stop
    /// saving 8 KB of tile state.
    pub struct Scope(());

    impl Scope {
        /// # Safety
        /// [`super::available`] must be true.
        pub unsafe fn enter() -> Scope {
            #[repr(C, align(64))]
            struct Config([u8; 64]);
            let mut c = Config([0; 64]);
            c.0[0] = 1; // palette 1
            for t in 0..8 {
                c.0[16 + 2 * t] = 64; // bytes per row
                c.0[48 + t] = 16; // rows
            }
            asm!("ldtilecfg [{}]", in(reg) c.0.as_ptr(), options(nostack, readonly, preserves_flags));
            Scope(())
        }
    }

    impl Drop for Scope {
        fn drop(&mut self) {
            // SAFETY: tiles were configured by `enter` on this thread.
            unsafe { asm!("tilerelease", options(nostack, nomem, preserves_flags)) }
        }
    }

    /// C block = 0.
    #[inline(always)]
    pub unsafe fn zero_c() {
        asm!("tilezero tmm0", "tilezero tmm1", "tilezero tmm2", "tilezero tmm3", options(nostack, nomem, preserves_flags));
    }

    /// Loads the C block (`NB` column tiles) from `c`, rows `ldc` bytes apart.
    #[inline(always)]
    pub unsafe fn load_c<const NB: usize>(c: *const f32, ldc: usize) {
        let r16 = c.cast::<u8>().add(16 * ldc);
        asm!("tileloadd tmm0, [{c} + {s}*1]", "tileloadd tmm2, [{r} + {s}*1]",
            c = in(reg) c, r = in(reg) r16, s = in(reg) ldc, options(nostack, readonly, preserves_flags));
        if NB == 2 {
            asm!("tileloadd tmm1, [{c} + {s}*1]", "tileloadd tmm3, [{r} + {s}*1]",
                c = in(reg) c.add(16), r = in(reg) r16.add(64), s = in(reg) ldc, options(nostack, readonly, preserves_flags));
        }
    }

    /// Stores the C block (`NB` column tiles) to `c`, rows `ldc` bytes apart.
    #[inline(always)]
    pub unsafe fn store_c<const NB: usize>(c: *mut f32, ldc: usize) {
        let r16 = c.cast::<u8>().add(16 * ldc);
        asm!("tilestored [{c} + {s}*1], tmm0", "tilestored [{r} + {s}*1], tmm2",
            c = in(reg) c, r = in(reg) r16, s = in(reg) ldc, options(nostack, preserves_flags));
        if NB == 2 {
            asm!("tilestored [{c} + {s}*1], tmm1", "tilestored [{r} + {s}*1], tmm3",
                c = in(reg) c.add(16), r = in(reg) r16.add(64), s = in(reg) ldc, options(nostack, preserves_flags));
        }
    }

    /// One reduction step (32 bf16) of the C block: A rows 0–15 at `a`, 16–31 at
    /// `a + 16·lda` (bytes); B column tiles at `b` and (NB = 2) `b2`, rows `ldb` bytes apart.
    #[inline(always)]
    pub unsafe fn step<const NB: usize>(a: *const u8, lda: usize, b: *const u8, b2: *const u8, ldb: usize) {
        let a2 = a.add(16 * lda);
        if NB == 2 {
            asm!(
                "tileloadd tmm4, [{a} + {lda}*1]",
                "tileloadd tmm6, [{b} + {ldb}*1]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tileloadd tmm5, [{a2} + {lda}*1]",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tileloadd tmm7, [{b2} + {ldb}*1]",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tdpbf16ps tmm3, tmm5, tmm7",
                a = in(reg) a, a2 = in(reg) a2, lda = in(reg) lda, b = in(reg) b, b2 = in(reg) b2, ldb = in(reg) ldb,
                options(nostack, readonly, preserves_flags)
            );
        } else {
            asm!(
                "tileloadd tmm4, [{a} + {lda}*1]",
                "tileloadd tmm6, [{b} + {ldb}*1]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tileloadd tmm5, [{a2} + {lda}*1]",
                "tdpbf16ps tmm2, tmm5, tmm6",
                a = in(reg) a, a2 = in(reg) a2, lda = in(reg) lda, b = in(reg) b, ldb = in(reg) ldb,
                options(nostack, readonly, preserves_flags)
            );
        }
    }
}

/// Fallback where tiles cannot exist: [`available`] is false there, so never called.
#[cfg(not(target_arch = "x86_64"))]
mod tiles {
    pub struct Scope(());
    impl Scope {
        pub unsafe fn enter() -> Scope {
            unreachable!("AMX needs x86-64")
        }
    }
    pub unsafe fn zero_c() {}
    pub unsafe fn load_c<const NB: usize>(_: *const f32, _: usize) {}
    pub unsafe fn store_c<const NB: usize>(_: *mut f32, _: usize) {}
    pub unsafe fn step<const NB: usize>(_: *const u8, _: usize, _: *const u8, _: *const u8, _: usize) {}
}

/// A `u32` buffer whose first element is 64-byte aligned: every tile row of the
/// operands is then one cache line (a 16-byte aligned `Vec` put each across two).
struct Aligned {
    v: Vec<u32>,
    off: usize,
    len: usize,
}

impl Aligned {
    /// `len` elements written in parallel tasks of `chunk` elements by `fill(task,
    /// chunk)`. With `zero` each task's chunk is zeroed first and `fill` writes what it
    /// holds (zeroing inside the task keeps the chunk in cache between the two writes; a
    /// whole-buffer `cpu::zeroed` was a separate pass, memset ≈ 10% of a bf16 step);
    /// without it `fill` must write every element of its chunk, zeros included.
    fn filled(len: usize, chunk: usize, zero: bool, fill: impl Fn(usize, &mut [u32]) + Sync) -> Aligned {
        use std::mem::MaybeUninit;
        let mut v: Vec<MaybeUninit<u32>> = Vec::with_capacity(len + 16);
        // SAFETY: MaybeUninit needs no initialization; every element is written below
        // before the buffer is read as u32.
        unsafe { v.set_len(len + 16) };
        let off = v.as_ptr().align_offset(64).min(15);
        let (head, rest) = v.split_at_mut(off);
        let (body, tail) = rest.split_at_mut(len);
        head.fill(MaybeUninit::new(0));
        tail.fill(MaybeUninit::new(0));
        body.par_chunks_mut(chunk.max(1)).enumerate().for_each(|(t, c)| {
            if zero {
                c.fill(MaybeUninit::new(0));
            }
            // SAFETY: with `zero` every element of `c` was just initialized; without it
            // `fill` writes every element before any is read (the caller's contract), and
            // u32 has no invalid bit patterns.
            let c = unsafe { &mut *(c as *mut [MaybeUninit<u32>] as *mut [u32]) };
            fill(t, c);
        });
        let mut v = std::mem::ManuallyDrop::new(v);
        // SAFETY: all len + 16 elements are initialized; MaybeUninit<u32> has u32's layout.
        let v = unsafe { Vec::from_raw_parts(v.as_mut_ptr() as *mut u32, v.len(), v.capacity()) };
        Aligned { v, off, len }
    }
}

impl std::ops::Deref for Aligned {
    type Target = [u32];
    fn deref(&self) -> &[u32] {
        &self.v[self.off..self.off + self.len]
    }
}

/// `x` (`rows` pixels of `c` channels, `c` even) as bf16 pairs, `cp/2` per row (zero
/// beyond `c`), placed at padded-grid rows: pixel (b, y, xx) of `n` images of `h`×`w` at
/// row `b·(h+2·halo)·(w+2·halo) + (y+halo)·(w+2·halo) + xx+halo`. `total_rows` ≥ the
/// grid's rows (the rest, and the halo, zero).
fn padded_pairs(x: &[f32], n: usize, h: usize, w: usize, c: usize, cp: usize, halo: usize, total_rows: usize) -> Aligned {
    let _prof = crate::profile::scope("amx.pad");
    assert!(c % 2 == 0 && c <= cp && x.len() == n * h * w * c);
    let (wp, hp) = (w + 2 * halo, h + 2 * halo);
    assert!(total_rows >= n * hp * wp);
    let row = cp / 2;
    // Tasks of whole padded image rows (a few thousand pixels each); the rows past the
    // grid (tail) stay zero.
    let rows_per_task = (2048 / wp).max(1);
    let image_rows = n * hp;
    // With c == cp every pair is either converted or halo, so the task writes its zeros
    // itself (the halo only) instead of zeroing the whole chunk first (a memset over the
    // whole operand, ~7% of a 32-channel forward).
    let whole = c == cp;
    let out = Aligned::filled(total_rows * row, rows_per_task * wp * row, !whole, |t, d| {
        for (j, d) in d.chunks_mut(wp * row).enumerate() {
            let r = t * rows_per_task + j;
            let Some(y) = (r < image_rows).then(|| (r % hp).checked_sub(halo).filter(|&y| y < h)).flatten() else {
                if whole {
                    d.fill(0);
                }
                continue;
            };
            let src = &x[(r / hp * h + y) * w * c..][..w * c];
            if whole {
                // The row's pixels are contiguous on both sides: one conversion.
                d[..halo * row].fill(0);
                d[(halo + w) * row..].fill(0);
                super::bf16::pairs_into(src, &mut d[halo * row..][..w * row]);
                continue;
            }
            for (xx, s) in src.chunks_exact(c).enumerate() {
                super::bf16::pairs_into(s, &mut d[(xx + halo) * row..][..c / 2]);
            }
        }
    });
    out
}

/// The product of [`conv_rows`]: `a` pair rows (`kp2` pairs each, a multiple of 16),
/// `b` `[n/16][taps][kp2][16]` pairs, one row offset per tap.
struct RowProduct<'a> {
    a: &'a [u32],
    kp2: usize,
    offsets: &'a [usize],
    b: &'a [u32],
    n: usize,
}

/// `y[dest(r)][j] = Σ_t Σ_k a[r + offsets[t]][k] · b[t][k][j]` for the 32 rows `r` of
/// each block starting at `starts` (rows whose `dest` is None are computed and dropped).
/// `dest(s)` gives the 32 rows' destinations of the block at `s` at once (the grid's
/// divisions once per block, not per row and column block: at 64 channels they cost as
/// much as the products). Distinct rows must map to distinct output rows of `y` (row
/// stride `n`).
fn conv_rows(p: &RowProduct, starts: &[usize], dest: impl Fn(usize) -> [Option<usize>; BLOCK] + Sync, y: &mut [f32]) {
    let (kp2, n, taps) = (p.kp2, p.n, p.offsets.len());
    assert!(available() && kp2 % STEP_PAIRS == 0 && n % 16 == 0 && taps > 0);
    assert_eq!(p.b.len(), n / 16 * taps * kp2 * 16);
    let max_off = *p.offsets.iter().max().unwrap();
    // Every tile row read lies inside `a`: rows start..start+32 (+ the tap offset) whole.
    assert!(starts.iter().all(|&s| (s + BLOCK + max_off) * kp2 <= p.a.len()));
    let out_rows = y.len() / n;
    struct Out(*mut f32);
    // SAFETY: tasks write disjoint rows (distinct `dest` values, checked in bounds below).
    unsafe impl Sync for Out {}
    let out = Out(y.as_mut_ptr());
    let out = &out;
    // The taps run in groups whose B panels (two column tiles, all reduction steps)
    // fit in 16 KB of L1, each group over the blocks of a task in turn, the partial C
    // blocks kept in memory between groups: B read from L2 once per group and task
    // instead of once per block. (Timing-only experiment: B pinned in L1 made the
    // kernel 1.6x faster at 16x16, 128 channels, so B's stream from L2 was a limit;
    // this grouping, which pays C loads and stores instead, gained ~1.2% of a cpu-s32
    // bf16 step, 3 alternated rounds.)
    let group = (16384 / (kp2 / STEP_PAIRS * 2048)).clamp(1, taps);
    starts.par_chunks(TASK_BLOCKS).for_each(|chunk| {
        #[repr(C, align(64))]
        #[derive(Clone, Copy)]
        struct Partial([f32; BLOCK * BLOCK]);
        // On the stack: a heap allocation per task (hundreds per call) showed as malloc
        // and free work beside the products at 32 channels.
        let mut part = [Partial([0.0; BLOCK * BLOCK]); TASK_BLOCKS];
        let part = &mut part[..chunk.len()];
        let mut rows = [[None; BLOCK]; TASK_BLOCKS];
        for (r, &s) in rows.iter_mut().zip(chunk) {
            *r = dest(s);
        }
        // SAFETY: `available()` asserted above.
        let _tiles = unsafe { tiles::Scope::enter() };
        for nb in (0..n / 16).step_by(2) {
            let two = nb + 1 < n / 16;
            for t0 in (0..taps).step_by(group) {
                let t1 = (t0 + group).min(taps);
                for (&s, c) in chunk.iter().zip(part.iter_mut()) {
                    // SAFETY: the A rows read are s + off .. s + off + 32 (whole rows of
                    // kp2 pairs, inside `a` by the assert above); the B tiles are rows of
                    // the panels nb and nb + 1 (the latter only when `two`) of taps
                    // t0..t1, inside `b`; C is the task's own partial block.
                    unsafe {
                        if t0 == 0 {
                            tiles::zero_c();
                        } else if two {
                            tiles::load_c::<2>(c.0.as_ptr(), BLOCK * 4);
                        } else {
                            tiles::load_c::<1>(c.0.as_ptr(), BLOCK * 4);
                        }
                        for t in t0..t1 {
                            let a = p.a.as_ptr().add((s + p.offsets[t]) * kp2) as *const u8;
                            let b = p.b.as_ptr().add((nb * taps + t) * kp2 * 16) as *const u8;
                            let b2 = b.add(taps * kp2 * 16 * 4);
                            for ks in 0..kp2 / STEP_PAIRS {
                                let (a, b, b2) = (a.add(ks * 64), b.add(ks * 1024), b2.add(ks * 1024));
                                if two {
                                    tiles::step::<2>(a, kp2 * 4, b, b2, 64);
                                } else {
                                    tiles::step::<1>(a, kp2 * 4, b, b2, 64);
                                }
                            }
                        }
                        if two {
                            tiles::store_c::<2>(c.0.as_mut_ptr(), BLOCK * 4);
                        } else {
                            tiles::store_c::<1>(c.0.as_mut_ptr(), BLOCK * 4);
                        }
                    }
                }
            }
            for (c, rows) in part.iter().zip(&rows) {
                for (r, d) in rows.iter().enumerate() {
                    if let Some(d) = *d {
                        assert!(d < out_rows);
                        let src = &c.0[r * BLOCK..][..BLOCK];
                        // SAFETY: row d of y is in bounds and written by this task only;
                        // columns nb·16.. +32 (+16 when not `two`) are inside the row.
                        // Fixed lengths: the copies inline as vector moves (a `memmove`
                        // call per 64 or 128 bytes was ~10% of a 32-channel forward).
                        unsafe {
                            let dst = out.0.add(d * n + nb * 16);
                            if two {
                                std::slice::from_raw_parts_mut(dst, 32).copy_from_slice(&src[..32]);
                            } else {
                                std::slice::from_raw_parts_mut(dst, 16).copy_from_slice(&src[..16]);
                            }
                        }
                    }
                }
            }
        }
    });
}

/// Row blocks per task of [`conv_rows`]: their A rows (with the taps' reach) and a tap
/// group's B stay in L1 together.
const TASK_BLOCKS: usize = 2;

/// Whether [`gemm_seq`] takes a product of these shapes: rows in 32s, columns in 16s,
/// the reduction in 32s (`kp` pairs in 16s).
pub fn takes_gemm(m: usize, n: usize, kp: usize) -> bool {
    available() && m % BLOCK == 0 && n % 16 == 0 && kp % STEP_PAIRS == 0 && m > 0 && n > 0 && kp > 0
}

/// `c[m×n]` (row stride `ldc`) `= a · b` on the calling thread: `a` `m` rows of `kp`
/// bf16 pairs (row stride `lda` pairs), `b` the panels `[n/16][kp][16]` of
/// [`super::bf16::pack_pairs`]. The attention's products in the bf16 mode (P = 64–256,
/// head width 64: one call per image and head, inside a parallel loop).
#[allow(clippy::too_many_arguments)]
pub fn gemm_seq(m: usize, n: usize, kp: usize, a: &[u32], lda: usize, b: &[u32], c: &mut [f32], ldc: usize) {
    assert!(takes_gemm(m, n, kp) && lda >= kp && ldc >= n);
    assert!((m - 1) * lda + kp <= a.len() && b.len() >= n * kp && (m - 1) * ldc + n <= c.len());
    let _prof = crate::profile::scope("amx.gemm");
    // SAFETY: `available()` asserted (in `takes_gemm`).
    let _tiles = unsafe { tiles::Scope::enter() };
    for r0 in (0..m).step_by(BLOCK) {
        for nb in (0..n / 16).step_by(2) {
            let two = nb + 1 < n / 16;
            // SAFETY: A rows r0..r0+32 < m, pairs up to kp ≤ lda (inside `a`, asserted);
            // B panels nb (and nb + 1 when `two`) inside `b`; C rows r0..r0+32, columns
            // nb·16..+16 (+32 when `two`) ≤ n, inside `c` (asserted).
            unsafe {
                tiles::zero_c();
                let a = a.as_ptr().add(r0 * lda) as *const u8;
                let b = b.as_ptr().add(nb * kp * 16) as *const u8;
                let b2 = b.add(kp * 16 * 4);
                for ks in 0..kp / STEP_PAIRS {
                    if two {
                        tiles::step::<2>(a.add(ks * 64), lda * 4, b.add(ks * 1024), b2.add(ks * 1024), 64);
                    } else {
                        tiles::step::<1>(a.add(ks * 64), lda * 4, b.add(ks * 1024), b2, 64);
                    }
                }
                let cp = c.as_mut_ptr().add(r0 * ldc + nb * 16);
                if two {
                    tiles::store_c::<2>(cp, ldc * 4);
                } else {
                    tiles::store_c::<1>(cp, ldc * 4);
                }
            }
        }
    }
}

/// `y[N, H, W, cout] = conv3x3(x)` ('same' zero padding) for NHWC `x` `[N, H, W, cin]`
/// (cin even) and `b` = [`pack_weight`] of the direct kernel's packing
/// (`[cout/16][9][cin][16]`, or its transposed, flipped form for a data gradient).
#[allow(clippy::too_many_arguments)]
pub fn conv3x3(x: &[f32], n: usize, h: usize, w: usize, cin: usize, b: &[u32], cout: usize, y: &mut [f32]) {
    assert_eq!(y.len(), n * h * w * cout);
    let cp = padded_channels(cin);
    let (wp, pimg) = (w + 2, (h + 2) * (w + 2));
    // Blocks of 32 grid rows per image cover q = 0..h·wp; the last one and the taps
    // reach past the image into the next one (dropped rows) or into the zero tail.
    let blocks = (h * wp).div_ceil(BLOCK);
    let a = padded_pairs(x, n, h, w, cin, cp, 1, n * pimg + 2 * BLOCK + 2 * wp + 2);
    let offsets: Vec<usize> = (0..9).map(|t| (t / 3) * wp + t % 3).collect();
    let starts: Vec<usize> = (0..n).flat_map(|i| (0..blocks).map(move |j| i * pimg + j * BLOCK)).collect();
    let _prof = crate::profile::scope("amx.conv3x3");
    let p = RowProduct { a: &a, kp2: cp / 2, offsets: &offsets, b, n: cout };
    conv_rows(
        &p,
        &starts,
        |s| {
            // Grid row s: image i, row yy, column xx; then step along the grid. Only
            // the block's own image: on tiny images (w < 14) a block reaches into the
            // next image's rows, which that image's own block writes.
            let (i0, q) = (s / pimg, s % pimg);
            let (mut i, mut yy, mut xx) = (i0, q / wp, q % wp);
            std::array::from_fn(|_| {
                let d = (i == i0 && i < n && yy < h && xx < w).then(|| (i * h + yy) * w + xx);
                xx += 1;
                if xx == wp {
                    (xx, yy) = (0, yy + 1);
                    if yy == h + 2 {
                        (yy, i) = (0, i + 1);
                    }
                }
                d
            })
        },
        y,
    );
}

/// `y[pixels, cout] = x[pixels, cin] · W` (a 1x1 convolution; cin even) with `b` =
/// [`pack_weight`] of the GEMM packing `[cout/16][cin][16]`.
pub fn conv1x1(x: &[f32], pixels: usize, cin: usize, b: &[u32], cout: usize, y: &mut [f32]) {
    assert_eq!(y.len(), pixels * cout);
    let cp = padded_channels(cin);
    let blocks = pixels.div_ceil(BLOCK);
    let a = padded_pairs(x, 1, pixels, 1, cin, cp, 0, blocks * BLOCK);
    let starts: Vec<usize> = (0..blocks).map(|j| j * BLOCK).collect();
    let _prof = crate::profile::scope("amx.conv1x1");
    let p = RowProduct { a: &a, kp2: cp / 2, offsets: &[0], b, n: cout };
    conv_rows(&p, &starts, |s| std::array::from_fn(|r| (s + r < pixels).then_some(s + r)), y);
}

/// A panel-packed f32 weight `[G][k][16]` (the direct kernel's `[cout/16][9][cin][16]`
/// with G = cout/16 · 9, or a GEMM's `[n/16][k][16]`) as the B operand of the tiles:
/// `[G][kp/2][16]` bf16 pairs with kp = [`padded_channels`]`(k)` (the pad rows zero).
pub fn pack_weight(packed: &[f32], k: usize) -> Vec<u32> {
    super::bf16::pack_pairs_padded(packed, k, padded_channels(k))
}

/// The weight gradient's operand conversions (image pairs to bf16 pairs) on AVX-512:
/// 32 channels of a pixel of both images at a time (masked where fewer remain). The
/// bf16 mode runs only where AVX512-BF16/BW exist ([`super::bf16::available`], which
/// [`available`] includes).
#[cfg(target_arch = "x86_64")]
mod convert {
    use std::arch::x86_64::*;

    /// Word 2i of a pair vector takes word i of `cvtne2ps(b, a)` (a_i), word 2i + 1
    /// word 16 + i (b_i).
    #[inline(always)]
    unsafe fn interleave_index() -> __m512i {
        let idx: [i16; 32] = std::array::from_fn(|w| (w / 2 + 16 * (w % 2)) as i16);
        _mm512_loadu_si512(idx.as_ptr() as *const __m512i)
    }

    /// The bf16 pairs (a[c] low, b[c] high — zero without `b`) of channels c < m ≤ 32,
    /// zero for c ≥ m: channels 0–15 and 16–31.
    #[inline(always)]
    unsafe fn pairs32(a: *const f32, b: Option<*const f32>, m: usize, idx: __m512i) -> [__m512i; 2] {
        let lanes = |n: usize| if n >= 16 { 0xffffu16 } else { ((1u32 << n) - 1) as u16 };
        let (m0, m1) = (lanes(m), lanes(m.saturating_sub(16)));
        let (a0, a1) = (_mm512_maskz_loadu_ps(m0, a), _mm512_maskz_loadu_ps(m1, a.wrapping_add(16)));
        let (b0, b1) = match b {
            Some(b) => (_mm512_maskz_loadu_ps(m0, b), _mm512_maskz_loadu_ps(m1, b.wrapping_add(16))),
            None => (_mm512_setzero_ps(), _mm512_setzero_ps()),
        };
        let v0 = std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(b0, a0));
        let v1 = std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(b1, a1));
        [_mm512_permutexvar_epi16(idx, v0), _mm512_permutexvar_epi16(idx, v1)]
    }

    /// dy of an image pair (`a`, and `b` unless the batch ended) transposed: row `o`
    /// of `d` (rows `hq` apart) holds channel o0 + o (o < m) at grid pixel y·wp + x.
    /// Runs of 16 pixels are paired into a block, then each channel's 16 values are
    /// gathered from it and stored as one cache line.
    #[allow(clippy::too_many_arguments)]
    pub fn transposed_pairs(a: &[f32], b: Option<&[f32]>, h: usize, w: usize, c: usize, o0: usize, m: usize, wp: usize, hq: usize, d: &mut [u32]) {
        assert!(a.len() == h * w * c && b.is_none_or(|b| b.len() == a.len()) && o0 + m <= c && m <= 32);
        assert!(w <= wp && h * wp <= hq && d.len() >= m * hq);
        // SAFETY: the bf16 mode runs only with AVX512-F/BW/BF16 (module comment); every
        // pixel read is (y·w + x)·c + o0 + [0, m) < a.len(), every store row o < m at
        // o·hq + y·wp + x0 + [0, len) with x0 + len ≤ w ≤ wp, inside d (asserted).
        unsafe { transposed_pairs_avx512(a, b, h, w, c, o0, m, wp, hq, d) }
    }

    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn transposed_pairs_avx512(a: &[f32], b: Option<&[f32]>, h: usize, w: usize, c: usize, o0: usize, m: usize, wp: usize, hq: usize, d: &mut [u32]) {
        #[repr(C, align(64))]
        struct Block([u32; 16 * 32]);
        let mut blk = Block([0; 16 * 32]);
        let idx = interleave_index();
        let rows: [i32; 16] = std::array::from_fn(|p| 32 * p as i32);
        let rows = _mm512_loadu_si512(rows.as_ptr() as *const __m512i);
        for y in 0..h {
            for x0 in (0..w).step_by(16) {
                let len = (w - x0).min(16);
                for p in 0..len {
                    let at = (y * w + x0 + p) * c + o0;
                    let v = pairs32(a.as_ptr().add(at), b.map(|b| b.as_ptr().add(at)), m, idx);
                    _mm512_store_si512(blk.0.as_mut_ptr().add(32 * p) as *mut __m512i, v[0]);
                    _mm512_store_si512(blk.0.as_mut_ptr().add(32 * p + 16) as *mut __m512i, v[1]);
                }
                let keep = if len == 16 { 0xffffu16 } else { ((1u32 << len) - 1) as u16 };
                let dst = d.as_mut_ptr().add(y * wp + x0);
                for o in 0..m {
                    let col = _mm512_i32gather_epi32::<4>(rows, blk.0.as_ptr().add(o) as *const _);
                    _mm512_mask_storeu_epi32(dst.add(o * hq) as *mut _, keep, col);
                }
            }
        }
    }

    /// x of an image pair as one 32-channel plane (channels c0..c0 + m, the rest zero):
    /// grid pixel (y + halo)·wp + x + halo of `d` holds its 32 pairs.
    #[allow(clippy::too_many_arguments)]
    pub fn plane_pairs(a: &[f32], b: Option<&[f32]>, h: usize, w: usize, c: usize, c0: usize, m: usize, halo: usize, wp: usize, d: &mut [u32]) {
        assert!(a.len() == h * w * c && b.is_none_or(|b| b.len() == a.len()) && c0 + m <= c && m <= 32);
        assert!(w + 2 * halo <= wp && d.len() >= ((h + halo) * wp) * 32);
        // SAFETY: as for `transposed_pairs`; every store is the 32 pairs of one grid
        // pixel < (h + halo)·wp, inside d (asserted).
        unsafe { plane_pairs_avx512(a, b, h, w, c, c0, m, halo, wp, d) }
    }

    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn plane_pairs_avx512(a: &[f32], b: Option<&[f32]>, h: usize, w: usize, c: usize, c0: usize, m: usize, halo: usize, wp: usize, d: &mut [u32]) {
        let idx = interleave_index();
        for y in 0..h {
            for x in 0..w {
                let at = (y * w + x) * c + c0;
                let v = pairs32(a.as_ptr().add(at), b.map(|b| b.as_ptr().add(at)), m, idx);
                let dst = d.as_mut_ptr().add(((y + halo) * wp + x + halo) * 32);
                _mm512_storeu_si512(dst as *mut __m512i, v[0]);
                _mm512_storeu_si512(dst.add(16) as *mut __m512i, v[1]);
            }
        }
    }
}

/// Where there is no AVX-512 the bf16 mode never runs ([`available`] is false).
#[cfg(not(target_arch = "x86_64"))]
mod convert {
    #[allow(clippy::too_many_arguments)]
    pub fn transposed_pairs(_: &[f32], _: Option<&[f32]>, _: usize, _: usize, _: usize, _: usize, _: usize, _: usize, _: usize, _: &mut [u32]) {
        unreachable!("the bf16 mode needs x86-64")
    }
    #[allow(clippy::too_many_arguments)]
    pub fn plane_pairs(_: &[f32], _: Option<&[f32]>, _: usize, _: usize, _: usize, _: usize, _: usize, _: usize, _: usize, _: &mut [u32]) {
        unreachable!("the bf16 mode needs x86-64")
    }
}

/// Zeroes `d` (in units of `unit` elements) except the `runs` runs of `len` units that
/// start at `first`, `first + stride`, …: the pixels a conversion then writes.
fn zero_outside_runs(d: &mut [u32], unit: usize, first: usize, runs: usize, len: usize, stride: usize) {
    debug_assert!(runs == 0 || len <= stride);
    let mut at = 0;
    for r in 0..runs {
        let start = (first + r * stride) * unit;
        d[at..start].fill(0);
        at = start + len * unit;
    }
    d[at..].fill(0);
}

/// Image `i` (of `n`, `len` values each) of `v`, None past the last.
fn image(v: &[f32], i: usize, n: usize, len: usize) -> Option<&[f32]> {
    (i < n).then(|| &v[i * len..][..len])
}

/// What task `t` of a conversion by (image pair, 32-channel block) reads from `v` (`n`
/// images of `per` values, `c` channels padded to `cp`): the pair's images (the second
/// None past the batch), the block's first channel and its channels inside `c`; None
/// for a block wholly in the padding (its output stays zero).
fn pair_block(v: &[f32], n: usize, per: usize, c: usize, cp: usize, t: usize) -> Option<(&[f32], Option<&[f32]>, usize, usize)> {
    let (pair, c0) = (t / (cp / BLOCK), (t % (cp / BLOCK)) * BLOCK);
    let m = c.saturating_sub(c0).min(BLOCK);
    (m > 0).then(|| (image(v, 2 * pair, n, per).unwrap(), image(v, 2 * pair + 1, n, per), c0, m))
}

/// Bytes of operands (dy and x of some image pairs) per pass over a thread's C blocks:
/// they stay in L2 while every block reads them (each pass loads and stores every C
/// block once). Sized by one block's operands instead (13 pairs at 16x16, 128
/// channels), the thread's pass streamed from memory: 380 GFLOP/s, two threads slower
/// than one.
const DW_ROUND_BYTES: usize = 1 << 20;

/// Weight gradient of a 'same' k×k convolution (k = 3 or 1), OHWI, overwritten:
/// `d_eff[o, tap, ci] = Σ_p dy[p, o] · x[p + tap, ci]` over the products of the bf16
/// operands; `cin` even, `cout % 16 == 0`.
///
/// A is dy transposed (rows: output channels; the reduction over grid pixels
/// contiguous, each tile row 64-byte aligned), B is x on the padded grid (rows: pixels,
/// 16 input-channel pairs each), so a tap's shift moves B by whole rows and every tile
/// row stays aligned. (Shifting a transposed x instead put most rows across two cache
/// lines: 420 GFLOP/s at 16x16, 128 channels.)
#[allow(clippy::too_many_arguments)]
pub fn weight_grad(k: usize, x: &[f32], n: usize, h: usize, w: usize, cin: usize, dy: &[f32], cout: usize, d_eff: &mut [f32]) {
    assert!(available() && (k == 1 || k == 3) && cin % 2 == 0 && cout % 16 == 0);
    let taps = k * k;
    assert_eq!(x.len(), n * h * w * cin);
    assert_eq!(dy.len(), n * h * w * cout);
    assert_eq!(d_eff.len(), taps * cin * cout);
    let halo = k / 2;
    let (wp, hp) = (w + 2 * halo, h + 2 * halo);
    let pimg = hp * wp;
    // The reduction runs over the q grid (h rows of wp) in steps of 16 pixels.
    let hq = (h * wp).div_ceil(STEP_PAIRS) * STEP_PAIRS;
    // x rows read: up to hq + the largest tap offset (2·wp + 2).
    let xrows = pimg.max(hq + 2 * halo * (wp + 1));
    let n2 = n.div_ceil(2);
    let (cp, op) = (padded_channels(cin), padded_channels(cout));
    // dy as [n2][op][hq] image pairs, transposed; x as [n2][cp/32][xrows][32] pairs.
    let prof = crate::profile::scope("amx.dw_operands");
    // (Zeroing only dt's gaps, two pairs per image row, made the weight gradient 5%
    // slower than zeroing the chunk first: a `memset` call per gap.)
    let dt = Aligned::filled(n2 * op * hq, BLOCK * hq, true, |t, d| {
        if let Some((a, b, o0, m)) = pair_block(dy, n, h * w * cout, cout, op, t) {
            convert::transposed_pairs(a, b, h, w, cout, o0, m, wp, hq, d);
        }
    });
    // x in planes of 32 channels: a tile row (16 channel pairs) then lies in a
    // contiguous run of rows, not one 64-byte piece per `cp`-wide row (with 128
    // channels, a 512-byte stride: every row in the same few L1 sets).
    // Written whole by its tasks: the conversion, and zeros only where nothing is
    // converted (the halo, whole rows of 32 pairs).
    let xg = Aligned::filled(n2 * xrows * cp, xrows * BLOCK, false, |t, d| {
        let Some((a, b, c0, m)) = pair_block(x, n, h * w * cin, cin, cp, t) else { return d.fill(0) };
        zero_outside_runs(d, BLOCK, halo * wp + halo, h, w, wp);
        convert::plane_pairs(a, b, h, w, cin, c0, m, halo, wp, d);
    });
    drop(prof);
    let prof = crate::profile::scope("amx.conv_dw");
    // C blocks (32 output channels, 32 input channels, tap), each its own 32×32 buffer;
    // the taps innermost, so consecutive blocks read the same dy rows and shifts of the
    // same x rows, from L1.
    let (oblocks, cblocks) = (op / BLOCK, cp / BLOCK);
    let nblocks = oblocks * cblocks * taps;
    let mut acc = super::zeroed::<f32>(nblocks * BLOCK * BLOCK);
    let per = nblocks.div_ceil(rayon::current_num_threads().max(1));
    // Image pairs per pass over the blocks: all their operands stay in L2 while the
    // thread's blocks pass over them.
    let pairs_per_round = (DW_ROUND_BYTES / ((op * hq + cp * xrows) * 4)).clamp(1, n2);
    acc.par_chunks_mut(per * BLOCK * BLOCK).enumerate().for_each(|(g, blocks)| {
        // SAFETY: `available()` asserted above.
        let _tiles = unsafe { tiles::Scope::enter() };
        for p0 in (0..n2).step_by(pairs_per_round) {
            for (j, c) in blocks.chunks_mut(BLOCK * BLOCK).enumerate() {
                let i = g * per + j;
                let (ob, cb, t) = (i / taps / cblocks, (i / taps) % cblocks, i % taps);
                let off = if k == 3 { (t / 3) * wp + t % 3 } else { 0 };
                // SAFETY: A rows are output channels ob·32..+32 of a pair (inside dt: op
                // rows of hq), read at q..q+16 ≤ hq; B rows are grid pixels q + off ..
                // +16 < hq + 2·wp + 2 ≤ xrows of the pair's plane cb (32 channels); C is
                // this task's own block.
                unsafe {
                    tiles::load_c::<2>(c.as_ptr(), BLOCK * 4);
                    for pair in p0..(p0 + pairs_per_round).min(n2) {
                        let a = dt.as_ptr().add((pair * op + ob * BLOCK) * hq);
                        let b = xg.as_ptr().add(((pair * cblocks + cb) * xrows + off) * BLOCK);
                        for q in (0..hq).step_by(STEP_PAIRS) {
                            let (a, b) = (a.add(q) as *const u8, b.add(q * BLOCK) as *const u8);
                            tiles::step::<2>(a, hq * 4, b, b.add(64), BLOCK * 4);
                        }
                    }
                    tiles::store_c::<2>(c.as_mut_ptr(), BLOCK * 4);
                }
            }
        }
    });
    drop(prof);
    let _prof = crate::profile::scope("amx.dw_scatter");
    // Scatter the blocks (rows: output channels, columns: input channels) into OHWI.
    d_eff.par_chunks_mut(taps * cin).enumerate().for_each(|(o, d)| {
        for t in 0..taps {
            for ci in 0..cin {
                let blk = ((o / BLOCK) * cblocks + ci / BLOCK) * taps + t;
                d[t * cin + ci] = acc[(blk * BLOCK + o % BLOCK) * BLOCK + ci % BLOCK];
            }
        }
    });
}
