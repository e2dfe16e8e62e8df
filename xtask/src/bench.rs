//! `cargo xtask bench`: ferry against QEMU's microvm machine, side by side in one
//! test host. The measuring script is `xtask/assets/bench.py`; this prints its
//! METRIC and COUNT lines at the end, with the machine they ran on.

use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::testhost::{self, HostSpec, RunOptions};

const BENCH_PY: &str = include_str!("../assets/bench.py");

/// Runs the benchmark with `runs` runs per metric and side; `only` names
/// one group of metrics (see bench.py's `ONLY`).
pub fn run(runs: usize, only: Option<&str>) -> Result<()> {
    let prepared = testhost::prepare()?;
    let run_dir = testhost::new_run_dir("bench");
    std::fs::create_dir_all(&run_dir)?;
    let script = run_dir.join("bench.sh");
    std::fs::write(
        &script,
        format!(
            "set -euo pipefail\n# Kernel warnings (stalls, with their stacks) reach the console.\ndmesg -n 7 || true\ncat > /root/bench.py <<'FERRY_BENCH_EOF'\n{BENCH_PY}\nFERRY_BENCH_EOF\nBENCH_RUNS={runs} BENCH_ONLY={only} python3 -u /root/bench.py\n",
            only = only.unwrap_or("")
        ),
    )?;
    let opts = RunOptions {
        hosts: vec![HostSpec {
            name: testhost::host_name(0),
            script,
        }],
        timeout: Duration::from_secs(3600),
        memory_mib: 4096,
        cpus: testhost::HOST_CPUS,
        run_dir: run_dir.clone(),
        stream: true,
    };
    let outcomes = testhost::run(&prepared, &opts)?;
    let console = std::fs::read_to_string(&outcomes[0].console)
        .with_context(|| format!("read {}", outcomes[0].console.display()))?;
    testhost::check(&outcomes)?;
    println!("\nferry vs QEMU microvm, {runs} interleaved runs each, medians; test host: QEMU TCG, EPYC-v3 + SVM, nested KVM");
    let mut found = 0;
    for line in console.lines() {
        if line.starts_with("METRIC ") || line.starts_with("COUNT ") {
            println!("{line}");
            found += 1;
        }
    }
    if found == 0 {
        bail!(
            "the benchmark printed no results; see {}",
            outcomes[0].console.display()
        );
    }
    let _ = std::fs::remove_dir_all(&run_dir);
    Ok(())
}
