//! The start-up meeting of a torchrun-style launch (issue 20): rank 0 listens on
//! `MASTER_PORT`, every other rank connects to `MASTER_ADDR:MASTER_PORT`, says who it is,
//! and receives rank 0's bytes — the NCCL unique id, the one thing NCCL needs from outside
//! to build its communicator (what torchrun's TCPStore carries for PyTorch). After that the
//! connection is closed and NCCL does all the work; nothing of the training runs over it.
//!
//! Failures are errors on every rank, never a hang: a rank that does not connect by the
//! deadline (rank 0 names the missing ranks and tells the others), a rank number out of
//! range or twice, ranks that disagree on the world size, no rank 0 to connect to.
//!
//! Wire format (all integers little-endian): a rank's hello is `MAGIC`, world (u32), rank
//! (u32); rank 0's answer is a status byte (0: the bytes follow, 1: an error message
//! follows), a length (u32) and that many bytes.

use crate::error::{Error, Result};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

const MAGIC: &[u8; 8] = b"EDM2RDZ1";
/// Bytes rank 0 sends at most (a unique id is 128; an error message a few hundred).
const MAX_PAYLOAD: usize = 1 << 16;

/// Where the ranks meet and for how long they wait for each other.
#[derive(Clone, Debug)]
pub struct Meeting {
    /// Rank 0's host name or address (`MASTER_ADDR`).
    pub addr: String,
    /// `MASTER_PORT`.
    pub port: u16,
    pub rank: usize,
    pub world: usize,
    pub timeout: Duration,
}

impl Meeting {
    /// From torchrun's variables (`MASTER_ADDR`, `MASTER_PORT`) for this rank: the port is
    /// `EDM2_RENDEZVOUS_PORT` if set, else `MASTER_PORT`, or the one after it when torchrun's
    /// agent holds its store there (`TORCHELASTIC_USE_AGENT_STORE`); the deadline from
    /// `EDM2_RENDEZVOUS_TIMEOUT` (seconds, default 300).
    pub fn from_env(get: &dyn Fn(&str) -> Option<String>, rank: usize, world: usize) -> Result<Meeting> {
        let addr = get("MASTER_ADDR").filter(|a| !a.trim().is_empty()).ok_or_else(|| {
            Error::Input(format!("rank {rank} of {world}: MASTER_ADDR is not set (rank 0's host name or address, where the ranks meet)"))
        })?;
        let parse = |var: &str, v: String| v.trim().parse::<u16>().ok().filter(|&p| p > 0).ok_or_else(|| Error::Input(format!("{var}={v:?} is not a port number (1-65535)")));
        let port = match get("EDM2_RENDEZVOUS_PORT") {
            Some(p) => parse("EDM2_RENDEZVOUS_PORT", p)?,
            None => {
                let p = get("MASTER_PORT").ok_or_else(|| Error::Input(format!("rank {rank} of {world}: MASTER_PORT is not set (the port rank 0 listens on)")))?;
                let p = parse("MASTER_PORT", p)?;
                // torchrun's agent holds its own store on MASTER_PORT: meet on the next one.
                if get("TORCHELASTIC_USE_AGENT_STORE").is_some_and(|v| v.eq_ignore_ascii_case("true") || v == "1") {
                    p.checked_add(1).ok_or_else(|| Error::Input("MASTER_PORT=65535 under torchrun: set EDM2_RENDEZVOUS_PORT".into()))?
                } else {
                    p
                }
            }
        };
        let timeout = match get("EDM2_RENDEZVOUS_TIMEOUT") {
            None => Duration::from_secs(300),
            Some(s) => s
                .trim()
                .parse::<f64>()
                .ok()
                .filter(|t| t.is_finite() && *t > 0.0 && *t <= 86400.0)
                .map(Duration::from_secs_f64)
                .ok_or_else(|| Error::Input(format!("EDM2_RENDEZVOUS_TIMEOUT={s:?} is not a number of seconds (0-86400)")))?,
        };
        Ok(Meeting { addr: addr.trim().to_string(), port, rank, world, timeout })
    }
}

/// Rank 0's `payload` on every rank: rank 0 serves it, the others fetch it. Rank 0 returns
/// once every rank has it; an error on any rank names what went wrong.
pub fn exchange(m: &Meeting, payload: &[u8]) -> Result<Vec<u8>> {
    assert!(m.rank < m.world && m.world >= 1);
    if m.world == 1 {
        return Ok(payload.to_vec());
    }
    if m.rank == 0 {
        assert!(payload.len() <= MAX_PAYLOAD);
        serve(m, payload)?;
        Ok(payload.to_vec())
    } else {
        fetch(m)
    }
}

fn io_err(what: String) -> impl FnOnce(std::io::Error) -> Error {
    move |e| Error::Run(format!("{what}: {e}"))
}

fn serve(m: &Meeting, payload: &[u8]) -> Result<()> {
    // All interfaces: MASTER_ADDR is how the others reach this host, which may be a name
    // of another of its interfaces.
    let listener = TcpListener::bind(("0.0.0.0", m.port)).map_err(|e| {
        Error::Run(format!("rank 0: cannot listen on port {} (MASTER_PORT) for the other ranks: {e}{}", m.port,
            if e.kind() == std::io::ErrorKind::AddrInUse { " (another job uses it: pick another MASTER_PORT)" } else { "" }))
    })?;
    listener.set_nonblocking(true).map_err(io_err("rank 0: the listening socket".into()))?;
    let deadline = Instant::now() + m.timeout;
    let mut joined: Vec<Option<TcpStream>> = (0..m.world).map(|_| None).collect();
    let mut problem: Option<String> = None;
    while problem.is_none() && joined.iter().skip(1).any(|s| s.is_none()) {
        match listener.accept() {
            Ok((mut s, peer)) => {
                let _ = s.set_nonblocking(false);
                let refused = match read_hello(&mut s, deadline) {
                    Ok((world, rank)) if world != m.world => {
                        format!("the process at {peer} says rank {rank} of {world}, but rank 0 is of {}: the ranks disagree on WORLD_SIZE", m.world)
                    }
                    Ok((_, rank)) if rank == 0 || rank >= m.world => {
                        format!("the process at {peer} says rank {rank}, which is not a rank 1..{} of this run", m.world - 1)
                    }
                    Ok((_, rank)) if joined[rank].is_some() => {
                        format!("two processes say rank {rank} (the second from {peer}): each rank must be started once")
                    }
                    Ok((_, rank)) => {
                        joined[rank] = Some(s);
                        continue;
                    }
                    // Not one of ours (a port scanner, a stale client): ignored.
                    Err(_) => continue,
                };
                // The offending process is told too.
                let _ = answer(&mut s, 1, refused.as_bytes());
                problem = Some(refused);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    let missing: Vec<String> = (1..m.world).filter(|&r| joined[r].is_none()).map(|r| r.to_string()).collect();
                    problem = Some(format!(
                        "rank{} {} of {} did not join within {:.0} s (rank 0 listened on port {}; EDM2_RENDEZVOUS_TIMEOUT sets the wait)",
                        if missing.len() > 1 { "s" } else { "" },
                        missing.join(", "),
                        m.world,
                        m.timeout.as_secs_f64(),
                        m.port
                    ));
                } else {
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
            Err(e) => problem = Some(format!("accepting the other ranks on port {}: {e}", m.port)),
        }
    }
    let (status, bytes) = match &problem {
        None => (0u8, payload),
        Some(p) => (1u8, p.as_bytes()),
    };
    for s in joined.iter_mut().flatten() {
        let _ = answer(s, status, bytes);
    }
    match problem {
        None => Ok(()),
        Some(p) => Err(Error::Run(format!("rank 0: {p}"))),
    }
}

fn read_hello(s: &mut TcpStream, deadline: Instant) -> std::io::Result<(usize, usize)> {
    // A hello is sent right after connecting: a few seconds is plenty.
    let wait = deadline.saturating_duration_since(Instant::now()).clamp(Duration::from_millis(100), Duration::from_secs(10));
    s.set_read_timeout(Some(wait))?;
    let mut h = [0u8; 16];
    s.read_exact(&mut h)?;
    if &h[..8] != MAGIC {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "not an edm2 rank"));
    }
    let world = u32::from_le_bytes(h[8..12].try_into().unwrap()) as usize;
    let rank = u32::from_le_bytes(h[12..16].try_into().unwrap()) as usize;
    Ok((world, rank))
}

fn answer(s: &mut TcpStream, status: u8, bytes: &[u8]) -> std::io::Result<()> {
    let _ = s.set_write_timeout(Some(Duration::from_secs(10)));
    let mut msg = Vec::with_capacity(5 + bytes.len());
    msg.push(status);
    msg.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    msg.extend_from_slice(bytes);
    s.write_all(&msg)?;
    s.flush()
}

fn fetch(m: &Meeting) -> Result<Vec<u8>> {
    let place = format!("{}:{}", m.addr, m.port);
    let who = format!("rank {} of {}", m.rank, m.world);
    let deadline = Instant::now() + m.timeout;
    let addrs: Vec<SocketAddr> = (m.addr.as_str(), m.port)
        .to_socket_addrs()
        .map_err(|e| Error::Input(format!("{who}: MASTER_ADDR={:?} does not resolve: {e}", m.addr)))?
        .collect();
    // Rank 0 may start later than this one: try until the deadline.
    let mut stream = loop {
        let mut last = None;
        let mut connected = None;
        for a in &addrs {
            match TcpStream::connect_timeout(a, Duration::from_secs(2)) {
                Ok(s) => {
                    connected = Some(s);
                    break;
                }
                Err(e) => last = Some(e),
            }
        }
        if let Some(s) = connected {
            break s;
        }
        if Instant::now() >= deadline {
            return Err(Error::Run(format!(
                "{who}: rank 0 was not reachable at {place} (MASTER_ADDR:MASTER_PORT) within {:.0} s{}",
                m.timeout.as_secs_f64(),
                last.map(|e| format!(": {e}")).unwrap_or_default()
            )));
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let mut hello = Vec::with_capacity(16);
    hello.extend_from_slice(MAGIC);
    hello.extend_from_slice(&(m.world as u32).to_le_bytes());
    hello.extend_from_slice(&(m.rank as u32).to_le_bytes());
    stream.write_all(&hello).map_err(io_err(format!("{who}: saying hello to rank 0 at {place}")))?;
    // Rank 0 answers when every rank is there, or at its own deadline, at most `timeout`
    // after it began listening (before this connection): wait that long from now.
    let wait = m.timeout + Duration::from_secs(15);
    stream.set_read_timeout(Some(wait)).map_err(io_err(format!("{who}: the connection to {place}")))?;
    let mut head = [0u8; 5];
    stream.read_exact(&mut head).map_err(|e| {
        Error::Run(format!("{who}: no answer from rank 0 at {place} ({e}): rank 0 ended, or it is another job's port"))
    })?;
    let len = u32::from_le_bytes(head[1..5].try_into().unwrap()) as usize;
    if len > MAX_PAYLOAD {
        return Err(Error::Run(format!("{who}: rank 0 at {place} sent {len} bytes: not an edm2 rank 0")));
    }
    let mut bytes = vec![0u8; len];
    stream.read_exact(&mut bytes).map_err(io_err(format!("{who}: reading rank 0's answer from {place}")))?;
    match head[0] {
        0 => Ok(bytes),
        _ => Err(Error::Run(format!("{who}: rank 0 (at {place}) says: {}", String::from_utf8_lossy(&bytes)))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A port free right now on this machine.
    fn free_port() -> u16 {
        TcpListener::bind(("127.0.0.1", 0)).unwrap().local_addr().unwrap().port()
    }

    fn meeting(port: u16, rank: usize, world: usize, secs: f64) -> Meeting {
        Meeting { addr: "127.0.0.1".into(), port, rank, world, timeout: Duration::from_secs_f64(secs) }
    }

    /// Runs `ranks` (rank, world) each in a thread; rank 0's payload is `id`.
    fn run(port: u16, ranks: &[(usize, usize)], secs: f64, id: &[u8]) -> Vec<Result<Vec<u8>>> {
        std::thread::scope(|s| {
            let hs: Vec<_> = ranks.iter().map(|&(r, w)| s.spawn(move || exchange(&meeting(port, r, w, secs), id))).collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    #[test]
    fn every_rank_gets_rank_zeros_bytes_whatever_order_they_start_in() {
        let id: Vec<u8> = (0..128u8).collect();
        // Rank 0 last in the list: the others connect before it listens and retry.
        let got = run(free_port(), &[(3, 4), (1, 4), (2, 4), (0, 4)], 20.0, &id);
        for g in got {
            assert_eq!(g.unwrap(), id);
        }
    }

    #[test]
    fn a_missing_rank_is_an_error_on_every_rank_naming_it() {
        let got = run(free_port(), &[(0, 3), (2, 3)], 1.0, b"id");
        let e0 = got[0].as_ref().unwrap_err().to_string();
        assert!(e0.contains("rank 1 of 3 did not join"), "{e0}");
        let e2 = got[1].as_ref().unwrap_err().to_string();
        assert!(e2.contains("rank 2 of 3") && e2.contains("rank 1 of 3 did not join"), "{e2}");
    }

    #[test]
    fn a_rank_started_twice_or_a_different_world_size_is_refused() {
        let got = run(free_port(), &[(0, 3), (1, 3), (1, 3)], 5.0, b"id");
        assert!(got[0].as_ref().unwrap_err().to_string().contains("two processes say rank 1"), "{:?}", got[0]);
        assert!(got[1..].iter().all(|g| g.as_ref().unwrap_err().to_string().contains("two processes say rank 1")));
        let got = run(free_port(), &[(0, 3), (1, 2)], 5.0, b"id");
        for g in &got {
            assert!(g.as_ref().unwrap_err().to_string().contains("disagree on WORLD_SIZE"), "{g:?}");
        }
    }

    #[test]
    fn no_rank_zero_is_an_error_within_the_deadline() {
        let t = Instant::now();
        let e = exchange(&meeting(free_port(), 1, 2, 1.0), b"").unwrap_err().to_string();
        assert!(e.contains("was not reachable at 127.0.0.1:") && e.contains("MASTER_ADDR:MASTER_PORT"), "{e}");
        assert!(t.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn the_environment_is_read_and_checked() {
        let env = |pairs: &'static [(&'static str, &'static str)]| move |k: &str| pairs.iter().find(|p| p.0 == k).map(|p| p.1.to_string());
        let m = Meeting::from_env(&env(&[("MASTER_ADDR", "node7"), ("MASTER_PORT", "29500")]), 1, 2).unwrap();
        assert_eq!((m.addr.as_str(), m.port, m.timeout), ("node7", 29500, Duration::from_secs(300)));
        let e = |p| Meeting::from_env(&env(p), 1, 2).unwrap_err().to_string();
        assert!(e(&[("MASTER_PORT", "29500")]).contains("MASTER_ADDR is not set"));
        assert!(e(&[("MASTER_ADDR", "a")]).contains("MASTER_PORT is not set"));
        assert!(e(&[("MASTER_ADDR", "a"), ("MASTER_PORT", "99999")]).contains("not a port number"));
        let port = |p: &'static [(&'static str, &'static str)]| Meeting::from_env(&env(p), 1, 2).unwrap().port;
        assert_eq!(port(&[("MASTER_ADDR", "a"), ("MASTER_PORT", "29500"), ("TORCHELASTIC_USE_AGENT_STORE", "True")]), 29501);
        assert_eq!(port(&[("MASTER_ADDR", "a"), ("MASTER_PORT", "29500"), ("EDM2_RENDEZVOUS_PORT", "4000")]), 4000);
        assert!(e(&[("MASTER_ADDR", "a"), ("MASTER_PORT", "1"), ("EDM2_RENDEZVOUS_TIMEOUT", "-1")]).contains("EDM2_RENDEZVOUS_TIMEOUT"));
    }
}
