//! `containerd-shim-ferry-v2`: containerd's runtime `io.containerd.ferry.v2`.
//! Each container runs in its own ferry microVM: its rootfs becomes the
//! VM's disk, its processes run through the guest agent, its stdio goes
//! through containerd's FIFOs. See docs/containerd.md.

mod console;
mod error;
mod process;
mod rootfs;
mod runc;
mod server;
mod service;
mod spec;
mod stdio;

fn main() {
    let argv: Vec<String> = std::env::args().collect();
    // `ferry-runc` (a link to this executable) and its keepers.
    match argv.get(1).map(String::as_str) {
        Some(runc::KEEP) if argv.len() == 3 => {
            std::process::exit(runc::keep(std::path::Path::new(&argv[2])))
        }
        Some(runc::KEEP_EXEC) if argv.len() == 5 => std::process::exit(runc::keep_exec(
            std::path::Path::new(&argv[2]),
            std::path::Path::new(&argv[3]),
            &argv[4],
        )),
        _ => {}
    }
    let called = argv.first().map(std::path::Path::new);
    if called
        .and_then(|p| p.file_name())
        .is_some_and(|n| n == "ferry-runc")
    {
        std::process::exit(runc::main(&argv[1..]));
    }
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    let flags = match containerd_shim::parse(&args) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("containerd-shim-ferry-v2: {e}");
            std::process::exit(2);
        }
    };
    if flags.version {
        println!("containerd-shim-ferry-v2 {}", env!("CARGO_PKG_VERSION"));
        return;
    }
    let result = match flags.action.as_str() {
        "start" => server::start(&flags),
        "delete" => server::delete(&flags),
        "" => server::serve(&flags),
        other => Err(format!("unknown action {other:?} (start, delete)")),
    };
    if let Err(e) = result {
        eprintln!("containerd-shim-ferry-v2: {e}");
        std::process::exit(1);
    }
}
