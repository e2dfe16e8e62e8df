//! The test suite: unit tests on this machine, a short run of every fuzz
//! target (`fuzz/smoke.sh`), then every test-host test, each timed, with a
//! summary at the end.
//!
//! A test-host test is either `tests/testhost/NAME.sh` (one host) or a directory
//! `tests/testhost/NAME/` holding `host-a.sh`, `host-b.sh`, ... (one host each).
//! A `# timeout: SECS` line in the first script overrides the default limit.
//!
//! Tests run side by side where the machine allows: every test host has one
//! vCPU, so with `FERRY_TEST_LANES` (default: the number of CPUs, at most 2)
//! lanes, one-host tests share the lanes while tests of several hosts run on
//! their own. A test's console is printed as one block when it ends, so logs
//! of tests run side by side do not interleave. `--filter` takes a name part,
//! or several separated by commas.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::testhost::{self, HostSpec, RunOptions};
use crate::workspace;

const DEFAULT_TIMEOUT: u64 = 300;

struct TestCase {
    name: String,
    hosts: Vec<HostSpec>,
    timeout: Duration,
}

struct Timing {
    name: String,
    seconds: f64,
    passed: bool,
}

/// How long the built unit tests may run: they take seconds, so this only
/// turns a hang into a failure that leaves time for the rest of the suite.
const UNIT_TIMEOUT: Duration = Duration::from_secs(600);

/// Builds the workspace's tests, then runs them within [`UNIT_TIMEOUT`]
/// (killing the whole process group past it). True if all passed.
fn unit_tests() -> Result<bool> {
    use std::os::unix::process::CommandExt;
    let cargo = || {
        let mut c = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
        c.current_dir(workspace::root())
            .args(["test", "--release", "--workspace"]);
        c
    };
    if !cargo()
        .arg("--no-run")
        .status()
        .context("build the unit tests")?
        .success()
    {
        return Ok(false);
    }
    let mut child = cargo().process_group(0).spawn().context("run cargo test")?;
    let deadline = Instant::now() + UNIT_TIMEOUT;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status.success());
        }
        if Instant::now() > deadline {
            println!(
                "=== unit tests: FAIL, still running after {} s; killed",
                UNIT_TIMEOUT.as_secs()
            );
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{}", child.id())])
                .status();
            let _ = child.wait();
            return Ok(false);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Runs the suite; fails if any test failed.
pub fn run(filter: Option<&str>, unit: bool) -> Result<()> {
    let started = Instant::now();
    let mut timings = Vec::new();
    let cases: Vec<TestCase> = discover(&workspace::root().join("tests/testhost"))?
        .into_iter()
        .filter(|c| filter.is_none_or(|f| f.split(',').any(|part| c.name.contains(part))))
        .collect();

    let t = Instant::now();
    let prepared = testhost::prepare()?;
    timings.push(Timing {
        name: "setup (packages, build, assets)".into(),
        seconds: t.elapsed().as_secs_f64(),
        passed: true,
    });

    if unit {
        let t = Instant::now();
        let passed = unit_tests()?;
        timings.push(Timing {
            name: "unit tests".into(),
            seconds: t.elapsed().as_secs_f64(),
            passed,
        });
        let t = Instant::now();
        let passed = fuzz_smoke();
        timings.push(Timing {
            name: "fuzz smoke".into(),
            seconds: t.elapsed().as_secs_f64(),
            passed,
        });
    }

    let lanes = lanes();
    println!(
        "=== {} test-host test(s), {lanes} side by side",
        cases.len()
    );
    // Tests of several hosts first, each alone; then the one-host tests,
    // `lanes` at a time.
    let (alone, shared): (Vec<&TestCase>, Vec<&TestCase>) =
        cases.iter().partition(|c| c.hosts.len() > 1 || lanes == 1);
    for case in alone {
        timings.push(run_with_retry(&prepared, case, true));
    }
    let queue = Mutex::new(shared.into_iter());
    let done = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..lanes {
            s.spawn(|| loop {
                let next = queue.lock().unwrap_or_else(|p| p.into_inner()).next();
                let Some(case) = next else { break };
                let timing = run_with_retry(&prepared, case, false);
                done.lock().unwrap_or_else(|p| p.into_inner()).push(timing);
            });
        }
    });
    timings.extend(done.into_inner().unwrap_or_else(|p| p.into_inner()));

    println!("\nTiming summary");
    println!("{:<52} {:>9}  result", "test", "seconds");
    for t in &timings {
        println!(
            "{:<52} {:>9.1}  {}",
            t.name,
            t.seconds,
            if t.passed { "pass" } else { "FAIL" }
        );
    }
    let failed = timings.iter().filter(|t| !t.passed).count();
    println!(
        "{:<52} {:>9.1}  {} passed, {} failed",
        "total",
        started.elapsed().as_secs_f64(),
        timings.len() - failed,
        failed
    );
    if failed > 0 {
        bail!("{failed} test(s) failed");
    }
    if let Some(f) = filter {
        if cases.is_empty() {
            bail!("no test-host test matches {f:?}");
        }
    }
    Ok(())
}

/// Runs `fuzz/smoke.sh`: every fuzz target for 30 seconds. Needs the nightly
/// toolchain (fails, saying so, without it) and cargo-fuzz, which is
/// installed into the user's cargo bin directory when missing. True if no
/// target crashed.
fn fuzz_smoke() -> bool {
    // The rustup proxy, not $CARGO: only the proxy understands `+nightly`.
    let cargo_ok = |args: &[&str]| {
        Command::new("cargo")
            .args(args)
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if !cargo_ok(&["+nightly", "--version"]) {
        println!("=== fuzz smoke: FAIL, no nightly toolchain (rustup toolchain install nightly)");
        return false;
    }
    if !cargo_ok(&["+nightly", "fuzz", "--version"]) {
        println!("=== fuzz smoke: installing cargo-fuzz");
        let installed = Command::new("cargo")
            .args(["install", "--locked", "cargo-fuzz"])
            .status()
            .is_ok_and(|s| s.success());
        if !installed {
            println!("=== fuzz smoke: FAIL, cannot install cargo-fuzz");
            return false;
        }
    }
    let root = workspace::root();
    Command::new(root.join("fuzz/smoke.sh"))
        .current_dir(&root)
        .status()
        .is_ok_and(|s| s.success())
}

/// How many one-host tests run side by side: `FERRY_TEST_LANES`, else the
/// machine's CPUs, at most 2 (each test host has one vCPU, and the host's
/// own work needs room too).
fn lanes() -> usize {
    std::env::var("FERRY_TEST_LANES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
                .min(2)
        })
        .max(1)
}

/// Serializes the blocks of output of tests that run side by side.
static OUTPUT: Mutex<()> = Mutex::new(());

/// Runs a test, and once more if it failed (emulated test hosts are slow
/// and their timing is noisy; the first attempt's logs are kept and the
/// summary says it needed a retry).
fn run_with_retry(prepared: &testhost::Prepared, case: &TestCase, stream: bool) -> Timing {
    if stream {
        println!("=== testhost: {} ({} host(s))", case.name, case.hosts.len());
    }
    let t = Instant::now();
    let mut passed = run_case(prepared, case, stream, 1);
    let mut retried = false;
    if !passed {
        if stream {
            println!(
                "=== RETRY {} (the first attempt's logs are kept above)",
                case.name
            );
        }
        passed = run_case(prepared, case, stream, 2);
        retried = true;
    }
    println!(
        "=== {} {} in {:.1}s",
        if passed { "PASS" } else { "FAIL" },
        case.name,
        t.elapsed().as_secs_f64()
    );
    Timing {
        name: format!(
            "testhost: {}{}",
            case.name,
            if retried { " (2nd attempt)" } else { "" }
        ),
        seconds: t.elapsed().as_secs_f64(),
        passed,
    }
}

/// Runs one test-host test; true if every host's script exited 0. Logs of a
/// failed run are kept and their paths printed. Without `stream`, each
/// host's console is printed as one block once the test has ended.
fn run_case(prepared: &testhost::Prepared, case: &TestCase, stream: bool, attempt: u32) -> bool {
    let opts = RunOptions {
        hosts: case.hosts.clone(),
        timeout: case.timeout,
        memory_mib: 3072,
        cpus: testhost::HOST_CPUS,
        run_dir: testhost::new_run_dir(&case.name),
        stream,
    };
    let result = testhost::run(prepared, &opts);
    let _block = (!stream).then(|| OUTPUT.lock().unwrap_or_else(|p| p.into_inner()));
    if !stream {
        println!(
            "=== testhost: {} ({} host(s), attempt {attempt})",
            case.name,
            case.hosts.len()
        );
        for host in &opts.hosts {
            let console = opts.run_dir.join(format!("{}.console.log", host.name));
            for line in std::fs::read_to_string(&console)
                .unwrap_or_default()
                .lines()
            {
                println!("{} | {line}", host.name);
            }
        }
    }
    match result {
        Ok(outcomes) => {
            let ok = outcomes.iter().all(testhost::HostOutcome::ok);
            if ok {
                let _ = std::fs::remove_dir_all(&opts.run_dir);
            } else {
                testhost::report_failures(&outcomes);
            }
            ok
        }
        Err(e) => {
            eprintln!("{}: {e:#}", case.name);
            false
        }
    }
}

/// Finds the test-host tests under `dir`, sorted by name.
fn discover(dir: &Path) -> Result<Vec<TestCase>> {
    let mut cases = Vec::new();
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("read {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    entries.sort();
    for path in entries {
        let stem = path.file_stem().unwrap().to_string_lossy().into_owned();
        let hosts = if path.is_dir() {
            let mut hosts = Vec::new();
            for i in 0.. {
                let script = path.join(format!("{}.sh", testhost::host_name(i)));
                if !script.is_file() {
                    break;
                }
                hosts.push(HostSpec {
                    name: testhost::host_name(i),
                    script,
                });
            }
            if hosts.is_empty() {
                bail!("{}: no host-a.sh", path.display());
            }
            hosts
        } else if path.extension().is_some_and(|e| e == "sh") {
            vec![HostSpec {
                name: testhost::host_name(0),
                script: path.clone(),
            }]
        } else {
            continue;
        };
        let timeout = std::fs::read_to_string(&hosts[0].script)?
            .lines()
            .find_map(|l| {
                l.strip_prefix("# timeout:")
                    .and_then(|v| v.trim().parse().ok())
            })
            .unwrap_or(DEFAULT_TIMEOUT);
        cases.push(TestCase {
            name: stem,
            hosts,
            timeout: Duration::from_secs(timeout),
        });
    }
    Ok(cases)
}

/// Sets everything up and runs the main job (examples/demo.sh) in a test host.
pub fn demo() -> Result<()> {
    let prepared = testhost::prepare()?;
    let opts = RunOptions {
        hosts: vec![HostSpec {
            name: testhost::host_name(0),
            script: workspace::root().join("examples/demo.sh"),
        }],
        timeout: Duration::from_secs(DEFAULT_TIMEOUT),
        memory_mib: 3072,
        cpus: testhost::HOST_CPUS,
        run_dir: testhost::new_run_dir("demo"),
        stream: true,
    };
    let outcomes = testhost::run(&prepared, &opts)?;
    testhost::check(&outcomes)?;
    let _ = std::fs::remove_dir_all(&opts.run_dir);
    Ok(())
}
