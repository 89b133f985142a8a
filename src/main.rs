//! `edm2`: the command-line program. Each subcommand lives in `src/cli/<cmd>.rs`.

mod cli;

use clap::Parser;

fn main() {
    default_sigpipe();
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
