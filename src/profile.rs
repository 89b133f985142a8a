//! A tiny opt-in wall-clock profiler: `EDM2_PROFILE=1` (or [`enable`]) makes every
//! [`scope`] add its elapsed time to a per-label total; [`report`] prints the table.
//! Disabled, a scope costs one relaxed atomic load.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Instant;

static ENABLED: AtomicBool = AtomicBool::new(false);
static TOTALS: Mutex<BTreeMap<&'static str, (f64, u64)>> = Mutex::new(BTreeMap::new());

pub fn enable(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// Enables profiling when the environment variable `EDM2_PROFILE` is set (not "0").
pub fn enable_from_env() {
    if std::env::var("EDM2_PROFILE").map(|v| v != "0").unwrap_or(false) {
        enable(true);
    }
}

pub struct Scope {
    label: &'static str,
    start: Option<Instant>,
}

#[inline]
pub fn scope(label: &'static str) -> Scope {
    let start = ENABLED.load(Ordering::Relaxed).then(Instant::now);
    Scope { label, start }
}

impl Drop for Scope {
    fn drop(&mut self) {
        if let Some(s) = self.start {
            let dt = s.elapsed().as_secs_f64();
            let mut t = TOTALS.lock().unwrap();
            let e = t.entry(self.label).or_insert((0.0, 0));
            e.0 += dt;
            e.1 += 1;
        }
    }
}

/// Whether profiling is on (for callers that must do extra work to be measured, such as
/// the GPU backend, which waits for each kernel when it is).
#[inline]
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

thread_local! {
    static LAST_MARK: std::cell::Cell<Option<Instant>> = const { std::cell::Cell::new(None) };
}

/// Adds the time since this thread's previous mark (or since [`reset`]) to `label`. The GPU
/// backend marks after waiting for each kernel, so a label's total is that kernel's device
/// time plus the host work that led up to its launch: a per-kernel profile without a
/// profiler on the machine. Does nothing when profiling is off.
pub fn mark(label: &'static str) {
    if !enabled() {
        return;
    }
    let now = Instant::now();
    if let Some(prev) = LAST_MARK.with(|m| m.replace(Some(now))) {
        let mut t = TOTALS.lock().unwrap();
        let e = t.entry(label).or_insert((0.0, 0));
        e.0 += (now - prev).as_secs_f64();
        e.1 += 1;
    }
}

pub fn reset() {
    LAST_MARK.with(|m| m.set(Some(Instant::now())));
    TOTALS.lock().unwrap().clear();
}

/// The table: label, total ms, calls, share of the sum — sorted by time.
pub fn report() -> String {
    let t = TOTALS.lock().unwrap();
    // Labels starting with "total:" enclose the others and are left out of the shares.
    let sum: f64 = t.iter().filter(|(k, _)| !k.starts_with("total:")).map(|(_, v)| v.0).sum();
    let mut rows: Vec<_> = t.iter().collect();
    rows.sort_by(|a, b| b.1 .0.partial_cmp(&a.1 .0).unwrap());
    let mut s = format!("{:<28} {:>10} {:>7} {:>6}\n", "op", "total ms", "calls", "share");
    for (k, (secs, n)) in rows {
        s += &format!("{:<28} {:>10.1} {:>7} {:>5.1}%\n", k, secs * 1e3, n, 100.0 * secs / sum.max(1e-12));
    }
    s
}
