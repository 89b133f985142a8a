//! Build script. Without features nothing happens. With `cuda-sim`, every `kernels/*.cu`
//! is compiled by the host C++ compiler against our simulation header
//! (`sim/cuda_sim.h`: blocks, barriers and warp collectives executed on the CPU, see
//! that file) and bindgen turns `kernels/edm2.h` into the Rust FFI. The `cuda` feature
//! (nvcc, sm_80 + sm_90 + PTX, static cudart) builds on the same files: see the CUDA issue.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    #[cfg(feature = "cuda-sim")]
    sim::build();
}

#[cfg(feature = "cuda-sim")]
mod sim {
    use std::path::{Path, PathBuf};

    pub fn build() {
        let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
        let kernels = root.join("kernels");
        println!("cargo:rerun-if-changed=kernels");
        println!("cargo:rerun-if-changed=sim");
        let mut files: Vec<PathBuf> = std::fs::read_dir(&kernels)
            .expect("kernels/ exists")
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "cu"))
            .collect();
        files.sort();
        // One build per file (one static library each), as the nvcc build does.
        for f in &files {
            let stem = f.file_stem().unwrap().to_string_lossy().into_owned();
            cc::Build::new()
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
                // Same arithmetic order as written (nvcc builds use --fmad=false to match).
                .flag("-ffp-contract=off")
                .warnings(true)
                .opt_level(2)
                .compile(&format!("edm2sim_{stem}"));
        }
        println!("cargo:rustc-link-lib=dylib=pthread");
        bindings(&kernels.join("edm2.h"));
    }

    fn bindings(header: &Path) {
        let out = PathBuf::from(std::env::var("OUT_DIR").unwrap()).join("edm2_ffi.rs");
        let b = bindgen::Builder::default()
            .header(header.to_str().unwrap())
            .allowlist_function("edm2_.*")
            .allowlist_type("cudaStream_t")
            .generate()
            .unwrap_or_else(|e| {
                panic!(
                    "bindgen could not parse {}: {e}\n\
                     bindgen needs libclang: apt-get install -y libclang-dev (Debian), or set LIBCLANG_PATH",
                    header.display()
                )
            });
        b.write_to_file(&out).expect("writing the FFI bindings");
    }
}
