//! Build script. Without features nothing happens. Both CUDA features compile every
//! `kernels/*.cu` (one `cc` build, one static library per file) and run bindgen on the
//! kernels' C header `kernels/edm2.h` (→ `$OUT_DIR/edm2_ffi.rs`, included by
//! `backend::ffi`):
//! - `cuda`: nvcc (found as described in `find_nvcc`), SASS for sm_80 and sm_90 plus
//!   compute_90 PTX, `-lineinfo`, never `-G`; cudart linked statically.
//! - `cuda-sim`: the host C++ compiler against our simulation header (`sim/cuda_sim.h`:
//!   blocks, barriers and warp collectives executed on the CPU), so the same kernels run
//!   in CI on machines without a GPU.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    #[cfg(all(feature = "cuda", feature = "cuda-sim"))]
    fail(
        "error: the features `cuda` and `cuda-sim` are exclusive: they compile the same kernels \
         for a real GPU or for the CPU simulation harness. Enable one of them."
            .into(),
    );
    #[cfg(all(feature = "cuda", not(feature = "cuda-sim")))]
    nvcc::build();
    #[cfg(all(feature = "cuda-sim", not(feature = "cuda")))]
    sim::build();
}

/// Prints `msg` and stops the build without a panic backtrace.
#[allow(dead_code)]
fn fail(msg: String) -> ! {
    eprintln!("\n{msg}\n");
    std::process::exit(1)
}

/// The kernel sources, sorted, each tracked for rebuilds (headers too).
#[cfg(any(feature = "cuda", feature = "cuda-sim"))]
fn kernel_sources(kernels: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut files: Vec<std::path::PathBuf> = std::fs::read_dir(kernels)
        .unwrap_or_else(|e| fail(format!("error: cannot read {}: {e}", kernels.display())))
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "cu" || e == "cuh" || e == "h"))
        .collect();
    files.sort();
    for f in &files {
        println!("cargo:rerun-if-changed={}", f.display());
    }
    files.retain(|p| p.extension().is_some_and(|e| e == "cu"));
    files
}

/// bindgen on `kernels/edm2.h`; `stream_type` is the Rust type of `cudaStream_t`.
#[cfg(any(feature = "cuda", feature = "cuda-sim"))]
fn bindings(header: &std::path::Path, stream_type: &str) {
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR").unwrap()).join("edm2_ffi.rs");
    let b = bindgen::Builder::default()
        .header(header.to_str().unwrap())
        .allowlist_function("edm2_.*")
        .allowlist_var("EDM2_.*")
        .blocklist_type("cudaStream_t")
        .blocklist_type("CUstream_st")
        .raw_line(format!("pub type cudaStream_t = {stream_type};"))
        .generate()
        .unwrap_or_else(|e| {
            fail(format!(
                "error: bindgen could not parse {}: {e}\n\
                 bindgen needs libclang: apt-get install -y libclang-dev (Debian), or set LIBCLANG_PATH",
                header.display()
            ))
        });
    b.write_to_file(&out).unwrap_or_else(|e| fail(format!("error: writing {}: {e}", out.display())));
}

#[cfg(all(feature = "cuda", not(feature = "cuda-sim")))]
mod nvcc {
    use super::fail;
    use std::env;
    use std::path::{Path, PathBuf};

    const ROOT_VARS: [&str; 4] = ["CUDA_HOME", "CUDA_PATH", "CUDA_ROOT", "CUDA_TOOLKIT_ROOT_DIR"];

    /// `$NVCC` → `$CUDA_HOME`/`$CUDA_PATH`/`$CUDA_ROOT`/`$CUDA_TOOLKIT_ROOT_DIR` + `/bin/nvcc`
    /// → `$PATH` → `/usr/local/cuda/bin/nvcc`; returns the path and how it was found.
    fn find_nvcc() -> (PathBuf, String) {
        if let Some(p) = env::var_os("NVCC") {
            let p = PathBuf::from(p);
            if p.is_file() {
                return (p, "$NVCC".into());
            }
            fail(format!("error: NVCC={} does not point to an nvcc executable", p.display()));
        }
        for var in ROOT_VARS {
            if let Some(root) = env::var_os(var) {
                let p = Path::new(&root).join("bin").join("nvcc");
                if p.is_file() {
                    return (p, format!("${var}"));
                }
                println!("cargo:warning={var} is set but {} does not exist; trying other locations", p.display());
            }
        }
        if let Some(path) = env::var_os("PATH") {
            for dir in env::split_paths(&path) {
                let p = dir.join("nvcc");
                if p.is_file() {
                    return (p, "$PATH".into());
                }
            }
        }
        let p = PathBuf::from("/usr/local/cuda/bin/nvcc");
        if p.is_file() {
            return (p, "/usr/local/cuda".into());
        }
        fail(
            "error: feature `cuda` is enabled but nvcc was not found.\n\
             Looked at: $NVCC, $CUDA_HOME/bin, $CUDA_PATH/bin, $CUDA_ROOT/bin, $CUDA_TOOLKIT_ROOT_DIR/bin, \
             $PATH, /usr/local/cuda/bin.\n\
             Fix one of:\n  \
             * export CUDA_HOME=/usr/local/cuda                       (a system toolkit)\n  \
             * scripts/install-cuda-toolkit.sh, then export the CUDA_HOME it prints (the pinned pip nvcc 13.0)\n  \
             * export NVCC=/full/path/to/nvcc\n\
             Or build without `--features cuda` for the CPU backend (or with `--features cuda-sim` to run \
             the kernels in the CPU simulation harness)."
                .into(),
        )
    }

    fn find_cudart_dir(root: &Path) -> PathBuf {
        let candidates = [
            root.join("lib64"),
            root.join("targets/x86_64-linux/lib"),
            root.join("lib"),
            root.join("lib/x86_64-linux-gnu"),
        ];
        for c in &candidates {
            if c.join("libcudart_static.a").is_file() {
                return c.clone();
            }
        }
        fail(format!(
            "error: nvcc found under {} but libcudart_static.a is in none of {:?}.\n\
             With the pip toolkit, install the matching runtime: pip install nvidia-cuda-runtime==13.0.96",
            root.display(),
            candidates
        ))
    }

    pub fn build() {
        for v in ["NVCC", "EDM2_CUDA_ARCHS"].iter().chain(ROOT_VARS.iter()) {
            println!("cargo:rerun-if-env-changed={v}");
        }
        let (nvcc, how) = find_nvcc();
        let nvcc = nvcc.canonicalize().unwrap_or(nvcc);
        let root = nvcc.parent().and_then(Path::parent).map(Path::to_path_buf).unwrap_or_default();
        let cudart_dir = find_cudart_dir(&root);
        let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
        let kernels = manifest.join("kernels");
        let files = super::kernel_sources(&kernels);

        let archs = env::var("EDM2_CUDA_ARCHS").unwrap_or_else(|_| "80,90".into());
        let archs: Vec<&str> = archs.split(',').map(str::trim).filter(|s| !s.is_empty()).collect();
        if archs.is_empty() {
            fail("error: EDM2_CUDA_ARCHS is empty (expected e.g. 80,90)".into());
        }
        // cc looks nvcc up through the NVCC process variable.
        env::set_var("NVCC", &nvcc);
        let mut base = cc::Build::new();
        base.cuda(true)
            .cudart("none") // linked below: cc's guess misses the pip layout
            .debug(false) // never -G (unoptimized device code)
            .opt_level(3)
            .include(&kernels)
            .flag("-std=c++17")
            .flag("-lineinfo")
            .flag("--expt-relaxed-constexpr")
            .flag("-Xcompiler=-Wno-unused-parameter");
        for a in &archs {
            base.flag("-gencode").flag(format!("arch=compute_{a},code=sm_{a}"));
        }
        let ptx = archs.last().unwrap();
        base.flag("-gencode").flag(format!("arch=compute_{ptx},code=compute_{ptx}"));
        base.flag("--threads=0");
        // One build per .cu: with several files cc switches to -rdc and a device-link step
        // that drops the PTX fallback.
        for f in &files {
            let stem = f.file_stem().unwrap().to_string_lossy().replace(['-', '.'], "_");
            base.clone().file(f).compile(&format!("edm2k_{stem}"));
        }
        println!("cargo:rustc-link-search=native={}", cudart_dir.display());
        println!("cargo:rustc-link-lib=static=cudart_static");
        for l in ["dl", "rt", "pthread"] {
            println!("cargo:rustc-link-lib=dylib={l}");
        }
        println!(
            "cargo:warning=edm2: kernels built by {} (found via {how}) for sm_{}; cudart_static from {}",
            nvcc.display(),
            archs.join(", sm_"),
            cudart_dir.display()
        );
        super::bindings(&kernels.join("edm2.h"), "cudarc::driver::sys::CUstream");
    }
}

#[cfg(all(feature = "cuda-sim", not(feature = "cuda")))]
mod sim {
    use std::path::PathBuf;

    pub fn build() {
        let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
        let kernels = root.join("kernels");
        println!("cargo:rerun-if-changed=sim/cuda_sim.h");
        let files = super::kernel_sources(&kernels);
        let tsan = cfg!(feature = "cuda-sim-tsan");
        // One build per file (one static library each), as the nvcc build does.
        for f in &files {
            let stem = f.file_stem().unwrap().to_string_lossy().replace(['-', '.'], "_");
            let mut build = cc::Build::new();
            if tsan {
                // Concurrent OS threads per block, instrumented: see sim/cuda_sim.h.
                build.define("EDM2_SIM_THREADS", None).flag("-fsanitize=thread").flag("-g");
            }
            build
                .cpp(true)
                .file(f)
                .include(&kernels)
                .flag("-x")
                .flag("c++")
                .flag("-std=c++20")
                .flag("-include")
                .flag(root.join("sim/cuda_sim.h").to_str().unwrap())
                .define("EDM2_SIM", None)
                .flag("-pthread")
                .flag("-fno-strict-aliasing")
                // Same arithmetic order as written.
                .flag("-ffp-contract=off")
                .warnings(true)
                // `#pragma unroll` is for nvcc.
                .flag("-Wno-unknown-pragmas")
                .opt_level(2)
                .compile(&format!("edm2sim_{stem}"));
        }
        println!("cargo:rustc-link-lib=dylib=pthread");
        if tsan {
            // The ThreadSanitizer runtime for every binary of the package (the Rust side is
            // not instrumented; it only launches kernels and reads results after the joins).
            // (rustc links with -nodefaultlibs: name the runtime library itself.)
            println!("cargo:rustc-link-arg=-fsanitize=thread");
            println!("cargo:rustc-link-lib=dylib=tsan");
        }
        super::bindings(&kernels.join("edm2.h"), "*mut ::std::os::raw::c_void");
    }
}
