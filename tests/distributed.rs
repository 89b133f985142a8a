//! Data-parallel training across CPU processes on MPI (issue 20), end to end through
//! `edm2 train --nproc-per-node N`: 2 and 4 processes at global batch B train as one
//! process at batch B (same images, noise, σ and dropout masks; gradients summed over the
//! ranks), a run resumes at another world size, a stop asked of one rank stops all after
//! the same step with one checkpoint, a killed rank ends the run with an error.
//! Needs the `mpi` feature and Open MPI's mpirun (CI installs both).
#![cfg(feature = "mpi")]

use edm2::io::safetensors;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("edm2-dist-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A tiny labelled net with attention and dropout (so the dropout masks' seeds matter).
fn tiny_config(dir: &Path) -> String {
    let p = dir.join("tiny.json");
    std::fs::write(
        &p,
        r#"{"img_resolution": 32, "img_channels": 1, "label_dim": 10, "model_channels": 8, "channel_mult": [1, 2],
            "num_blocks": 1, "attn_resolutions": [16], "channels_per_head": 8, "dropout": 0.1, "use_fp16": false}"#,
    )
    .unwrap();
    p.to_str().unwrap().to_string()
}

const COMMON: &[&str] = &[
    "--max-size", "500", "--batch", "32", "--batch-gpu", "8", "--status", "32", "--snapshot", "0", "--checkpoint", "0", "--preview", "0",
    "--dynamics", "0", "--seed", "3", "--lr", "0.01", "--rampup", "0", "--decay", "0", "--no-verify",
];

fn train(cfg: &str, dir: &Path, nproc: usize, extra: &[&str]) -> String {
    let n = nproc.to_string();
    let mut args = vec!["train", cfg, "--outdir", dir.to_str().unwrap(), "--nproc-per-node", &n];
    args.extend_from_slice(COMMON);
    args.extend_from_slice(extra);
    let out = Command::new(env!("CARGO_BIN_EXE_edm2")).args(&args).output().unwrap();
    let (o, e) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{nproc} processes: {o}\n{e}");
    o.into_owned()
}

/// The largest relative L2 difference over the tensors of two training states.
fn max_rel_l2(a: &Path, b: &Path) -> (f64, String) {
    let (fa, fb) = (safetensors::read(a).unwrap(), safetensors::read(b).unwrap());
    assert_eq!(fa.tensors.len(), fb.tensors.len());
    for k in ["edm2.nimg", "edm2.adam_step"] {
        assert_eq!(fa.metadata[k], fb.metadata[k], "{k}");
    }
    let mut worst = (0.0f64, String::new());
    for ((na, ta), (nb, tb)) in fa.tensors.iter().zip(&fb.tensors) {
        assert_eq!(na, nb);
        let (mut d, mut n) = (0.0f64, 0.0f64);
        for (x, y) in ta.data.iter().zip(&tb.data) {
            d += (*x as f64 - *y as f64).powi(2);
            n += (*x as f64).powi(2);
        }
        let r = if n > 0.0 { (d / n).sqrt() } else { d.sqrt() };
        if r > worst.0 || worst.1.is_empty() {
            worst = (r, na.clone());
        }
    }
    worst
}

#[test]
fn two_and_four_processes_train_as_one_and_resume_at_another_world_size() {
    let d = tmp("equal");
    let cfg = tiny_config(&d);
    // The newest training state (a resumed run below 1 kimg adds the images to the name).
    let state = |dir: &Path| edm2::train::state::list_states(dir).unwrap().pop().unwrap();
    // 4 steps of 32 images: 4 passes of 8 per step, dealt out over the ranks.
    let one = d.join("one");
    train(&cfg, &one, 1, &["--duration", "128"]);
    for n in [2, 4] {
        let dir = d.join(format!("n{n}"));
        let out = train(&cfg, &dir, n, &["--duration", "128"]);
        assert!(out.contains(&format!("Ranks joined (MPI, {n} processes)")), "{out}");
        // Rank 0 alone writes: one log, one state.
        let log = std::fs::read_to_string(dir.join("log.txt")).unwrap();
        assert_eq!(log.matches("Saved training-state-0000000").count(), 1, "{log}");
        let (r, name) = max_rel_l2(&state(&one), &state(&dir));
        assert!(r <= 1e-5, "{n} processes: relative L2 difference {r:.2e} in {name}");
        // Summation order differs, so the bits may too, but not the images: a run that
        // saw other images would differ by far more.
        eprintln!("{n} processes against one: max relative L2 {r:.2e} ({name})");
    }
    // The loss in the status lines is the global batch's (summed over the ranks).
    let loss = |dir: &Path| -> Vec<f64> {
        let stats = std::fs::read_to_string(dir.join("stats.jsonl")).unwrap();
        stats.lines().filter_map(|l| l.split("\"Loss/loss\":").nth(1).map(|v| v.split([',', '}']).next().unwrap().parse().unwrap())).collect()
    };
    let (l1, l2) = (loss(&one), loss(&d.join("n2")));
    assert_eq!(l1.len(), 4);
    assert!(l1.iter().zip(&l2).all(|(a, b)| (a - b).abs() <= 1e-5 * a.abs()), "{l1:?} vs {l2:?}");

    // Resume at another world size: 2 steps on 2 processes, 2 more on 4 (then on 1),
    // against one process straight through.
    let mixed = d.join("mixed");
    let out = train(&cfg, &mixed, 2, &["--duration", "128", "--slice", "64"]);
    assert!(out.contains("Slice done"), "{out}");
    let out = train(&cfg, &mixed, 4, &["--duration", "128"]);
    assert!(out.contains("Resuming from") && out.contains("Training finished"), "{out}");
    let (r, name) = max_rel_l2(&state(&one), &state(&mixed));
    assert!(r <= 1e-5, "resumed at another world size: relative L2 difference {r:.2e} in {name}");

    // A global batch that does not split is refused before any work, naming the numbers.
    let out = Command::new(env!("CARGO_BIN_EXE_edm2"))
        .args(["train", &cfg, "--outdir", d.join("bad").to_str().unwrap(), "--nproc-per-node", "3"])
        .args(COMMON)
        .args(["--duration", "128"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("--batch 32 must be a multiple of --batch-gpu 8 times the 3 processes"), "{err}");
}

/// The pid of rank `r` from rank 0's roll call in log.txt (waits for it).
fn rank_pid(dir: &Path, r: usize) -> i32 {
    let t = Instant::now();
    loop {
        let log = std::fs::read_to_string(dir.join("log.txt")).unwrap_or_default();
        if let Some(line) = log.lines().find(|l| l.starts_with("Ranks joined")) {
            let part = line.split(&format!("rank {r} on ")).nth(1).unwrap();
            return part.split("(pid ").nth(1).unwrap().split(',').next().unwrap().parse().unwrap();
        }
        assert!(t.elapsed() < Duration::from_secs(120), "no roll call in {}", dir.display());
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until the run has trained at least one step (a status line past kimg 0).
fn wait_for_steps(dir: &Path) {
    let t = Instant::now();
    while std::fs::read_to_string(dir.join("stats.jsonl")).unwrap_or_default().lines().count() < 2 {
        assert!(t.elapsed() < Duration::from_secs(120), "no training in {}", dir.display());
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn signal(pid: i32, sig: i32) {
    extern "C" {
        fn kill(pid: i32, sig: i32) -> i32;
    }
    // SAFETY: signals a process this test started (or its worker).
    assert_eq!(unsafe { kill(pid, sig) }, 0);
}

/// A long 2-process run in `dir`, its output (both streams) going to `dir`.out.
fn spawn(cfg: &str, dir: &Path) -> std::process::Child {
    let out = std::fs::File::create(dir.with_extension("out")).unwrap();
    Command::new(env!("CARGO_BIN_EXE_edm2"))
        .args(["train", cfg, "--outdir", dir.to_str().unwrap(), "--nproc-per-node", "2", "--duration", "100Ki"])
        .args(COMMON)
        .stdout(Stdio::from(out.try_clone().unwrap()))
        .stderr(Stdio::from(out))
        .spawn()
        .unwrap()
}

/// Waits for the run to end (success, output); a run still going after `limit` is a hang:
/// it is ended (two SIGTERMs to the launcher: the second ends mpirun's job) and the test
/// fails.
fn finish(mut child: std::process::Child, dir: &Path, limit: Duration) -> (bool, String) {
    let t = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if t.elapsed() > limit {
            signal(child.id() as i32, 15);
            std::thread::sleep(Duration::from_secs(1));
            signal(child.id() as i32, 15);
            let _ = child.wait();
            panic!("the run in {} did not end within {limit:?}: {}", dir.display(), std::fs::read_to_string(dir.with_extension("out")).unwrap_or_default());
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    (status.success(), std::fs::read_to_string(dir.with_extension("out")).unwrap())
}

#[test]
fn a_stop_on_one_rank_or_at_the_launcher_stops_all_with_one_checkpoint_and_a_killed_rank_ends_the_run() {
    let d = tmp("signals");
    let cfg = tiny_config(&d);
    // SIGUSR1 (the launcher's word for Ctrl-C) to rank 1 only; then Ctrl-C at the launcher.
    for (case, by_launcher) in [("rank1", false), ("launcher", true)] {
        let dir = d.join(case);
        let child = spawn(&cfg, &dir);
        wait_for_steps(&dir);
        if by_launcher {
            signal(child.id() as i32, 2);
        } else {
            signal(rank_pid(&dir, 1), 10);
        }
        let (ok, out) = finish(child, &dir, Duration::from_secs(120));
        assert!(ok && out.contains("Interrupted"), "{case}: {out}");
        let states: Vec<_> = std::fs::read_dir(&dir).unwrap().flatten().filter(|e| e.file_name().to_string_lossy().starts_with("training-state-")).collect();
        assert_eq!(states.len(), 1, "{case}: one checkpoint");
        let st = safetensors::read(states[0].path()).unwrap();
        let nimg: u64 = st.metadata["edm2.nimg"].parse().unwrap();
        assert!(nimg > 0 && nimg % 32 == 0, "{case}: stopped after a whole step ({nimg})");
    }
    // An error on one rank (here rank 0: the run directory is in use) ends every rank at
    // once with that error, while the others wait for it in a collective: no hang.
    let dir = d.join("locked");
    std::fs::create_dir_all(&dir).unwrap();
    let lock = edm2::train::rundir::RunDirLock::acquire(&dir).unwrap();
    let (ok, out) = finish(spawn(&cfg, &dir), &dir, Duration::from_secs(60));
    assert!(!ok && out.contains("error (rank 0 of 2)") && out.contains("is in use by another edm2 train"), "{out}");
    drop(lock);
    // A killed rank: the run ends with an error, not a hang.
    let dir = d.join("killed");
    let child = spawn(&cfg, &dir);
    wait_for_steps(&dir);
    signal(rank_pid(&dir, 1), 9);
    let (ok, out) = finish(child, &dir, Duration::from_secs(120));
    assert!(!ok && out.contains("workers did not all finish"), "{out}");
}

/// Ranks that read different data (here: rank 1 started with another `--max-size`, as a
/// different folder behind the same path on another machine would be) are refused at
/// the roll call, with both datasets named, and the job ends instead of training on
/// other images. Started as an MPMD `mpirun` (one program line per rank).
#[test]
fn ranks_reading_different_data_are_refused() {
    let d = tmp("data-differs");
    let cfg = tiny_config(&d);
    let run = d.join("run");
    let line = |max_size: &'static str| -> Vec<String> {
        let mut a: Vec<String> = vec![env!("CARGO_BIN_EXE_edm2").into(), "train".into(), cfg.clone(), "--outdir".into(), run.to_str().unwrap().into()];
        let mut it = COMMON.iter();
        while let Some(x) = it.next() {
            if *x == "--max-size" {
                it.next();
                continue;
            }
            a.push(x.to_string());
        }
        a.extend(["--max-size".to_string(), max_size.to_string(), "--threads".into(), "1".into()]);
        a
    };
    let mut args: Vec<String> = vec!["--oversubscribe".into(), "--bind-to".into(), "none".into(), "-np".into(), "1".into()];
    args.extend(line("500"));
    args.extend([":".into(), "-np".into(), "1".into()]);
    args.extend(line("400"));
    let out = std::fs::File::create(run.with_extension("out")).unwrap();
    let child = Command::new("mpirun")
        .args(&args)
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .stdout(Stdio::from(out.try_clone().unwrap()))
        .stderr(Stdio::from(out))
        .spawn()
        .unwrap();
    let (ok, text) = finish(child, &run, Duration::from_secs(60));
    assert!(!ok, "the run should fail: {text}");
    assert!(text.contains("the ranks read different data"), "{text}");
    assert!(text.contains("rank 0 reads 500 items") && text.contains("rank 1 reads 400 items"), "{text}");
    assert!(!run.join("training-state-0000000.safetensors").exists(), "no training state may be written");
}

/// GPU ranks (the simulated device of the `cuda-sim` build) under mpirun: the device step
/// sums its gradients through the engine's host path ([`edm2::dist::Collective::sum_device`]'s
/// default: download, MPI all-reduce, upload) and 2 processes train as one. And the GPU
/// launcher (`--nproc-per-node N --device cuda`, torchrun's variables, NCCL) in a build
/// without CUDA: every worker says why it cannot join, and the launcher names a failed rank.
#[cfg(feature = "cuda-sim")]
#[test]
fn simulated_gpu_ranks_under_mpirun_train_as_one_gpu() {
    let d = tmp("gpu-sim");
    // The simulator runs every CUDA thread on the CPU (~30 s per pass of this tiny net):
    // an 8x8 net with attention and dropout, one step of 16 images (2 passes of 8 on one
    // process, one on each of two).
    let cfg = d.join("tiny8.json");
    std::fs::write(
        &cfg,
        r#"{"img_resolution": 8, "img_channels": 1, "label_dim": 10, "model_channels": 8, "channel_mult": [1, 2],
            "num_blocks": 1, "attn_resolutions": [4], "channels_per_head": 8, "dropout": 0.1, "use_fp16": false}"#,
    )
    .unwrap();
    let cfg = cfg.to_str().unwrap().to_string();
    // COMMON with batch (and status interval) 16.
    let common: Vec<&str> = COMMON.iter().map(|&s| if s == "32" { "16" } else { s }).collect();
    let state = |dir: &Path| edm2::train::state::list_states(dir).unwrap().pop().unwrap();
    let run = |dir: &Path, mpi: bool| {
        let mut args: Vec<String> = vec![];
        if mpi {
            args.extend(["--oversubscribe", "--bind-to", "none", "-np", "2", env!("CARGO_BIN_EXE_edm2")].map(String::from));
        }
        args.extend(["train", &cfg, "--outdir", dir.to_str().unwrap(), "--device", "cuda", "--duration", "16", "--threads", "1"].map(String::from));
        args.extend(common.iter().map(|s| s.to_string()));
        let out = Command::new(if mpi { "mpirun" } else { env!("CARGO_BIN_EXE_edm2") })
            .args(&args)
            .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
            .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
            .output()
            .unwrap();
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "{text}");
        text
    };
    let one = d.join("one");
    run(&one, false);
    let two = d.join("two");
    let out = run(&two, true);
    assert!(out.contains("Ranks joined (MPI, 2 processes)"), "{out}");
    let (r, name) = max_rel_l2(&state(&one), &state(&two));
    assert!(r <= 1e-5, "2 simulated GPU ranks against one: relative L2 difference {r:.2e} in {name}");
    eprintln!("2 simulated GPU ranks against one: max relative L2 {r:.2e} ({name})");

    let out = Command::new(env!("CARGO_BIN_EXE_edm2"))
        .args(["train", &cfg, "--outdir", d.join("launcher").to_str().unwrap(), "--device", "cuda", "--nproc-per-node", "2", "--duration", "16"])
        .args(&common)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("torchrun started this process as rank") || err.contains("built without CUDA"), "{err}");
    assert!(err.contains("the 2 GPU workers did not all finish: rank"), "{err}");
    // `--nproc-per-node 1` written out with --device cuda goes through the launcher too (a
    // one-rank NCCL group): here the worker says why it cannot, naming edm2's launcher.
    let out = Command::new(env!("CARGO_BIN_EXE_edm2"))
        .args(["train", &cfg, "--outdir", d.join("launcher1").to_str().unwrap(), "--device", "cuda", "--nproc-per-node", "1", "--duration", "16"])
        .args(&common)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("edm2's --nproc-per-node launcher started this process as rank 0 of 1"), "{err}");
    assert!(err.contains("the 1 GPU workers did not all finish: rank 0"), "{err}");
}
