//! Runs that go wrong end in a clear error and lose nothing (issue 15, item 5 and the
//! argument checks of item 4): a locked run directory, partial files, corrupt states,
//! interrupted states beside periodic checkpoints, divergence, steps too big for the
//! machine, and bad `generate` arguments caught before any work.

use edm2::io::safetensors::{self, Dtype};
use edm2::train::rundir::RunDirLock;
use edm2::train::state::list_states;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn edm2(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_edm2")).args(args).output().unwrap()
}

fn text(o: &Output) -> String {
    format!("{}\n{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// Exit code 1 (an error, not a panic's 101 or an abort's 134) with `needle` in stderr.
fn fails_with(o: &Output, needle: &str) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "expected exit 1\n{}", text(o));
    assert!(err.contains(needle), "expected '{needle}' in stderr:\n{}", text(o));
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("edm2-guard-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn tiny_config(dir: &Path) -> String {
    let p = dir.join("tiny.json");
    std::fs::write(
        &p,
        r#"{"img_resolution": 32, "img_channels": 1, "label_dim": 10, "model_channels": 8, "channel_mult": [1, 2],
            "num_blocks": 1, "attn_resolutions": [16], "channels_per_head": 8, "dropout": 0.0, "use_fp16": false}"#,
    )
    .unwrap();
    s(&p).to_string()
}

/// `train` of the tiny net on 300 built-in images, batch 16, checkpoints every 1024.
fn train(cfg: &str, out: &Path, duration: &str, extra: &[&str]) -> Output {
    let mut args = vec![
        "train", cfg, "--outdir", s(out), "--max-size", "300", "--batch", "16", "--duration", duration, "--status", "512",
        "--snapshot", "1024", "--checkpoint", "1024", "--preview", "0", "--rampup", "0",
    ];
    args.extend_from_slice(extra);
    edm2(&args)
}

fn nimg_of(p: &Path) -> u64 {
    safetensors::read_header(p).unwrap().metadata["edm2.nimg"].parse().unwrap()
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    v.sort();
    v
}

#[test]
fn a_second_train_on_the_same_run_directory_is_refused_and_a_dead_holder_leaves_no_lock() {
    let d = tmp("lock");
    let cfg = tiny_config(&d);
    let out = d.join("run");
    std::fs::create_dir_all(&out).unwrap();
    // Held by this process: the program must refuse and name us.
    {
        let _held = RunDirLock::acquire(&out).unwrap();
        let o = train(&cfg, &out, "1024", &[]);
        fails_with(&o, &format!("in use by another edm2 train (pid {}", std::process::id()));
        assert!(list_states(&out).unwrap().is_empty(), "the refused run wrote nothing");
        // Also within one process (a library caller): the lock is per open file.
        assert!(RunDirLock::acquire(&out).is_err());
    }
    // A holder killed with SIGKILL leaves no stale lock.
    let mut child = Command::new(env!("CARGO_BIN_EXE_edm2"))
        .args(["train", &cfg, "--outdir", s(&out), "--max-size", "64", "--batch", "16", "--duration", "1Mi", "--preview", "0"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let want = format!("pid {} ", child.id());
    let t = std::time::Instant::now();
    while !std::fs::read_to_string(out.join("train.lock")).unwrap_or_default().contains(&want) {
        assert!(t.elapsed().as_secs() < 60, "the child never took the lock");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(RunDirLock::acquire(&out).is_err(), "the running child holds the lock");
    child.kill().unwrap();
    child.wait().unwrap();
    let lock = RunDirLock::acquire(&out).expect("a killed holder's lock is released");
    drop(lock);
    let o = train(&cfg, &out, "1024", &[]);
    assert!(o.status.success(), "{}", text(&o));
}

#[test]
fn partial_files_of_earlier_runs_are_removed_and_nothing_else() {
    let d = tmp("partial");
    let cfg = tiny_config(&d);
    let out = d.join("run");
    std::fs::create_dir_all(&out).unwrap();
    // Writers that are gone: pids above the kernel's maximum (2^22) are never alive.
    let partial = [".training-state-0000001.safetensors.tmp4194304", ".network-snapshot-0000001-0.100.safetensors.tmp4194399"];
    // Not ours, or of a writer still alive (this test process).
    let live = format!(".preview-0000002.png.tmp{}", std::process::id());
    let kept = ["notes.tmp1", ".hidden", "my.safetensors.tmp", live.as_str()];
    for f in partial.iter().chain(&kept) {
        std::fs::write(out.join(f), b"partial bytes").unwrap();
    }
    let o = train(&cfg, &out, "1024", &[]);
    assert!(o.status.success(), "{}", text(&o));
    let now = names(&out);
    for f in partial {
        assert!(!now.contains(&f.to_string()), "{f} should be removed: {now:?}");
        assert!(text(&o).contains(f), "the removal of {f} is logged\n{}", text(&o));
    }
    for f in kept {
        assert!(now.contains(&f.to_string()), "{f} is not a partial file of ours: {now:?}");
    }
}

#[test]
fn a_corrupt_newest_state_is_set_aside_and_the_run_resumes_from_the_newest_valid_one() {
    let d = tmp("corrupt");
    let cfg = tiny_config(&d);
    let out = d.join("run");
    let o = train(&cfg, &out, "3072", &[]);
    assert!(o.status.success(), "{}", text(&o));
    let states = list_states(&out).unwrap();
    assert_eq!(states.iter().map(|p| nimg_of(p)).collect::<Vec<_>>(), vec![1024, 2048, 3072]);
    // Newest: truncated (a full disk); the one before: a NaN in a weight.
    let newest = std::fs::read(&states[2]).unwrap();
    std::fs::write(&states[2], &newest[..newest.len() / 2]).unwrap();
    let f = safetensors::read(&states[1]).unwrap();
    let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = f.tensors.iter().map(|(n, t)| (n.clone(), t.shape.clone(), t.data.clone())).collect();
    let k = tensors.iter().position(|t| t.0.starts_with("net/") && t.2.len() > 4).unwrap();
    tensors[k].2[3] = f32::NAN;
    let refs: Vec<(&str, &[usize], &[f32])> = tensors.iter().map(|(n, sh, v)| (n.as_str(), sh.as_slice(), v.as_slice())).collect();
    safetensors::write(&states[1], &refs, &f.metadata, Dtype::F32).unwrap();
    let bad_nan = std::fs::read(&states[1]).unwrap();

    let o = train(&cfg, &out, "4096", &[]);
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(t.contains("is corrupt, kept as") && t.contains("non-finite") && t.contains(&tensors[k].0), "{t}");
    assert!(t.contains(&format!("Resuming from {}", states[0].display())), "{t}");
    // The bad files are kept, byte for byte, under new names; the run ends at 4096.
    let aside = |p: &Path| PathBuf::from(format!("{}.corrupt", p.display()));
    assert_eq!(std::fs::read(aside(&states[2])).unwrap(), &newest[..newest.len() / 2]);
    assert_eq!(std::fs::read(aside(&states[1])).unwrap(), bad_nan);
    let now: Vec<u64> = list_states(&out).unwrap().iter().map(|p| nimg_of(p)).collect();
    assert_eq!(now, vec![1024, 2048, 3072, 4096]);

    // Every state corrupt: an error that says so (exit 1), the files kept, and again on
    // the next invocation (a fresh run would overwrite the snapshots) until they are moved.
    for p in list_states(&out).unwrap() {
        std::fs::write(&p, b"garbage").unwrap();
    }
    let o = train(&cfg, &out, "4096", &[]);
    fails_with(&o, "no valid training state to resume from (6 corrupt");
    assert_eq!(names(&out).iter().filter(|n| n.contains(".corrupt")).count(), 6);
    fails_with(&train(&cfg, &out, "4096", &[]), "use another --outdir, or move the .corrupt files away");
    let aside = d.join("aside");
    std::fs::create_dir_all(&aside).unwrap();
    for n in names(&out).iter().filter(|n| n.contains(".corrupt")) {
        std::fs::rename(out.join(n), aside.join(n)).unwrap();
    }
    let o = train(&cfg, &out, "1024", &[]);
    assert!(o.status.success() && !text(&o).contains("Resuming"), "{}", text(&o));

    // A well-formed state of another network is an error naming it, never set aside.
    let other = d.join("other");
    let o = train(&cfg, &other, "1024", &[]);
    assert!(o.status.success(), "{}", text(&o));
    let st = other.join("training-state-0000001.safetensors");
    let f = safetensors::read(&st).unwrap();
    let mut meta = f.metadata.clone();
    meta.insert("edm2.ema".into(), r#"{"kind":"power","stds":[0.05,0.1,0.2]}"#.into());
    let tensors: Vec<(String, Vec<usize>, Vec<f32>)> = f.tensors.iter().map(|(n, t)| (n.clone(), t.shape.clone(), t.data.clone())).collect();
    let refs: Vec<(&str, &[usize], &[f32])> = tensors.iter().map(|(n, sh, v)| (n.as_str(), sh.as_slice(), v.as_slice())).collect();
    safetensors::write(&st, &refs, &meta, Dtype::F32).unwrap();
    // (Metadata that disagrees with the tensors is damage: set aside, with the counts.)
    let o = train(&cfg, &other, "2048", &[]);
    fails_with(&o, "no valid training state");
    assert!(text(&o).contains("3 EMA(s)"), "{}", text(&o));
    std::fs::rename(format!("{}.corrupt", st.display()), &st).unwrap();
    let mut cfg2: serde_json::Value = serde_json::from_str(&f.metadata["edm2.config"]).unwrap();
    cfg2["model_channels"] = serde_json::json!(1_000_000);
    let mut meta = f.metadata.clone();
    meta.insert("edm2.config".into(), cfg2.to_string());
    safetensors::write(&st, &refs, &meta, Dtype::F32).unwrap();
    let o = train(&cfg, &other, "2048", &[]);
    fails_with(&o, "cannot resume from");
    assert!(st.exists(), "not renamed");
}

#[test]
fn an_interrupted_state_never_replaces_a_periodic_checkpoint() {
    let d = tmp("names");
    let cfg = tiny_config(&d);
    let out = d.join("run");
    let o = train(&cfg, &out, "4096", &["--slice", "1024"]);
    assert!(o.status.success(), "{}", text(&o));
    let periodic = out.join("training-state-0000001.safetensors");
    let before = std::fs::read(&periodic).unwrap();
    // Stopped 32 images later (kimg 1 again), as an interrupt or a slice would.
    let o = train(&cfg, &out, "4096", &["--slice", "32"]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(std::fs::read(&periodic).unwrap(), before, "the periodic checkpoint is untouched");
    let exact = out.join("training-state-0000001-1056.safetensors");
    assert_eq!(nimg_of(&exact), 1056);
    assert_eq!(list_states(&out).unwrap(), vec![periodic.clone(), exact.clone()]);
    // The next invocation resumes from the newer one and goes on to the next checkpoint.
    let o = train(&cfg, &out, "4096", &["--slice", "992"]);
    assert!(text(&o).contains(&format!("Resuming from {}", exact.display())), "{}", text(&o));
    assert_eq!(nimg_of(&list_states(&out).unwrap().pop().unwrap()), 2048);
}

#[test]
fn a_diverged_run_stops_with_an_error_and_keeps_its_last_finite_state() {
    let d = tmp("diverge");
    let cfg = tiny_config(&d);
    let out = d.join("run");
    let o = train(&cfg, &out, "1024", &[]);
    assert!(o.status.success(), "{}", text(&o));
    let state = out.join("training-state-0000001.safetensors");
    let before = std::fs::read(&state).unwrap();
    let snaps = names(&out);
    // A learning rate whose first update overflows f32.
    let o = train(&cfg, &out, "4096", &["--lr", "1e38"]);
    fails_with(&o, "training diverged at step 65 (1040 images): tensor '");
    fails_with(&o, &format!("The newest training state, {}, is finite", state.display()));
    assert_eq!(std::fs::read(&state).unwrap(), before);
    // Nothing new but the log lines: no snapshot, no state of the diverged step.
    assert_eq!(names(&out), snaps);
    let st = edm2::train::state::TrainState::load(&state).unwrap();
    let net = edm2::Precond::new(&st.config).unwrap();
    assert_eq!(st.first_nonfinite(&net.specs), None);
    // Without any state yet: says so.
    let o = train(&cfg, &d.join("fresh"), "1024", &["--lr", "1e38"]);
    fails_with(&o, "No training state had been written yet");
}

/// Peak resident memory of a finished run (stats.jsonl) against the estimate it logged.
#[test]
fn a_step_too_big_for_the_machine_is_refused_before_training_and_the_estimate_is_close() {
    let d = tmp("memory");
    // 512x512 images: the default network at that size needs hundreds of GiB a step.
    let data = d.join("big");
    std::fs::create_dir_all(&data).unwrap();
    for i in 0..2 {
        let mut buf = Vec::new();
        {
            let mut enc = png::Encoder::new(&mut buf, 512, 512);
            enc.set_color(png::ColorType::Grayscale);
            enc.set_depth(png::BitDepth::Eight);
            enc.write_header().unwrap().write_image_data(&vec![i as u8 * 100; 512 * 512]).unwrap();
        }
        std::fs::write(data.join(format!("img{i}.png")), buf).unwrap();
    }
    let t = std::time::Instant::now();
    let o = edm2(&["train", "--data", s(&data), "--outdir", s(&d.join("run")), "--duration", "64"]);
    fails_with(&o, "a training step needs about");
    fails_with(&o, "of memory on this machine is available");
    assert!(t.elapsed().as_secs() < 20, "refused before any work");
    assert!(list_states(&d.join("run")).unwrap().is_empty());

    // The estimate against a real run's peak where activations dominate.
    let cfg = tiny_config(&d);
    let out = d.join("measured");
    let o = edm2(&[
        "train", &cfg, "--outdir", s(&out), "--max-size", "256", "--batch", "256", "--duration", "512", "--status", "256",
        "--snapshot", "0", "--checkpoint", "0", "--preview", "0",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let log = std::fs::read_to_string(out.join("log.txt")).unwrap();
    let est: f64 = log.split("Memory: about ").nth(1).unwrap().split(' ').next().unwrap().parse().unwrap();
    let peak = std::fs::read_to_string(out.join("stats.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["Resources/peak_cpu_mem_gb"].as_f64().unwrap())
        .fold(0.0, f64::max);
    let ratio = est / peak;
    eprintln!("step memory: estimate {est:.3} GiB, measured peak RSS {peak:.3} GiB, ratio {ratio:.2}");
    assert!((0.6..1.6).contains(&ratio), "estimate {est:.3} GiB vs measured peak {peak:.3} GiB (ratio {ratio:.2})");
}

#[test]
fn generate_checks_its_arguments_before_any_work() {
    let d = tmp("generate");
    let file = d.join("a-file");
    std::fs::write(&file, b"x").unwrap();
    // The net does not exist: each error must come first, from the argument named.
    let missing = s(&d.join("missing.safetensors")).to_string();
    let gen = |extra: &[&str]| {
        let mut a = vec!["generate", "--net", missing.as_str(), "--outdir", s(&d)];
        a.extend_from_slice(extra);
        edm2(&a)
    };
    let t = std::time::Instant::now();
    fails_with(&gen(&["--seeds", "0-18446744073709551615"]), "--seeds '0-18446744073709551615' selects more than");
    fails_with(&gen(&["--seeds", "0-9999999,0-9999999"]), "selects more than");
    assert!(t.elapsed().as_secs() < 10, "no seed list is materialized");
    fails_with(&gen(&["--seeds", "5-2"]), "end before start");
    fails_with(&gen(&["--seeds", "1-x"]), "--seeds: bad seed range '1-x'");
    fails_with(&gen(&["--guidance", "nan", "--gnet", missing.as_str()]), "--guidance NaN must be a finite number");
    fails_with(&gen(&["--guidance", "inf", "--gnet", missing.as_str()]), "--guidance inf must be a finite number");
    fails_with(&gen(&["--S_churn=-1"]), "--S_churn -1 must be at least 0");
    fails_with(&gen(&["--S_noise", "nan"]), "--S_noise NaN must be a finite number");
    fails_with(&gen(&["--S_min", "2", "--S_max", "1"]), "--S_max 1 must be a number at least --S_min 2");
    fails_with(&gen(&["--S_max", "nan"]), "--S_max NaN");
    fails_with(&gen(&["--steps", "100000000"]), "--steps 100000000 is more than");
    fails_with(&edm2(&["generate", "--net", &missing, "--outdir", s(&file)]), "--outdir");
    fails_with(&edm2(&["generate", "--net", &missing, "--outdir", s(&file)]), "exists and is not a directory");
    fails_with(&gen(&["--grid", s(&d.join("no/such/dir/g.png"))]), "--grid");
    fails_with(&gen(&["--save-raw", s(&d)]), "--save-raw");
    // All arguments good: now the missing net is the error.
    fails_with(&gen(&[]), "missing.safetensors");
}

#[test]
fn a_training_state_given_as_a_network_says_so() {
    let d = tmp("state-as-net");
    let cfg = tiny_config(&d);
    let out = d.join("run");
    let o = train(&cfg, &out, "1024", &[]);
    assert!(o.status.success(), "{}", text(&o));
    let state = out.join("training-state-0000001.safetensors");
    let o = edm2(&["generate", "--net", s(&state), "--outdir", s(&d.join("img")), "--seeds", "0"]);
    fails_with(&o, "is a training state");
    fails_with(&o, "network-snapshot-");
    let snap = out.join("network-snapshot-0000001-0.100.safetensors");
    let o = edm2(&["generate", "--net", s(&snap), "--outdir", s(&d.join("img")), "--seeds", "0-1", "--steps", "2"]);
    assert!(o.status.success(), "{}", text(&o));
    // A --noise file whose churn noise or labels have the wrong shape: named, not a panic.
    let noise = d.join("noise.safetensors");
    let z = vec![0.0f32; 2 * 32 * 32];
    let bad_churn: &[(&str, &[usize], &[f32])] = &[("noise", &[2, 1, 32, 32], &z), ("churn_noise", &[3], &[0.0; 3])];
    let bad_labels: &[(&str, &[usize], &[f32])] = &[("noise", &[2, 1, 32, 32], &z), ("class_labels", &[2, 3], &[0.0; 6])];
    for (tensors, what) in [(bad_churn, "churn_noise has shape [3]"), (bad_labels, "class_labels has shape [2, 3], expected [2, 10]")] {
        safetensors::write(&noise, tensors, &Default::default(), Dtype::F32).unwrap();
        let o = edm2(&["generate", "--net", s(&snap), "--outdir", s(&d.join("img2")), "--noise", s(&noise), "--steps", "2"]);
        fails_with(&o, what);
        fails_with(&o, "noise.safetensors");
    }
    fails_with(&edm2(&["--threads", "100000000", "info"]), "--threads 100000000: at most");
}

#[test]
fn sizes_from_arguments_and_configs_are_bounded_before_allocating() {
    let d = tmp("sizes");
    let t = std::time::Instant::now();
    // A typo'd width: a config error, not an allocation of exabytes.
    fails_with(&edm2(&["train", "--channels", "100000000", "--outdir", s(&d.join("a")), "--duration", "64"]), "at most 65536 is supported");
    let cfg = d.join("huge.json");
    std::fs::write(&cfg, r#"{"img_resolution": 32, "img_channels": 1, "label_dim": 0, "model_channels": 4000000000, "channel_mult": [1, 2]}"#).unwrap();
    fails_with(&edm2(&["info", "--config", s(&cfg)]), "at most 65536 is supported");
    std::fs::write(&cfg, r#"{"img_resolution": 1048576, "img_channels": 1, "label_dim": 0}"#).unwrap();
    fails_with(&edm2(&["info", "--config", s(&cfg)]), "img_resolution is 1048576");
    // Within the config bounds but far past this machine: refused with both figures.
    let o = edm2(&["train", "--channels", "30000", "--outdir", s(&d.join("b")), "--duration", "64"]);
    fails_with(&o, "of weights, gradients, Adam moments and EMAs), but only");
    fails_with(&o, "not even one image per pass fits");
    fails_with(&edm2(&["bench", "--batch", "100000000"]), "use --batch ");
    fails_with(&edm2(&["train", "--preview", "100000", "--outdir", s(&d.join("c"))]), "--preview 100000");
    assert!(t.elapsed().as_secs() < 30, "every refusal comes before the work");
}
