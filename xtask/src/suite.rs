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
use std::process::{Command, Stdio};
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
/// (killing the whole process group past it). True if all passed. They
/// build static for the binaries' target, with the binaries' flags
/// ([`workspace::static_cargo`]): the same code the test hosts run, and
/// every dependency already compiled by the binaries' build.
fn unit_tests() -> Result<bool> {
    use std::os::unix::process::CommandExt;
    let _lock = workspace::claim_target(&workspace::cargo_target(), Some(workspace::TARGET))?;
    if !workspace::static_cargo("test")
        .arg("--no-run")
        .status()
        .context("build the unit tests")?
        .success()
    {
        return Ok(false);
    }
    let mut child = workspace::static_cargo("test")
        .process_group(0)
        .spawn()
        .context("run cargo test")?;
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

    // The fuzz targets build beside the setup; they run after the unit tests.
    let fuzz_log = workspace::outputs().join(format!("fuzz-build.{}.log", std::process::id()));
    std::fs::create_dir_all(workspace::outputs())?;
    let fuzz = unit.then(|| {
        let log = fuzz_log.clone();
        std::thread::spawn(move || {
            let t = Instant::now();
            let built = fuzz_build(&log);
            (built, t.elapsed())
        })
    });

    let t = Instant::now();
    let prepared = testhost::prepare()?;
    timings.push(Timing {
        name: "setup (packages, build, assets)".into(),
        seconds: t.elapsed().as_secs_f64(),
        passed: true,
    });

    if let Some(fuzz) = fuzz {
        let t = Instant::now();
        let passed = unit_tests()?;
        timings.push(Timing {
            name: "unit tests".into(),
            seconds: t.elapsed().as_secs_f64(),
            passed,
        });
        let t = Instant::now();
        let (built, took) = fuzz
            .join()
            .unwrap_or_else(|_| (Err(anyhow::anyhow!("the fuzz build panicked")), t.elapsed()));
        println!("=== fuzz build (beside the setup)");
        print!("{}", std::fs::read_to_string(&fuzz_log).unwrap_or_default());
        let _ = std::fs::remove_file(&fuzz_log);
        if let Err(e) = &built {
            println!("=== fuzz build: FAIL, {e:#}");
        }
        timings.push(Timing {
            name: "fuzz build (beside the setup)".into(),
            seconds: took.as_secs_f64(),
            passed: built.is_ok(),
        });
        let t = Instant::now();
        let passed = built.is_ok() && fuzz_smoke();
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

/// The fuzz workspace's target directory: in ferry's cache directory and
/// shared by this machine's checkouts, like [`workspace::cargo_target`].
fn fuzz_target() -> PathBuf {
    ferry_runtime::paths::cache_dir().join("cargo/fuzz-target")
}

/// Locks [`fuzz_target`] for this checkout ([`workspace::claim_target_of`]).
fn claim_fuzz_target() -> Result<workspace::TargetLock> {
    workspace::claim_target_of(
        &fuzz_target(),
        &workspace::root().join("fuzz/Cargo.toml"),
        &["+nightly"],
        Some(workspace::TARGET),
    )
}

/// Builds every fuzz target (`cargo +nightly fuzz build`, what
/// `fuzz/smoke.sh` starts with), with its output in `log`. Needs the nightly
/// toolchain and cargo-fuzz, which is installed into the user's cargo bin
/// directory when missing. It runs beside the setup, at a lower priority:
/// the sanitizer build compiles one crate after another, mostly on one
/// core, and the setup's builds leave a core idle often enough.
fn fuzz_build(log: &Path) -> Result<()> {
    let out = std::fs::File::create(log).with_context(|| format!("create {}", log.display()))?;
    // The rustup proxy, not $CARGO: only the proxy understands `+nightly`.
    let cargo = |args: &[&str]| {
        let mut c = Command::new("nice");
        c.args(["-n", "10", "cargo"])
            .args(args)
            .current_dir(workspace::root());
        match (out.try_clone(), out.try_clone()) {
            (Ok(o), Ok(e)) => {
                c.stdout(o).stderr(e);
            }
            _ => {
                c.stdout(Stdio::null()).stderr(Stdio::null());
            }
        }
        c
    };
    let ok = |mut c: Command| c.status().is_ok_and(|s| s.success());
    if !ok(cargo(&["+nightly", "--version"])) {
        bail!("no nightly toolchain (rustup toolchain install nightly)");
    }
    if !ok(cargo(&["+nightly", "fuzz", "--version"]))
        && !ok(cargo(&["install", "--locked", "cargo-fuzz"]))
    {
        bail!("cannot install cargo-fuzz");
    }
    let _lock = claim_fuzz_target()?;
    let mut build = cargo(&["+nightly", "fuzz", "build"]);
    build.env("CARGO_TARGET_DIR", fuzz_target());
    if !ok(build) {
        bail!("cargo fuzz build failed");
    }
    Ok(())
}

/// Runs `fuzz/smoke.sh`: every fuzz target for 30 seconds, two at a time
/// on a machine with two CPUs, built by [`fuzz_build`]. True if no target
/// crashed.
fn fuzz_smoke() -> bool {
    let root = workspace::root();
    let _lock = match claim_fuzz_target() {
        Ok(lock) => lock,
        Err(e) => {
            println!("=== fuzz smoke: FAIL, {e:#}");
            return false;
        }
    };
    Command::new(root.join("fuzz/smoke.sh"))
        .current_dir(&root)
        .env("CARGO_TARGET_DIR", fuzz_target())
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
