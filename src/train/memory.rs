//! Will a training step fit? An estimate of a step's memory from the network description,
//! made before the first step, against what the machine (or the device) has free — so
//! that a run too big for it is refused with both figures instead of aborting midway.

use crate::error::{Error, Result};
use crate::nn::Precond;

const GIB: f64 = (1u64 << 30) as f64;

/// A step's memory, bytes.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepMemory {
    /// Activations and their gradients of one pass (`batch_gpu` images).
    pub activations: u64,
    /// Weights, gradients (and their accumulation), Adam moments, EMAs, the effective
    /// (normalized) weights, fp32.
    pub state: u64,
}

impl StepMemory {
    /// `n_emas` tracked averages; `act_bytes` per activation (4 for fp32, 2 for bf16).
    pub fn estimate(net: &Precond, batch_gpu: u64, n_emas: usize, act_bytes: usize) -> StepMemory {
        let params = net.num_params() as u64;
        // weights, effective weights, gradients, accumulated gradients, m, v, the EMAs.
        let state = params * 4 * (6 + n_emas as u64);
        StepMemory { activations: batch_gpu.saturating_mul(net.activation_bytes_per_image(act_bytes)), state }
    }

    pub fn total(&self) -> u64 {
        self.activations.saturating_add(self.state)
    }

    /// Refuses a step that needs more than `available` bytes of `what` (e.g. "memory on
    /// this machine"), naming both figures and the way out: the images per pass `batch_gpu`
    /// are set by the flag `--{flag}`.
    pub fn check(&self, available: u64, what: &str, batch_gpu: u64, flag: &str) -> Result<()> {
        if self.total() <= available {
            return Ok(());
        }
        let per_image = self.activations as f64 / batch_gpu.max(1) as f64;
        let fits = ((available as f64 - self.state as f64) / per_image).floor();
        let hint = if fits >= 1.0 {
            format!(
                "a pass of {} images fits: use --{flag} {} or smaller{}",
                fits as u64,
                largest_divisor_at_most(batch_gpu, fits as u64),
                if flag == "batch-gpu" { " (gradient accumulation keeps --batch)" } else { "" }
            )
        } else {
            "not even one image per pass fits: use a smaller network (--channels, a smaller preset) or a machine with more memory".into()
        };
        Err(Error::Run(format!(
            "a training step needs about {:.2} GiB ({:.2} GiB of activations for --{flag} {batch_gpu} + {:.2} GiB of weights, \
             gradients, Adam moments and EMAs), but only {:.2} GiB of {what} is available; {hint}",
            self.total() as f64 / GIB,
            self.activations as f64 / GIB,
            self.state as f64 / GIB,
            available as f64 / GIB,
        )))
    }
}

/// The largest divisor of `n` that is at most `k` (≥ 1), so the suggestion is valid.
fn largest_divisor_at_most(n: u64, k: u64) -> u64 {
    (1..=k.min(n)).rev().find(|d| n % d == 0).unwrap_or(1)
}

/// Bytes this process can still allocate on this machine: `MemAvailable` of
/// /proc/meminfo, lowered to the room left under a cgroup's memory limit. None where
/// neither can be read (not Linux).
pub fn host_available() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok();
    let avail = meminfo.as_deref().and_then(|s| {
        let l = s.lines().find(|l| l.starts_with("MemAvailable:"))?;
        l.split_whitespace().nth(1)?.parse::<u64>().ok().map(|kb| kb * 1024)
    });
    let read_u64 = |p: &str| std::fs::read_to_string(p).ok().and_then(|s| s.trim().parse::<u64>().ok());
    // cgroup v2: this process's group (/proc/self/cgroup "0::/path") and every ancestor's
    // limit apply ("max" parses as None: no limit); then v1's.
    let mut cgroup: Option<u64> = None;
    let own = std::fs::read_to_string("/proc/self/cgroup").ok().and_then(|s| s.lines().find_map(|l| l.strip_prefix("0::").map(str::to_string)));
    let mut dir = own.unwrap_or_else(|| "/".into());
    loop {
        let base = format!("/sys/fs/cgroup{}", if dir == "/" { "" } else { dir.as_str() });
        if let (Some(max), Some(cur)) = (read_u64(&format!("{base}/memory.max")), read_u64(&format!("{base}/memory.current"))) {
            let room = max.saturating_sub(cur);
            cgroup = Some(cgroup.map_or(room, |c| c.min(room)));
        }
        match dir.rfind('/') {
            Some(0) | None if dir != "/" => dir = "/".into(),
            Some(i) if i > 0 => dir.truncate(i),
            _ => break,
        }
    }
    if cgroup.is_none() {
        if let (Some(max), Some(cur)) = (read_u64("/sys/fs/cgroup/memory/memory.limit_in_bytes"), read_u64("/sys/fs/cgroup/memory/memory.usage_in_bytes")) {
            if max < (1u64 << 60) {
                cgroup = Some(max.saturating_sub(cur));
            }
        }
    }
    match (avail, cgroup) {
        (Some(a), Some(c)) => Some(a.min(c)),
        (a, c) => a.or(c),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusal_names_both_figures_and_a_batch_gpu_that_fits() {
        let m = StepMemory { activations: 64 << 30, state: 1 << 30 };
        assert!(m.check(66 << 30, "memory", 64, "batch-gpu").is_ok());
        let e = m.check(17 << 30, "memory on this machine", 64, "batch-gpu").unwrap_err().to_string();
        // 16 GiB left after the state: 16 images of 1 GiB; 16 divides 64.
        assert!(e.contains("65.00 GiB") && e.contains("17.00 GiB") && e.contains("--batch-gpu 16"), "{e}");
        let e = m.check(1 << 29, "memory", 64, "batch").unwrap_err().to_string();
        assert!(e.contains("not even one image"), "{e}");
        assert_eq!(largest_divisor_at_most(96, 40), 32);
        assert_eq!(largest_divisor_at_most(7, 5), 1);
    }

    #[test]
    fn host_memory_is_known_on_linux() {
        if cfg!(target_os = "linux") {
            let a = host_available().expect("/proc/meminfo");
            assert!(a > 1 << 20, "{a}");
        }
    }
}
