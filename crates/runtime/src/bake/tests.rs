//! Bake sequencing, output and cleanup against a fake guest (no VM needed).

use std::collections::HashMap;
use std::io::Read;
use std::sync::Mutex;

use ferry_protocol::ExitKind;

use super::*;

fn exited(code: i32) -> ExitStatus {
    ExitStatus {
        kind: ExitKind::Code(code),
        timed_out: false,
    }
}

/// What the fake guest saw.
#[derive(Default)]
struct Log {
    launches: usize,
    execs: Vec<GuestCommand>,
    stdin: Vec<Vec<u8>>,
    copies: Vec<(PathBuf, String, Vec<u8>)>,
    files: HashMap<String, Vec<u8>>,
    removed: usize,
    interrupted: bool,
    /// The agent has its own tools.
    tools: bool,
    /// Defaults the image carries outside its files (a registry image).
    defaults: Option<ImageConfig>,
}

/// How the fake answers a command: output chunks and an exit code.
type Script = dyn Fn(&GuestCommand) -> (Vec<(OutputStream, Vec<u8>)>, i32) + Send + Sync;

struct FakeLauncher {
    log: Arc<Mutex<Log>>,
    script: Arc<Script>,
    fail_launch: bool,
}

struct FakeGuest {
    name: String,
    log: Arc<Mutex<Log>>,
    script: Arc<Script>,
}

/// The bytes the fake's `tar` export produces.
fn export_bytes() -> Vec<u8> {
    (0..200_000u32)
        .flat_map(|i| (i % 251).to_le_bytes())
        .collect()
}

fn default_script(cmd: &GuestCommand) -> (Vec<(OutputStream, Vec<u8>)>, i32) {
    let tool = cmd.argv[0] == ferry_protocol::tools::AGENT_EXE;
    match cmd.argv[0].as_str() {
        _ if tool && cmd.argv[1] == ferry_protocol::tools::TAR_CREATE => {
            let data = export_bytes();
            (vec![(OutputStream::Stdout, data)], 0)
        }
        "tar" => {
            let data = export_bytes();
            let chunks = data
                .chunks(64 * 1024)
                .map(|c| (OutputStream::Stdout, c.to_vec()))
                .collect();
            (chunks, 0)
        }
        "/bin/sh" if cmd.argv[2].contains("exit 3") => {
            (vec![(OutputStream::Stdout, b"before\n".to_vec())], 3)
        }
        "/bin/sh" => (
            vec![
                (OutputStream::Stdout, b"out\n".to_vec()),
                (OutputStream::Stderr, b"err\n".to_vec()),
            ],
            0,
        ),
        _ => (Vec::new(), 0),
    }
}

impl FakeLauncher {
    fn new() -> FakeLauncher {
        FakeLauncher::with_script(Arc::new(default_script))
    }

    fn with_script(script: Arc<Script>) -> FakeLauncher {
        let log = Log {
            files: HashMap::from([("/etc/hosts".to_string(), b"127.0.0.1\tlocalhost\n".to_vec())]),
            ..Log::default()
        };
        FakeLauncher {
            log: Arc::new(Mutex::new(log)),
            script,
            fail_launch: false,
        }
    }

    fn log(&self) -> std::sync::MutexGuard<'_, Log> {
        self.log.lock().unwrap()
    }
}

impl GuestLauncher for FakeLauncher {
    fn launch(&mut self, _spec: &BakeSpec, name: &str) -> Result<Box<dyn BakeGuest>, BakeError> {
        let mut log = self.log();
        log.launches += 1;
        if self.fail_launch {
            return Err(BakeError::Setup("no KVM here".into()));
        }
        // Like the agent: the VM's name goes into /etc/hosts.
        let hosts = log.files.get_mut("/etc/hosts").unwrap();
        hosts.extend_from_slice(format!("127.0.1.1\t{name}\n").as_bytes());
        Ok(Box::new(FakeGuest {
            name: name.to_string(),
            log: self.log.clone(),
            script: self.script.clone(),
        }))
    }

    fn interrupter(&self, _name: &str) -> Arc<dyn Fn() + Send + Sync> {
        let log = self.log.clone();
        Arc::new(move || log.lock().unwrap().interrupted = true)
    }
}

impl BakeGuest for FakeGuest {
    fn name(&self) -> &str {
        &self.name
    }

    fn agent_tools(&mut self) -> bool {
        self.log.lock().unwrap().tools
    }

    fn image_defaults(&self) -> Option<ImageConfig> {
        self.log.lock().unwrap().defaults.clone()
    }

    fn copy_file(&mut self, local: &Path, guest_path: &str) -> Result<u64, BakeError> {
        let data = std::fs::read(local).unwrap();
        let n = data.len() as u64;
        self.log
            .lock()
            .unwrap()
            .copies
            .push((local.to_path_buf(), guest_path.to_string(), data));
        Ok(n)
    }

    fn exec(
        &mut self,
        cmd: &GuestCommand,
        stdin: Option<Box<dyn Read + Send>>,
        sink: &mut OutputSink<'_>,
    ) -> Result<ExitStatus, BakeError> {
        let mut input = Vec::new();
        if let Some(mut s) = stdin {
            s.read_to_end(&mut input).unwrap();
        }
        {
            let mut log = self.log.lock().unwrap();
            log.execs.push(cmd.clone());
            log.stdin.push(input);
        }
        // "hang" runs until the VM is stopped, then the connection breaks;
        // "break" breaks it while the VM goes on.
        let script = cmd.argv.get(2).map(String::as_str);
        if script == Some("hang") {
            while !self.log.lock().unwrap().interrupted {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        if matches!(script, Some("hang" | "break")) {
            return Err(BakeError::Guest {
                context: "run /bin/sh".into(),
                source: ClientError::Protocol(ferry_protocol::ProtocolError::Closed),
                diagnosis: None,
            });
        }
        let (chunks, code) = (self.script)(cmd);
        for (stream, data) in chunks {
            sink(stream, &data).map_err(|source| BakeError::Io {
                context: "sink".into(),
                source,
            })?;
        }
        Ok(exited(code))
    }

    fn read_file(&mut self, path: &str) -> Result<Option<Vec<u8>>, BakeError> {
        Ok(self.log.lock().unwrap().files.get(path).cloned())
    }

    fn write_file(&mut self, path: &str, _mode: u32, data: &[u8]) -> Result<(), BakeError> {
        self.log
            .lock()
            .unwrap()
            .files
            .insert(path.to_string(), data.to_vec());
        Ok(())
    }

    fn diagnose(&self) -> Option<String> {
        let removed = self.log.lock().unwrap().removed;
        Some(format!(
            "{} console tail, removed {removed} times",
            self.name
        ))
    }

    fn remove(&mut self) -> Result<(), BakeError> {
        self.log.lock().unwrap().removed += 1;
        Ok(())
    }
}

/// Records progress events as text.
#[derive(Default)]
struct Recorder {
    events: Vec<String>,
    output: Vec<u8>,
    last_export: (u64, u64),
}

impl BakeProgress for Recorder {
    fn booting(&mut self, vm: &str, image: &str) {
        self.events.push(format!("booting {image}"));
        assert!(vm.starts_with("bake-"));
    }
    fn step_started(&mut self, number: usize, total: usize, step: &Step) {
        self.events.push(step_header(number, total, step));
    }
    fn step_output(&mut self, _stream: OutputStream, data: &[u8]) {
        self.output.extend_from_slice(data);
    }
    fn step_finished(&mut self, number: usize, total: usize, _elapsed: Duration) {
        self.events.push(format!("done {number}/{total}"));
    }
    fn exporting(&mut self) {
        self.events.push("exporting".into());
    }
    fn export_progress(&mut self, tar_bytes: u64, file_bytes: u64) {
        assert!(tar_bytes >= self.last_export.0, "monotonic");
        self.last_export = (tar_bytes, file_bytes);
    }
    fn note(&mut self, message: &str) {
        self.events.push(format!("note: {message}"));
    }
}

fn dir_entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn a_bake_runs_steps_in_order_records_config_and_writes_the_tarball() {
    let tmp = tempfile::tempdir().unwrap();
    let script = tmp.path().join("hello.sh");
    std::fs::write(&script, b"#!/bin/sh\necho hello\n").unwrap();
    let tree = tmp.path().join("site");
    std::fs::create_dir_all(tree.join("sub")).unwrap();
    std::fs::write(tree.join("sub/inner.txt"), b"inner content").unwrap();
    let outdir = tmp.path().join("out");
    std::fs::create_dir(&outdir).unwrap();
    let spec = BakeSpec::new(outdir.join("img.tar.gz"))
        .copy(&script, "/usr/local/bin/")
        .copy(&tree, "site")
        .run("hello.sh > /greeting")
        .env("GREETING", "hi")
        .workdir("/app")
        .cmd(["cat", "/greeting"]);
    let mut launcher = FakeLauncher::new();
    // The base image already has defaults: env merges, cmd is replaced.
    launcher.log().files.insert(
        "/etc/ferry/image.json".into(),
        br#"{"cmd":["old"],"env":{"BASE":"1"}}"#.to_vec(),
    );
    let mut progress = Recorder::default();
    let report = bake_with(&spec, &mut launcher, &mut progress).unwrap();

    assert_eq!(
        progress.events,
        vec![
            "booting base".to_string(),
            format!("step 1/3: copy {} -> /usr/local/bin/", script.display()),
            "done 1/3".into(),
            format!("step 2/3: copy {} -> site", tree.display()),
            "done 2/3".into(),
            "step 3/3: hello.sh > /greeting".into(),
            "done 3/3".into(),
            "exporting".into(),
        ]
    );
    assert_eq!(progress.output, b"out\nerr\n");

    let log = launcher.log();
    assert_eq!((log.launches, log.removed), (1, 1));
    // The workdir is made first; the directory copy streams a tar into the
    // guest; the run step gets the env and workdir; the export comes last.
    assert_eq!(log.execs[0].argv, ["mkdir", "-p", "--", "/app"]);
    assert_eq!(log.execs[1].argv[4], "/app/site");
    let streamed = &log.stdin[1];
    assert!(streamed.windows(13).any(|w| w == b"inner content"));
    assert!(streamed.windows(13).any(|w| w == b"sub/inner.txt"));
    let run = &log.execs[2];
    assert_eq!(run.argv, ["/bin/sh", "-c", "hello.sh > /greeting"]);
    assert_eq!(run.cwd.as_deref(), Some("/app"));
    assert!(run.env.contains(&("GREETING".into(), "hi".into())));
    // The base image's env applies to steps as it will at run time.
    assert!(run.env.contains(&("BASE".into(), "1".into())));
    assert!(run
        .env
        .contains(&("DEBIAN_FRONTEND".into(), "noninteractive".into())));
    assert_eq!(log.execs[3].argv, export_command(false));
    assert_eq!(log.execs.len(), 4);
    assert_eq!(log.copies.len(), 1);
    assert_eq!(log.copies[0].1, "/usr/local/bin/hello.sh");

    let config: ImageConfig = serde_json::from_slice(&log.files["/etc/ferry/image.json"]).unwrap();
    assert_eq!(config.cmd, Some(vec!["cat".into(), "/greeting".into()]));
    assert_eq!(config.workdir.as_deref(), Some("/app"));
    assert_eq!(config.env.get("BASE").map(String::as_str), Some("1"));
    assert_eq!(config.env.get("GREETING").map(String::as_str), Some("hi"));
    assert_eq!(report.config, config);
    // The bake VM's hostname is not left in the image.
    assert_eq!(log.files["/etc/hosts"], b"127.0.0.1\tlocalhost\n");

    // Exactly the export stream, gzipped, under the final name only.
    assert_eq!(dir_entries(&outdir), vec!["img.tar.gz".to_string()]);
    let mut back = Vec::new();
    flate2::read::GzDecoder::new(std::fs::File::open(outdir.join("img.tar.gz")).unwrap())
        .read_to_end(&mut back)
        .unwrap();
    assert_eq!(back, export_bytes());
    assert_eq!(report.tar_bytes, back.len() as u64);
    assert_eq!(
        report.bytes,
        std::fs::metadata(outdir.join("img.tar.gz")).unwrap().len()
    );
    assert_eq!(progress.last_export.0, report.tar_bytes);
    assert_eq!(report.compression, Compression::Gzip);
    assert_eq!(report.steps, 3);
}

#[test]
fn a_failing_step_stops_the_bake_and_leaves_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("img.tar.zst");
    // A previous image under the same name survives a failed bake.
    std::fs::write(&out, b"previous").unwrap();
    let spec = BakeSpec::new(&out)
        .run("true")
        .run("echo before; exit 3")
        .run("echo never");
    let mut launcher = FakeLauncher::new();
    let mut progress = Recorder::default();
    let err = bake_with(&spec, &mut launcher, &mut progress).unwrap_err();
    assert_eq!(err.code(), "BAKE_STEP_FAILED");
    match &err {
        BakeError::StepFailed {
            number,
            total,
            command,
            code,
            status,
        } => {
            assert_eq!((*number, *total, *code), (2, 3, Some(3)));
            assert_eq!(command, "echo before; exit 3");
            assert_eq!(status, "exit status 3");
        }
        other => panic!("{other:?}"),
    }
    let shown = err.to_string();
    assert!(
        shown.contains("step 2/3") && shown.contains("exit 3"),
        "{shown}"
    );
    // The step's output reached the user before the error.
    assert!(String::from_utf8_lossy(&progress.output).contains("before"));
    let log = launcher.log();
    assert_eq!(log.execs.len(), 2, "nothing after the failing step");
    assert_eq!(log.removed, 1, "the bake VM is removed");
    assert!(!log.files.contains_key("/etc/ferry/image.json"));
    assert_eq!(dir_entries(tmp.path()), vec!["img.tar.zst".to_string()]);
    assert_eq!(std::fs::read(&out).unwrap(), b"previous");
}

#[test]
fn a_broken_connection_is_reported_with_what_the_vm_was_doing() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = BakeSpec::new(tmp.path().join("img.tar")).run("break");
    let mut launcher = FakeLauncher::new();
    let err = bake_with(&spec, &mut launcher, &mut Recorder::default()).unwrap_err();
    assert_eq!(err.code(), "AGENT_PROTOCOL");
    // Asked before the VM (and its logs) went away.
    let hint = err.hint().unwrap_or_default();
    assert!(hint.contains("console tail, removed 0 times"), "{hint}");
    assert_eq!(launcher.log().removed, 1);
    // A step that fails on its own gets no post-mortem.
    let spec = BakeSpec::new(tmp.path().join("img.tar")).run("exit 3");
    let err = bake_with(&spec, &mut FakeLauncher::new(), &mut Recorder::default()).unwrap_err();
    assert!(!err.hint().unwrap_or_default().contains("console tail"));
    assert!(dir_entries(tmp.path()).is_empty());
}

#[test]
fn inputs_are_checked_before_a_guest_is_launched() {
    let tmp = tempfile::tempdir().unwrap();
    let mut launcher = FakeLauncher::new();
    let spec = BakeSpec::new(tmp.path().join("x.tar")).copy(tmp.path().join("nope"), "/x");
    let err = bake_with(&spec, &mut launcher, &mut Silent).unwrap_err();
    assert_eq!(err.code(), "BAKE_COPY_SOURCE_MISSING");
    assert!(err.to_string().contains("nope"));

    let spec = BakeSpec::new(tmp.path().join("no/such/dir/x.tar")).run("true");
    let err = bake_with(&spec, &mut launcher, &mut Silent).unwrap_err();
    assert_eq!(err.code(), "BAKE_OUTPUT_UNWRITABLE");

    let spec = BakeSpec::new(tmp.path().join("x.iso"));
    assert_eq!(
        bake_with(&spec, &mut launcher, &mut Silent)
            .unwrap_err()
            .code(),
        "BAKE_OUTPUT_FORMAT"
    );
    let spec = BakeSpec::new(tmp.path().join("x.tar")).workdir("app");
    assert_eq!(
        bake_with(&spec, &mut launcher, &mut Silent)
            .unwrap_err()
            .code(),
        "BAKE_SPEC_INVALID"
    );
    assert_eq!(launcher.log().launches, 0);
    assert!(dir_entries(tmp.path()).is_empty());
}

#[test]
fn a_failed_launch_leaves_no_output() {
    let tmp = tempfile::tempdir().unwrap();
    let mut launcher = FakeLauncher::new();
    launcher.fail_launch = true;
    let spec = BakeSpec::new(tmp.path().join("x.tar")).run("true");
    let err = bake_with(&spec, &mut launcher, &mut Silent).unwrap_err();
    assert_eq!(err.code(), "BAKE_SETUP_FAILED");
    assert!(dir_entries(tmp.path()).is_empty());
}

#[test]
fn export_failures_and_warnings() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("x.tar");
    let mut launcher = FakeLauncher::with_script(Arc::new(|cmd: &GuestCommand| {
        if cmd.argv[0] == "tar" {
            (
                vec![
                    (OutputStream::Stdout, b"partial".to_vec()),
                    (OutputStream::Stderr, b"tar: ./etc: Cannot open\n".to_vec()),
                ],
                2,
            )
        } else {
            (Vec::new(), 0)
        }
    }));
    let err = bake_with(&BakeSpec::new(&out), &mut launcher, &mut Silent).unwrap_err();
    assert_eq!(err.code(), "BAKE_EXPORT_FAILED");
    assert!(err.hint().unwrap().contains("Cannot open"));
    assert_eq!(launcher.log().removed, 1);
    assert!(dir_entries(tmp.path()).is_empty());

    // Exit 1 ("file changed as we read it") keeps the archive and says so.
    let mut launcher = FakeLauncher::with_script(Arc::new(|cmd: &GuestCommand| {
        if cmd.argv[0] == "tar" {
            (
                vec![
                    (OutputStream::Stdout, b"whole".to_vec()),
                    (
                        OutputStream::Stderr,
                        b"tar: ./var/log/x: file changed as we read it\n".to_vec(),
                    ),
                ],
                1,
            )
        } else {
            (Vec::new(), 0)
        }
    }));
    let mut progress = Recorder::default();
    bake_with(&BakeSpec::new(&out), &mut launcher, &mut progress).unwrap();
    assert_eq!(std::fs::read(&out).unwrap(), b"whole");
    assert!(progress
        .events
        .iter()
        .any(|e| e.starts_with("note:") && e.contains("./var/log/x")));

    // The excluded mount points changing is no news.
    let mut launcher = FakeLauncher::with_script(Arc::new(|cmd: &GuestCommand| {
        if cmd.argv[0] == "tar" {
            (
                vec![
                    (OutputStream::Stdout, b"whole".to_vec()),
                    (
                        OutputStream::Stderr,
                        b"tar: ./sys: file changed as we read it\n".to_vec(),
                    ),
                ],
                1,
            )
        } else {
            (Vec::new(), 0)
        }
    }));
    let mut progress = Recorder::default();
    bake_with(&BakeSpec::new(&out), &mut launcher, &mut progress).unwrap();
    assert!(
        !progress.events.iter().any(|e| e.starts_with("note:")),
        "{:?}",
        progress.events
    );
}

#[test]
fn cancelling_stops_the_guest_and_leaves_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let cancel = Arc::new(AtomicBool::new(false));
    let mut spec = BakeSpec::new(tmp.path().join("x.tar.gz"))
        .run("hang")
        .run("echo never");
    spec.cancel = Some(cancel.clone());
    let trigger = {
        let cancel = cancel.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            cancel.store(true, Ordering::SeqCst);
        })
    };
    let mut launcher = FakeLauncher::new();
    let err = bake_with(&spec, &mut launcher, &mut Silent).unwrap_err();
    trigger.join().unwrap();
    assert_eq!(err.code(), "BAKE_CANCELLED");
    let log = launcher.log();
    assert!(log.interrupted);
    assert_eq!(log.removed, 1);
    assert_eq!(log.execs.len(), 1);
    assert!(dir_entries(tmp.path()).is_empty());
}

#[test]
fn provision_turns_packages_into_one_apt_step() {
    let spec = BakeSpec::provision(&["nodejs", "jq"], &["node", "/app/server.js"], "n.tar.gz");
    assert_eq!(
        spec.steps,
        vec![Step::Run(
            "apt-get update && apt-get install -y --no-install-recommends nodejs jq \
             && apt-get clean && rm -rf /var/lib/apt/lists/*"
                .into()
        )]
    );
    assert_eq!(
        spec.cmd,
        Some(vec!["node".to_string(), "/app/server.js".to_string()])
    );
    assert_eq!(spec.out, PathBuf::from("n.tar.gz"));
    let bare = BakeSpec::provision(&[], &[], "n.tar");
    assert!(bare.steps.is_empty() && bare.cmd.is_none());
    // Odd names cannot break out of the shell command.
    let odd = BakeSpec::provision(&["a b", "x'; rm -rf /"], &[], "n.tar");
    assert_eq!(
        odd.steps[0],
        Step::Run(
            "apt-get update && apt-get install -y --no-install-recommends 'a b' 'x'\\''; rm -rf /' \
             && apt-get clean && rm -rf /var/lib/apt/lists/*"
                .into()
        )
    );
}

#[test]
fn step_summaries_are_one_short_line() {
    assert_eq!(
        step_header(2, 3, &Step::Run("apt-get install -y nodejs".into())),
        "step 2/3: apt-get install -y nodejs"
    );
    assert_eq!(
        Step::Run("set -e\n  make\n  make install\n".into()).summary(),
        "set -e …"
    );
    assert_eq!(Step::Run("a    b\tc".into()).summary(), "a b c");
    let long = "x".repeat(300);
    let s = Step::Run(long).summary();
    assert_eq!(s.chars().count(), 100);
    assert!(s.ends_with('…'));
    assert_eq!(
        Step::Copy {
            from: "a/b.js".into(),
            to: "/app/".into()
        }
        .summary(),
        "copy a/b.js -> /app/"
    );
}

#[test]
fn export_command_excludes_runtime_filesystems() {
    let argv = export_command(false);
    assert_eq!(argv[0], "tar");
    for flag in ["--numeric-owner", "--xattrs", "--one-file-system"] {
        assert!(argv.iter().any(|a| a == flag), "{flag}");
    }
    for dir in ["proc", "sys", "dev", "run", "tmp"] {
        assert!(argv.contains(&format!("--exclude=./{dir}/*")), "{dir}");
    }
    assert_eq!(argv.last().map(String::as_str), Some("."));
}

#[test]
fn shell_quoting() {
    assert_eq!(shell_quote("libc6:amd64=2.36"), "libc6:amd64=2.36");
    assert_eq!(shell_quote(""), "''");
    assert_eq!(shell_quote("$(x)"), "'$(x)'");
}

#[test]
fn shell_less_registry_images_bake_with_the_agents_tools_and_keep_their_config() {
    let tmp = tempfile::tempdir().unwrap();
    let tree = tmp.path().join("site");
    std::fs::create_dir_all(&tree).unwrap();
    std::fs::write(tree.join("index.html"), b"hello").unwrap();
    let out = tmp.path().join("img.tar.zst");
    let spec = BakeSpec::new(&out).copy(&tree, "site").env("EXTRA", "1");
    let mut launcher = FakeLauncher::new();
    {
        let mut log = launcher.log();
        log.tools = true;
        log.defaults = Some(ImageConfig {
            cmd: Some(vec!["/bin/app".into()]),
            env: [("PATH".to_string(), "/bin".to_string())].into(),
            workdir: Some("/work".into()),
            user: Some("1234:1234".into()),
        });
    }
    let report = bake_with(&spec, &mut launcher, &mut Recorder::default()).unwrap();
    let log = launcher.log();
    // No shell, no tar, no mkdir from the image: only the agent's tools.
    let argvs: Vec<&Vec<String>> = log.execs.iter().map(|c| &c.argv).collect();
    assert_eq!(
        argvs,
        [
            &ferry_protocol::tools::mkdir("/work"),
            &ferry_protocol::tools::tar_extract("/work/site"),
            &export_command(true),
        ]
    );
    assert!(export_command(true).contains(&"--one-file-system".to_string()));
    assert!(log.stdin[1].windows(5).any(|w| w == b"hello"));
    // The registry config is the base the spec's settings go over.
    let config: ImageConfig = serde_json::from_slice(&log.files["/etc/ferry/image.json"]).unwrap();
    assert_eq!(config.cmd, Some(vec!["/bin/app".into()]));
    assert_eq!(config.user.as_deref(), Some("1234:1234"));
    assert_eq!(config.workdir.as_deref(), Some("/work"));
    assert_eq!(config.env.get("PATH").map(String::as_str), Some("/bin"));
    assert_eq!(config.env.get("EXTRA").map(String::as_str), Some("1"));
    assert_eq!(report.config, config);
    assert_eq!(report.tar_bytes, export_bytes().len() as u64);
}
