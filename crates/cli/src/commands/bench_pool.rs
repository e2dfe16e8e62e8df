//! `ferry bench-pool BUNDLE`: pool figures for `cargo xtask bench`, through the
//! Rust API: `acquire()` from a warm pool (p50, p99), a release + acquire with
//! restore-on-release, and the memory (PSS) of idle pooled VMs.

use std::time::{Duration, Instant};

use ferry::{Failure, PoolOptions, Runtime};

use crate::cli::bench_pool::Args;

fn fail(e: impl std::fmt::Display) -> Failure {
    Failure {
        code: "BENCH_FAILED".into(),
        message: e.to_string(),
        hint: None,
    }
}

fn percentile(mut v: Vec<f64>, p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i.min(v.len() - 1)]
}

/// Waits until the pool has `n` idle VMs.
fn settle(pool: &ferry::Pool, n: usize) -> Result<(), Failure> {
    let deadline = Instant::now() + Duration::from_secs(600);
    while pool.stats().idle < n {
        if Instant::now() > deadline {
            return Err(fail(format!(
                "the pool never had {n} idle VMs: {:?}",
                pool.stats()
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// Proportional set size of a process, in bytes (`/proc/PID/smaps_rollup`).
fn pss(pid: u32) -> Result<u64, Failure> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).map_err(fail)?;
    let kib: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("Pss:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .ok_or_else(|| fail(format!("no Pss in /proc/{pid}/smaps_rollup")))?;
    Ok(kib * 1024)
}

/// Prints `{acquire_p50, acquire_p99, cycle_p50, cycle_p99, idle_pss_mib}`
/// (seconds, and MiB per idle VM) as JSON.
pub fn run(rt: &Runtime, args: Args) -> Result<(), Failure> {
    if args.count == 0 {
        return Err(fail("--count must be at least 1"));
    }
    let image = rt.warm_image_from_snapshot(&args.bundle)?;

    // acquire() from a warm pool: VMs go back as they are, so every acquire
    // finds one idle.
    let pool = image.pool(PoolOptions {
        min: 2,
        max: 2,
        restore_on_release: false,
        ..PoolOptions::default()
    })?;
    settle(&pool, 2)?;
    let mut acquire = Vec::with_capacity(args.count);
    for _ in 0..args.count {
        let t = Instant::now();
        let vm = pool.acquire()?;
        acquire.push(t.elapsed().as_secs_f64());
        vm.release();
    }
    pool.shutdown();

    // release + acquire with restore-on-release: the released VM is replaced
    // in the background; the next acquire takes a warm one.
    let pool = image.pool(PoolOptions {
        min: 2,
        max: 3,
        restore_on_release: true,
        ..PoolOptions::default()
    })?;
    settle(&pool, 2)?;
    let mut held = pool.acquire()?;
    let mut cycle = Vec::with_capacity(args.count);
    for _ in 0..args.count {
        // Each cycle starts from a full pool, as a steady sandbox loop does.
        settle(&pool, 1)?;
        let t = Instant::now();
        held.release();
        held = pool.acquire()?;
        cycle.push(t.elapsed().as_secs_f64());
    }
    held.release();
    pool.shutdown();

    // Memory of idle pooled VMs, acquired (so the pool does not replace
    // them) and left alone for settle_secs.
    let idle_pss_mib = if args.idle_vms == 0 {
        None
    } else {
        let pool = image.pool(PoolOptions {
            min: 0,
            max: args.idle_vms,
            acquire_timeout: Duration::from_secs(600),
            ..PoolOptions::default()
        })?;
        let vms: Vec<_> = (0..args.idle_vms)
            .map(|_| pool.acquire())
            .collect::<Result<_, _>>()?;
        std::thread::sleep(Duration::from_secs(args.settle_secs));
        let mut total = 0;
        for vm in &vms {
            let ferry::VmStatus::Running { pid } = vm.status() else {
                return Err(fail(format!("{} is not running", vm.name())));
            };
            total += pss(pid)?;
        }
        drop(vms);
        pool.shutdown();
        Some(total as f64 / args.idle_vms as f64 / f64::from(1 << 20))
    };
    let out = serde_json::json!({
        "acquire_p50": percentile(acquire.clone(), 0.5),
        "acquire_p99": percentile(acquire, 0.99),
        "cycle_p50": percentile(cycle.clone(), 0.5),
        "cycle_p99": percentile(cycle, 0.99),
        "idle_pss_mib": idle_pss_mib,
    });
    println!("{out}");
    Ok(())
}
