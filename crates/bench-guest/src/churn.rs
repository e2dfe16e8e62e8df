//! `ferry-churn`: a guest program that keeps rewriting a memory buffer and
//! counting, and can tell whether its memory stayed consistent, for the
//! migration tests and `cargo xtask bench`.
//!
//! `ferry-churn [--mib N] [--rate MIB_PER_S] [--port P]` fills an N MiB
//! buffer pass after pass: pass `p` writes, into every word of page `i`, a
//! value derived from `(p, i, word)`, and before it rewrites a page checks
//! that the page still holds pass `p - 1`'s values. A page lost or torn by
//! a migration is counted as an error. A second thread counts every 50 ms.
//! On port P (all addresses) each connection gets one line:
//!
//! ```text
//! pass=12 errors=0 count=345
//! ```
//!
//! `ferry-churn --query HOST:PORT` prints that line from a running one.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const PAGE: usize = 4096;
const WORDS: usize = PAGE / 8;

/// The value of word `w` of page `i` in pass `p`.
fn value(p: u64, i: usize, w: usize) -> u64 {
    let mut x = p
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add((i as u64) << 16 | w as u64);
    x ^= x >> 31;
    x.wrapping_mul(0xBF58_476D_1CE4_E5B9)
}

#[derive(Default)]
struct Counters {
    pass: AtomicU64,
    errors: AtomicU64,
    count: AtomicU64,
}

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(addr) = arg(&args, "--query") {
        let mut s = match TcpStream::connect(&addr) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("ferry-churn: connect {addr}: {e}");
                std::process::exit(1);
            }
        };
        let mut line = String::new();
        let _ = s.read_to_string(&mut line);
        print!("{line}");
        return;
    }
    let mib: usize = arg(&args, "--mib")
        .and_then(|v| v.parse().ok())
        .unwrap_or(128);
    let rate: f64 = arg(&args, "--rate")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    let port: u16 = arg(&args, "--port")
        .and_then(|v| v.parse().ok())
        .unwrap_or(7000);
    let c = Arc::new(Counters::default());
    let listener = TcpListener::bind(("0.0.0.0", port)).expect("bind the status port");
    let served = Arc::clone(&c);
    std::thread::spawn(move || {
        for mut conn in listener.incoming().flatten() {
            let _ = writeln!(
                conn,
                "pass={} errors={} count={}",
                served.pass.load(Ordering::SeqCst),
                served.errors.load(Ordering::SeqCst),
                served.count.load(Ordering::SeqCst)
            );
        }
    });
    let ticking = Arc::clone(&c);
    std::thread::spawn(move || loop {
        std::thread::sleep(Duration::from_millis(50));
        ticking.count.fetch_add(1, Ordering::SeqCst);
    });
    let pages = (mib << 20) / PAGE;
    let mut buf = vec![0u64; pages * WORDS];
    // Pages per second at the asked rate (0: as fast as it goes).
    let per_sec = rate * (1 << 20) as f64 / PAGE as f64;
    let started = Instant::now();
    let mut done = 0u64;
    for p in 1u64.. {
        for i in 0..pages {
            let page = &mut buf[i * WORDS..(i + 1) * WORDS];
            if p > 1
                && [0, 1, WORDS / 2, WORDS - 1]
                    .iter()
                    .any(|&w| page[w] != value(p - 1, i, w))
            {
                c.errors.fetch_add(1, Ordering::SeqCst);
            }
            for (w, word) in page.iter_mut().enumerate() {
                *word = value(p, i, w);
            }
            done += 1;
            if per_sec > 0.0 {
                let due = Duration::from_secs_f64(done as f64 / per_sec);
                if let Some(wait) = due.checked_sub(started.elapsed()) {
                    std::thread::sleep(wait);
                }
            }
        }
        c.pass.store(p, Ordering::SeqCst);
    }
}
