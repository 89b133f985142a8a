//! `edm2`: the command-line program. Each subcommand lives in `src/cli/<cmd>.rs`.

mod cli;

use clap::Parser;

fn main() {
    default_sigpipe();
    keep_freed_memory();
    let args = cli::Cli::parse();
    if let Err(e) = cli::run(args) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// A closed output pipe (`edm2 info | head -1`) ends the process quietly, as for any Unix
/// tool, instead of a panic on the next `println!` (Rust ignores SIGPIPE by default).
fn default_sigpipe() {
    #[cfg(unix)]
    {
        extern "C" {
            fn signal(signum: i32, handler: usize) -> usize;
        }
        // SAFETY: restores the default action (SIG_DFL = 0) of SIGPIPE (13 on Linux and
        // the BSDs) before any thread starts; no handler of ours is involved.
        unsafe {
            signal(13, 0);
        }
    }
}

/// glibc returns every large freed buffer to the kernel (each is its own mmap, or the heap
/// top is trimmed), so the next step's buffers of the same sizes are page-faulted in again,
/// 4 KiB at a time: measured ~7-10% of a cpu-s32 training step (fp32 and bf16, docs/perf.md).
/// Serving them from the heap and keeping freed memory for reuse removes that; the peak
/// resident memory is the same (the steps repeat the same sizes).
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        extern "C" {
            fn mallopt(param: i32, value: i32) -> i32;
        }
        const M_TRIM_THRESHOLD: i32 = -1;
        const M_TOP_PAD: i32 = -2;
        const M_MMAP_MAX: i32 = -4;
        // SAFETY: glibc's documented tuning calls, made before any allocation-heavy work
        // and before other threads exist; a rejected value leaves the default.
        unsafe {
            mallopt(M_MMAP_MAX, 0);
            mallopt(M_TRIM_THRESHOLD, i32::MAX);
            mallopt(M_TOP_PAD, 64 << 20);
        }
    }
}
