//! Deterministic, bounded mutation fuzzing of every reader of untrusted bytes: safetensors
//! (`parse`, and `read_header` on a sample), `.npy` and PNG/JPEG items (`decode_item`,
//! `decode_expecting`) and zip datasets (`Dataset::open` + `verify`). cargo-fuzz needs a
//! nightly toolchain; this runs on stable in CI and finds the same classes of bug: a
//! panic, an allocation sized by a file's claim (the capping allocator below), a hang
//! (the watchdog), or an `Ok` that is not sane.
//!
//! The seed corpus is valid files made by the crate's writers and the png encoder, the
//! tiny JPEGs in tests/data/jpeg, and the hostile cases of issue 15. Mutations: bit flips,
//! interesting bytes and integers, inserted, deleted and duplicated ranges, truncation,
//! and format-aware ones (safetensors header length and JSON numbers and names, PNG IHDR
//! fields and chunk data with the CRCs recomputed, JPEG frame header fields, `.npy` shape
//! text, zip entry sizes).
//!
//! `EDM2_FUZZ_ITERS` sets the iterations of the in-memory targets (default 300,000; images
//! get a half, zip datasets a fiftieth); `EDM2_FUZZ_SEED` changes the seed. Every case is
//! a pure function of (seed, target, iteration), so a failure's printed seed and
//! iteration reproduce it.

mod common;
use edm2::data::decode::{decode_expecting, Expect, MAX_DECODED_BYTES, MAX_SIDE};
use edm2::data::{DataOptions, Dataset, Encoding, RawItem};
use edm2::io::safetensors::{self, Dtype};
use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

// ---------------------------------------------------------------- capping allocator

/// No reader may ask for this much at once: the readers' own limits are 256 MiB decoded
/// and 320 MiB per stored item (decoders' working buffers stay below this too).
const ALLOC_CAP: usize = 1 << 30;
static CAP_HIT: AtomicUsize = AtomicUsize::new(0);

/// Forwards to `System`, but refuses (null) a single request over `ALLOC_CAP` and says so:
/// an infallible allocation then aborts the process visibly (a failure in CI), and a
/// fallible one (`try_reserve`) is caught by the case's check of `CAP_HIT`.
struct Capped;

fn over_cap(size: usize) {
    CAP_HIT.store(size, Ordering::SeqCst);
    // No allocation here: digits by hand, straight to the unbuffered stderr.
    let mut buf = [0u8; 24];
    let (mut n, mut i) = (size, buf.len());
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    let mut e = std::io::stderr();
    let _ = e.write_all(b"\nfuzz_readers: refused an allocation of ");
    let _ = e.write_all(&buf[i..]);
    let _ = e.write_all(b" bytes; cases in flight:\n");
    for slot in WATCH.iter() {
        if let Ok(g) = slot.try_lock() {
            if let Some((_, label)) = g.as_ref() {
                let _ = e.write_all(label.as_bytes());
                let _ = e.write_all(b"\n");
            }
        }
    }
}

unsafe impl GlobalAlloc for Capped {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        if l.size() > ALLOC_CAP {
            over_cap(l.size());
            return std::ptr::null_mut();
        }
        System.alloc(l)
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        if l.size() > ALLOC_CAP {
            over_cap(l.size());
            return std::ptr::null_mut();
        }
        System.alloc_zeroed(l)
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        if new > ALLOC_CAP {
            over_cap(new);
            return std::ptr::null_mut();
        }
        System.realloc(p, l, new)
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        System.dealloc(p, l)
    }
}

#[global_allocator]
static GLOBAL: Capped = Capped;

// ---------------------------------------------------------------- watchdog and cases

/// A case running this long is a hang: the watchdog names it and aborts (a hung reader
/// cannot be interrupted from outside).
const HANG_LIMIT: Duration = Duration::from_secs(30);
/// No single case may take longer than this (checked after it returns).
const CASE_LIMIT: Duration = Duration::from_secs(5);

/// The case in flight per target: (start, label).
static WATCH: [Mutex<Option<(Instant, String)>>; 4] = [Mutex::new(None), Mutex::new(None), Mutex::new(None), Mutex::new(None)];
static WATCHDOG: OnceLock<()> = OnceLock::new();

fn start_watchdog() {
    WATCHDOG.get_or_init(|| {
        std::thread::spawn(|| loop {
            std::thread::sleep(Duration::from_millis(250));
            for slot in WATCH.iter() {
                if let Some((t0, label)) = slot.lock().unwrap().as_ref() {
                    if t0.elapsed() > HANG_LIMIT {
                        eprintln!("fuzz_readers: hang: {label} has run for {:?}", t0.elapsed());
                        std::process::abort();
                    }
                }
            }
        });
    });
}

fn seed() -> u64 {
    std::env::var("EDM2_FUZZ_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0x5EED_ED42)
}

fn iters(fraction: u64) -> u64 {
    let n: u64 = std::env::var("EDM2_FUZZ_ITERS").ok().and_then(|s| s.parse().ok()).unwrap_or(300_000);
    (n / fraction).max(1)
}

/// splitmix64: tiny, fast, and every case's stream is a function of its seed alone.
struct Rng(u64);

impl Rng {
    fn new(seed: u64, target: u64, iter: u64) -> Rng {
        let mut r = Rng(seed ^ target.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ iter.wrapping_mul(0xD1B5_4A32_D192_ED03));
        r.next();
        r
    }
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn pick<'a, T>(&mut self, xs: &'a [T]) -> &'a T {
        &xs[self.below(xs.len())]
    }
}

fn hex_prefix(b: &[u8]) -> String {
    b.iter().take(64).map(|x| format!("{x:02x}")).collect::<Vec<_>>().join("")
}

/// Per-target bookkeeping and the case runner.
struct Target {
    name: &'static str,
    slot: usize,
    ok: u64,
    err: u64,
    slowest: Duration,
    t0: Instant,
}

impl Target {
    fn new(name: &'static str, slot: usize) -> Target {
        start_watchdog();
        Target { name, slot, ok: 0, err: 0, slowest: Duration::ZERO, t0: Instant::now() }
    }

    /// Runs one case: `f` returns Ok(true) for a sane `Ok`, Ok(false) for a typed error,
    /// Err(why) for an insane result. A panic, a refused allocation, a slow case or an
    /// insane result fails the test with the seed, the iteration and the input's start.
    fn case(&mut self, iter: u64, input: &[u8], f: impl FnOnce() -> Result<bool, String>) {
        let label = format!("{} seed {} iteration {iter} ({} bytes: {})", self.name, seed(), input.len(), hex_prefix(input));
        *WATCH[self.slot].lock().unwrap() = Some((Instant::now(), label.clone()));
        let t0 = Instant::now();
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
        let dt = t0.elapsed();
        *WATCH[self.slot].lock().unwrap() = None;
        let cap = CAP_HIT.swap(0, Ordering::SeqCst);
        assert!(cap == 0, "{label}: an allocation of {cap} bytes was requested (over the {ALLOC_CAP}-byte cap)");
        match r {
            Err(p) => {
                let msg = p.downcast_ref::<String>().cloned().or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_default();
                panic!("{label}: the reader panicked: {msg}");
            }
            Ok(Err(why)) => panic!("{label}: {why}"),
            Ok(Ok(true)) => self.ok += 1,
            Ok(Ok(false)) => self.err += 1,
        }
        assert!(dt < CASE_LIMIT, "{label}: took {dt:?}");
        self.slowest = self.slowest.max(dt);
    }

    fn report(&self) {
        // Straight to stderr (libtest captures only the print macros), so CI's log shows it.
        let _ = writeln!(
            std::io::stderr(),
            "fuzz_readers: {:<12} {:>6} cases ({} accepted, {} refused) in {:.1?}, slowest case {:.1?}",
            self.name,
            self.ok + self.err,
            self.ok,
            self.err,
            self.t0.elapsed(),
            self.slowest
        );
    }
}

// ---------------------------------------------------------------- mutations

const BYTES: [u8; 9] = [0, 1, 0x7F, 0x80, 0xFF, 0xFE, 0x10, 0x40, b'9'];
const U32S: [u32; 14] = [0, 1, 3, 8, 16, 255, 0x7FFF, 0xFFFF, 16384, 16385, 0x7FFF_FFFF, 0x8000_0000, 0xFFFF_FFFE, 0xFFFF_FFFF];
const U64S: [u64; 9] = [0, 1, 8, 1 << 32, 1 << 40, 100_000_000, 100_000_001, i64::MAX as u64, u64::MAX];
/// Largest mutated input (keeps cases fast; the limits under test are about claims).
const MAX_INPUT: usize = 1 << 16;

fn range(rng: &mut Rng, len: usize) -> (usize, usize) {
    let a = rng.below(len + 1);
    let long = rng.below(4) == 0;
    let n = 1 + rng.below(if long { 256 } else { 16 });
    (a, (a + n).min(len))
}

/// One format-blind mutation.
fn generic(rng: &mut Rng, b: &mut Vec<u8>) {
    let len = b.len();
    match rng.below(9) {
        0 if len > 0 => {
            let i = rng.below(len);
            b[i] ^= 1 << rng.below(8);
        }
        1 if len > 0 => {
            let i = rng.below(len);
            b[i] = *rng.pick(&BYTES);
        }
        2 if len >= 4 => {
            let i = rng.below(len - 3);
            b[i..i + 4].copy_from_slice(&rng.pick(&U32S).to_le_bytes());
        }
        3 if len >= 4 => {
            let i = rng.below(len - 3);
            b[i..i + 4].copy_from_slice(&rng.pick(&U32S).to_be_bytes());
        }
        4 if len >= 8 => {
            let i = rng.below(len - 7);
            b[i..i + 8].copy_from_slice(&rng.pick(&U64S).to_le_bytes());
        }
        5 => {
            let (a, _) = range(rng, len);
            let n = 1 + rng.below(32);
            let ins: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
            b.splice(a..a, ins);
        }
        6 => {
            let (a, e) = range(rng, len);
            b.drain(a..e);
        }
        7 => {
            let (a, e) = range(rng, len);
            let dup = b[a..e].to_vec();
            let at = rng.below(len + 1);
            b.splice(at..at, dup);
        }
        _ => {
            let keep = rng.below(len + 1);
            b.truncate(keep);
        }
    }
}

/// 1–3 stacked mutations, a third of them format-aware.
fn mutate(rng: &mut Rng, seed: &[u8], aware: fn(&mut Rng, &mut Vec<u8>)) -> Vec<u8> {
    let mut b = seed.to_vec();
    for _ in 0..1 + rng.below(3) {
        if rng.below(3) == 0 {
            aware(rng, &mut b)
        } else {
            generic(rng, &mut b)
        }
    }
    b.truncate(MAX_INPUT);
    b
}

// ---------------------------------------------------------------- safetensors

fn st_raw(header: &str, data: &[u8]) -> Vec<u8> {
    let mut b = (header.len() as u64).to_le_bytes().to_vec();
    b.extend_from_slice(header.as_bytes());
    b.extend_from_slice(data);
    b
}

fn st_seeds() -> Vec<Vec<u8>> {
    let x: Vec<f32> = (0..24).map(|i| i as f32 - 3.5).collect();
    let meta = BTreeMap::from([("edm2.config".to_string(), "{\"a\": 1}".to_string()), ("edm2.nimg".into(), "1024".into())]);
    let mut v = vec![];
    for dt in [Dtype::F32, Dtype::F16, Dtype::BF16] {
        v.push(safetensors::serialize(&[("w", &[2, 3, 4], &x), ("b", &[3], &x[..3]), ("e", &[0, 2], &[])], &meta, dt));
    }
    v.push(safetensors::serialize(&[("only", &[1], &[1.0])], &BTreeMap::new(), Dtype::F32));
    let t = |n: &str, s: &str, a: u64, b: u64| format!(r#""{n}": {{"dtype": "F32", "shape": {s}, "data_offsets": [{a}, {b}]}}"#);
    // The hostile cases of issue 15.
    v.push(st_raw(&format!("{{{}, {}}}", t("a", "[2]", 0, 8), t("b", "[2]", 0, 8)), &[0; 8]));
    v.push(st_raw(&format!("{{{}}}", t("a", "[2]", 0, 8)), &[0; 12]));
    v.push(st_raw(&format!("{{{}, {}}}", t("a", "[1]", 0, 4), t("a", "[1]", 0, 4)), &[0; 4]));
    v.push(st_raw(&format!("{{{}, {}}}", t("a", "[1]", 0, 4), t("b", "[1]", 8, 12)), &[0; 12]));
    let mut huge = u64::MAX.to_le_bytes().to_vec();
    huge.extend_from_slice(b"{}");
    v.push(huge);
    v
}

fn st_aware(rng: &mut Rng, b: &mut Vec<u8>) {
    if b.len() < 8 {
        return;
    }
    let hlen = u64::from_le_bytes(b[..8].try_into().unwrap());
    let hend = (8 + hlen.min(b.len() as u64 - 8) as usize).min(b.len());
    match rng.below(5) {
        // The header length: interesting, or off by a little.
        0 => {
            let v = if rng.below(2) == 0 { *rng.pick(&U64S) } else { hlen.wrapping_add(rng.below(17) as u64).wrapping_sub(8) };
            b[..8].copy_from_slice(&v.to_le_bytes());
        }
        // A number in the header text.
        1 | 2 => {
            let nums: Vec<(usize, usize)> = spans(&b[8..hend], |c| c.is_ascii_digit()).into_iter().map(|(a, e)| (a + 8, e + 8)).collect();
            if nums.is_empty() {
                return;
            }
            let (a, e) = *rng.pick(&nums);
            let new = rng.pick(&["0", "1", "4", "8", "12", "24", "96", "-1", "1.5", "4294967296", "18446744073709551615", "18446744073709551616", "1e9"]);
            splice_keep_len(b, a, e, new.as_bytes());
        }
        // A quoted name replaced by another (duplicate keys, swapped dtypes and fields).
        _ => {
            let strs: Vec<(usize, usize)> = quoted(&b[8..hend]).into_iter().map(|(a, e)| (a + 8, e + 8)).collect();
            if strs.len() < 2 {
                return;
            }
            let (a, e) = *rng.pick(&strs);
            let (c, d) = *rng.pick(&strs);
            let other = b[c..d].to_vec();
            splice_keep_len(b, a, e, &other);
        }
    }
}

/// Replaces b[a..e] and fixes the safetensors header length by the size change.
fn splice_keep_len(b: &mut Vec<u8>, a: usize, e: usize, new: &[u8]) {
    let delta = new.len() as i64 - (e - a) as i64;
    b.splice(a..e, new.iter().copied());
    let hlen = u64::from_le_bytes(b[..8].try_into().unwrap());
    b[..8].copy_from_slice(&(hlen as i64 + delta).to_le_bytes());
}

fn spans(b: &[u8], f: impl Fn(u8) -> bool) -> Vec<(usize, usize)> {
    let mut out = vec![];
    let mut i = 0;
    while i < b.len() {
        if f(b[i]) {
            let s = i;
            while i < b.len() && f(b[i]) {
                i += 1;
            }
            out.push((s, i));
        }
        i += 1;
    }
    out
}

fn quoted(b: &[u8]) -> Vec<(usize, usize)> {
    let q: Vec<usize> = b.iter().enumerate().filter(|(_, &c)| c == b'"').map(|(i, _)| i).collect();
    q.chunks_exact(2).map(|p| (p[0], p[1] + 1)).collect()
}

fn st_sane(f: &safetensors::StFile, input: &[u8]) -> Result<bool, String> {
    let hlen = u64::from_le_bytes(input[..8].try_into().unwrap()) as usize;
    let mut total = 0usize;
    let mut names = std::collections::HashSet::new();
    for (n, t) in &f.tensors {
        let numel: usize = t.shape.iter().product();
        if t.data.len() != numel || !names.insert(n.clone()) {
            return Err(format!("accepted tensor '{n}' with {} values for shape {:?} (or a duplicate)", t.data.len(), t.shape));
        }
        total += numel * t.dtype.size();
    }
    if total != input.len() - 8 - hlen {
        return Err(format!("accepted a file whose tensors cover {total} of {} data bytes", input.len() - 8 - hlen));
    }
    Ok(true)
}

#[test]
fn fuzz_safetensors() {
    let mut t = Target::new("safetensors", 0);
    let seeds = st_seeds();
    let dir = scratch("st");
    let path = dir.join("fuzz.safetensors");
    for it in 0..iters(1) {
        let mut rng = Rng::new(seed(), 0, it);
        let s = rng.pick(&seeds).clone();
        let input = mutate(&mut rng, &s, st_aware);
        let on_disk = it % 16 == 0;
        t.case(it, &input, || {
            let r = safetensors::parse(&path, &input);
            if on_disk {
                // read_header must agree with parse: the same entries or the same error.
                std::fs::write(&path, &input).unwrap();
                let h = safetensors::read_header(&path);
                let same = match (&r, &h) {
                    (Ok(a), Ok(b)) => {
                        a.metadata == b.metadata && a.tensors.iter().zip(&b.tensors).all(|(x, y)| x.0 == y.0 && x.1.shape == y.1.shape)
                    }
                    (Err(a), Err(b)) => a.to_string() == b.to_string(),
                    _ => false,
                };
                if !same {
                    return Err(format!("read_header and parse disagree: {:?} vs {:?}", r.as_ref().map(|_| ()), h.as_ref().map(|_| ())));
                }
            }
            match r {
                Ok(f) => st_sane(&f, &input),
                Err(e) if e.to_string().contains("fuzz.safetensors") => Ok(false),
                Err(e) => Err(format!("error does not name the file: {e}")),
            }
        });
    }
    t.report();
}

// ---------------------------------------------------------------- .npy

fn npy_with(header: &str, body: &[u8], version: u8) -> Vec<u8> {
    let mut b = vec![0x93, b'N', b'U', b'M', b'P', b'Y', version, 0];
    if version == 1 {
        b.extend_from_slice(&(header.len() as u16).to_le_bytes());
    } else {
        b.extend_from_slice(&(header.len() as u32).to_le_bytes());
    }
    b.extend_from_slice(header.as_bytes());
    b.extend_from_slice(body);
    b
}

fn npy_seeds() -> Vec<Vec<u8>> {
    let x: Vec<f32> = (0..8 * 4 * 4).map(|i| (i as f32 * 0.1).sin()).collect();
    vec![
        edm2::io::npy::serialize(&x, &[8, 4, 4]),
        edm2::io::npy::serialize(&x[..8], &[8, 1, 1]),
        npy_with("{'descr': '<f4', 'fortran_order': False, 'shape': (8, 4, 4), }\n", &vec![0; 512], 2),
        npy_with("{'descr': '<f4', 'fortran_order': False, 'shape': (8, 100000, 100000), }\n", &[0; 64], 1),
        npy_with("{'descr': '<f4', 'fortran_order': False, 'shape': (18446744073709551615, 4, 4), }\n", &[0; 64], 3),
        npy_with("{'descr': '<f4', 'shape': (8, 4, 4), }", &[0; 16], 1),
    ]
}

fn npy_aware(rng: &mut Rng, b: &mut Vec<u8>) {
    match rng.below(4) {
        // The shape tuple.
        0 | 1 => {
            let Some(at) = find(b, b"'shape': (") else { return };
            let start = at + 10;
            let Some(end) = b[start..].iter().position(|&c| c == b')').map(|e| e + start) else { return };
            let dims = ["0", "1", "4", "8", "16", "16384", "100000", "-1", "4294967296", "18446744073709551615", "x", ""];
            let n = rng.below(5);
            let s = (0..n).map(|_| *rng.pick(&dims)).collect::<Vec<_>>().join(", ");
            b.splice(start..end, s.into_bytes());
        }
        // The header length field or the version.
        2 if b.len() >= 12 => {
            if rng.below(2) == 0 {
                b[6] = *rng.pick(&[1, 2, 3, 4, 0]);
            } else if b[6] == 1 {
                b[8..10].copy_from_slice(&(*rng.pick(&U32S) as u16).to_le_bytes());
            } else {
                b[8..12].copy_from_slice(&rng.pick(&U32S).to_le_bytes());
            }
        }
        _ => {
            let Some(at) = find(b, b"'<f4'") else { return };
            const DESCRS: [&[u8; 5]; 4] = [b"'>f4'", b"'<f8'", b"'<f2'", b"'|u1'"];
            let d = *rng.pick(&DESCRS);
            b[at..at + 5].copy_from_slice(d);
        }
    }
}

fn find(b: &[u8], pat: &[u8]) -> Option<usize> {
    b.windows(pat.len()).position(|w| w == pat)
}

/// A decoded item is sane: its length is C·H·W, within the limits, and as expected.
fn item_sane(r: &(RawItem, usize, usize, usize), expect: Option<&Expect>) -> Result<bool, String> {
    let (item, c, h, w) = r;
    let (len, sample) = match item {
        RawItem::U8(v) => (v.len(), 1),
        RawItem::F32(v) => (v.len(), 4),
    };
    if len != c * h * w || *h > MAX_SIDE || *w > MAX_SIDE || len * sample > MAX_DECODED_BYTES || len == 0 {
        return Err(format!("accepted an item of {len} values for {c}x{h}x{w}"));
    }
    if let Some(e) = expect {
        if (*c, *h, *w) != (e.channels, e.resolution, e.resolution) {
            return Err(format!("accepted {c}x{h}x{w} where {}x{}x{} was expected", e.channels, e.resolution, e.resolution));
        }
    }
    Ok(true)
}

fn decode_case(input: &[u8], name: &str, expect: &Expect) -> Result<bool, String> {
    let mut any = false;
    for e in [None, Some(expect)] {
        match decode_expecting(input, name, e) {
            Ok(r) => any |= item_sane(&r, e)?,
            Err(err) if err.to_string().contains(name) => {}
            Err(err) => return Err(format!("error does not name the file: {err}")),
        }
    }
    Ok(any)
}

#[test]
fn fuzz_npy() {
    let mut t = Target::new("npy", 1);
    let seeds = npy_seeds();
    let expect = Expect { channels: 8, resolution: 4, encoding: Encoding::Latents, first: "first.npy" };
    for it in 0..iters(1) {
        let mut rng = Rng::new(seed(), 1, it);
        let s = rng.pick(&seeds).clone();
        let input = mutate(&mut rng, &s, npy_aware);
        t.case(it, &input, || decode_case(&input, "fuzz.npy", &expect));
    }
    t.report();
}

// ---------------------------------------------------------------- PNG and JPEG

fn png_encode(w: u32, h: u32, color: png::ColorType, depth: png::BitDepth, data: &[u8], palette: Option<Vec<u8>>) -> Vec<u8> {
    let mut buf = Vec::new();
    let mut enc = png::Encoder::new(&mut buf, w, h);
    enc.set_color(color);
    enc.set_depth(depth);
    if let Some(p) = palette {
        enc.set_palette(p);
    }
    enc.write_header().unwrap().write_image_data(data).unwrap();
    buf
}

fn jpeg(name: &str) -> Vec<u8> {
    std::fs::read(common::test_data("jpeg").join(name)).unwrap()
}

fn image_seeds() -> Vec<Vec<u8>> {
    use png::{BitDepth as D, ColorType as C};
    let px = |n: usize| (0..n).map(|i| (i * 37 % 251) as u8).collect::<Vec<u8>>();
    let rgb = png_encode(16, 16, C::Rgb, D::Eight, &px(16 * 16 * 3), None);
    let mut v = vec![
        rgb.clone(),
        png_encode(16, 16, C::Grayscale, D::Eight, &px(256), None),
        png_encode(16, 16, C::Rgb, D::Sixteen, &px(16 * 16 * 6), None),
        png_encode(16, 16, C::Grayscale, D::One, &px(16 * 2), None),
        png_encode(16, 16, C::Indexed, D::Eight, &px(256).iter().map(|x| x % 4).collect::<Vec<_>>(), Some(px(12))),
        png_encode(16, 16, C::Rgba, D::Eight, &px(16 * 16 * 4), None),
        png_encode(3, 5, C::Rgb, D::Eight, &px(45), None),
        jpeg("rgb16.jpg"),
        jpeg("rgb16-progressive.jpg"),
        jpeg("gray16.jpg"),
    ];
    // The hostile cases of issue 15: huge claimed dimensions.
    let mut huge = rgb;
    png_set_dims(&mut huge, 1_000_000, 1_000_000);
    v.push(huge);
    let mut j = jpeg("rgb16.jpg");
    jpeg_set_dims(&mut j, 65520, 65520);
    v.push(j);
    v
}

/// (start, end) of every chunk's type+data (the CRC's span) in a PNG, as far as it parses.
fn png_chunks(b: &[u8]) -> Vec<(usize, usize)> {
    let mut out = vec![];
    let mut i = 8;
    while i + 12 <= b.len() {
        let len = u32::from_be_bytes(b[i..i + 4].try_into().unwrap()) as usize;
        if i + 12 + len > b.len() {
            break;
        }
        out.push((i + 4, i + 8 + len));
        i += 12 + len;
    }
    out
}

fn png_fix_crcs(b: &mut [u8]) {
    for (a, e) in png_chunks(b) {
        let mut crc = flate2::Crc::new();
        crc.update(&b[a..e]);
        b[e..e + 4].copy_from_slice(&crc.sum().to_be_bytes());
    }
}

fn png_set_dims(b: &mut [u8], w: u32, h: u32) {
    if b.len() >= 33 && &b[12..16] == b"IHDR" {
        b[16..20].copy_from_slice(&w.to_be_bytes());
        b[20..24].copy_from_slice(&h.to_be_bytes());
        png_fix_crcs(b);
    }
}

/// The SOF0/SOF1/SOF2 frame header's offset (the 0xFF of its marker).
fn jpeg_sof(b: &[u8]) -> Option<usize> {
    (2..b.len().saturating_sub(9)).find(|&i| b[i] == 0xFF && matches!(b[i + 1], 0xC0 | 0xC1 | 0xC2))
}

fn jpeg_set_dims(b: &mut [u8], w: u16, h: u16) {
    if let Some(at) = jpeg_sof(b) {
        b[at + 5..at + 7].copy_from_slice(&h.to_be_bytes());
        b[at + 7..at + 9].copy_from_slice(&w.to_be_bytes());
    }
}

/// Mostly small, sometimes at or past the limits.
fn side(rng: &mut Rng) -> u32 {
    // (JPEG decoding pads missing data, so a legal claim costs its full decode: 8192² RGB
    // is about a second; 16384² would be several, and is covered by hostile_files.)
    *rng.pick(&[0, 1, 2, 7, 8, 15, 16, 16, 16, 17, 31, 32, 64, 255, 1024, 4096, 8192, 16385, 65520, 65535, 1 << 20, 0x7FFF_FFFF, 0x8000_0000, u32::MAX])
}

fn image_aware(rng: &mut Rng, b: &mut Vec<u8>) {
    if b.starts_with(b"\x89PNG") {
        match rng.below(4) {
            0 => {
                let (w, h) = (side(rng), side(rng));
                png_set_dims(b, w, h);
            }
            // Bit depth, colour type, interlace: values valid and not.
            1 if b.len() >= 33 => {
                let i = rng.pick(&[24, 25, 26, 27, 28]);
                b[*i] = *rng.pick(&[0, 1, 2, 3, 4, 6, 8, 16, 7, 255]);
                png_fix_crcs(b);
            }
            // Any mutation inside a chunk, with every CRC made right again, so the decoder
            // gets past the CRC check to the chunk's meaning.
            _ => {
                generic(rng, b);
                png_fix_crcs(b);
            }
        }
    } else if let Some(at) = jpeg_sof(b) {
        match rng.below(4) {
            0 => {
                let (w, h) = (side(rng) as u16, side(rng) as u16);
                jpeg_set_dims(b, w, h);
            }
            // Precision, component count, sampling factors, table ids.
            1 => {
                let i = at + *rng.pick(&[4, 9, 11, 12, 13, 14, 15, 16]);
                if i < b.len() {
                    b[i] = *rng.pick(&[0, 1, 2, 3, 4, 8, 12, 16, 0x11, 0x22, 0x44, 0x12, 0x21, 0xFF]);
                }
            }
            // A segment length.
            2 => {
                let marks: Vec<usize> = (2..b.len().saturating_sub(3)).filter(|&i| b[i] == 0xFF && (0xC0..=0xFE).contains(&b[i + 1])).collect();
                if !marks.is_empty() {
                    let i = *rng.pick(&marks);
                    b[i + 2..i + 4].copy_from_slice(&(*rng.pick(&U32S) as u16).to_be_bytes());
                }
            }
            _ => generic(rng, b),
        }
    } else {
        generic(rng, b);
    }
}

#[test]
fn fuzz_images() {
    let mut t = Target::new("images", 2);
    let seeds = image_seeds();
    for it in 0..iters(2) {
        let mut rng = Rng::new(seed(), 2, it);
        let s = rng.pick(&seeds).clone();
        let input = mutate(&mut rng, &s, image_aware);
        let gray = rng.below(2) == 0;
        let expect = Expect { channels: if gray { 1 } else { 3 }, resolution: 16, encoding: Encoding::Pixels, first: "first.png" };
        t.case(it, &input, || decode_case(&input, "fuzz.img", &expect));
    }
    t.report();
}

// ---------------------------------------------------------------- zip datasets

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("edm2-fuzz-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn zip_of(entries: &[(String, Vec<u8>)], stored: bool) -> Vec<u8> {
    let mut z = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let method = if stored { zip::CompressionMethod::Stored } else { zip::CompressionMethod::Deflated };
    for (n, b) in entries {
        z.start_file(n.as_str(), zip::write::SimpleFileOptions::default().compression_method(method)).unwrap();
        z.write_all(b).unwrap();
    }
    z.finish().unwrap().into_inner()
}

/// A zip header field rewritten: entry sizes, CRCs, name lengths, directory counts and offsets.
fn zip_aware(rng: &mut Rng, b: &mut Vec<u8>) {
    let heads: Vec<(usize, &[usize])> = (0..b.len().saturating_sub(22))
        .filter_map(|i| match u32::from_le_bytes(b[i..i + 4].try_into().unwrap()) {
            0x04034b50 => Some((i, &[14usize, 18, 22, 26, 28][..])),
            0x02014b50 => Some((i, &[16usize, 20, 24, 28, 30, 42][..])),
            0x06054b50 => Some((i, &[8usize, 10, 12, 16, 20][..])),
            _ => None,
        })
        .collect();
    if heads.is_empty() {
        return generic(rng, b);
    }
    let (at, fields) = *rng.pick(&heads);
    let f = at + *rng.pick(fields);
    if f + 4 <= b.len() {
        let v = *rng.pick(&U32S);
        b[f..f + 4].copy_from_slice(&v.to_le_bytes());
    }
}

#[test]
fn fuzz_zip_datasets() {
    let mut t = Target::new("zip datasets", 3);
    let dir = scratch("zip");
    let path = dir.join("fuzz.zip");
    let imgs = image_seeds();
    let items: Vec<(String, Vec<u8>)> = (0..3).map(|i| (format!("00000/img{i:08}.png"), imgs[0].clone())).collect();
    let labels = serde_json::json!({"labels": items.iter().enumerate().map(|(i, (n, _))| serde_json::json!([n, i])).collect::<Vec<_>>()}).to_string();
    for it in 0..iters(50) {
        let mut rng = Rng::new(seed(), 3, it);
        let mut entries = items.clone();
        // Mostly the items themselves, mutated (any seed image, any position), then zipped.
        let k = rng.below(entries.len());
        match rng.below(6) {
            0 | 1 => entries[k].1 = mutate(&mut rng, &imgs[0], image_aware),
            2 => {
                let s = rng.pick(&imgs).clone();
                entries[k].1 = mutate(&mut rng, &s, image_aware)
            }
            3 => entries.push(("dataset.json".into(), mutate(&mut rng, labels.as_bytes(), generic))),
            _ => entries.push(("dataset.json".into(), labels.clone().into_bytes())),
        }
        let mut zip = zip_of(&entries, rng.below(2) == 0);
        // Then, half the time, the archive itself.
        if rng.below(2) == 0 {
            zip = mutate(&mut rng, &zip, zip_aware);
        }
        std::fs::write(&path, &zip).unwrap();
        t.case(it, &zip, || {
            let r = Dataset::open(Some(path.to_str().unwrap()), &DataOptions::default()).and_then(|ds| ds.verify(&|_, _| {}).map(|_| ds));
            match r {
                Ok(ds) => {
                    let per = ds.raw_channels * ds.resolution * ds.resolution;
                    for i in 0..ds.raw_len() {
                        match ds.load_raw(i) {
                            Ok(RawItem::U8(v)) if v.len() == per => {}
                            other => return Err(format!("item {i} after verify: {:?}", other.map(|_| ()))),
                        }
                    }
                    if ds.labels.as_ref().is_some_and(|l| l.len() != ds.raw_len()) {
                        return Err("labels and items differ in number".into());
                    }
                    Ok(true)
                }
                Err(e) if e.to_string().contains("fuzz.zip") => Ok(false),
                Err(e) => Err(format!("error does not name the file: {e}")),
            }
        });
    }
    t.report();
}
