//! Times `vm.exec(["true"])` over an open VM: the Rust side of the
//! benchmark's `node_exec_rtt` (the Node.js binding's side runs the same
//! loop through `@ferry/runtime`).
//!
//! `exec_rtt NAME COUNT` prints `{"median_s": ..., "count": ...}`.

use std::time::Instant;

use ferry::{Config, ExecOptions, Runtime};

fn main() -> Result<(), ferry::Error> {
    let mut args = std::env::args().skip(1);
    let name = args.next().expect("usage: exec_rtt NAME COUNT");
    let count: usize = args.next().and_then(|c| c.parse().ok()).unwrap_or(30);
    let rt = Runtime::new(Config::default())?;
    let vm = rt.open_running(&name)?;
    let opts = ExecOptions::default();
    // The first calls warm caches on both sides; they are not counted.
    for _ in 0..3 {
        vm.exec(&["true"], &opts)?;
    }
    let mut times: Vec<f64> = (0..count)
        .map(|_| {
            let t = Instant::now();
            let out = vm.exec(&["true"], &opts)?;
            assert_eq!(out.exit_code(), Some(0));
            Ok(t.elapsed().as_secs_f64())
        })
        .collect::<Result<_, ferry::Error>>()?;
    times.sort_by(f64::total_cmp);
    println!(
        "{{\"median_s\": {}, \"count\": {count}}}",
        times[times.len() / 2]
    );
    Ok(())
}
