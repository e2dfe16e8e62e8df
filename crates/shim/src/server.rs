//! The shim's process life, as containerd drives it: `start` launches the
//! long-lived server and prints its address, the server serves the task
//! API over ttrpc until containerd shuts it down, and `delete` cleans up
//! after a server that died.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::fd::IntoRawFd;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::Arc;

use containerd_shim::protos::bootstrap_api::{BootstrapParams, BootstrapResult};
use containerd_shim::protos::protobuf::Message;
use containerd_shim::protos::shim::shim_ttrpc::create_task;
use containerd_shim::protos::ttrpc::{MethodHandler, Server};
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{api, ExitSignal, Flags, StartOpts};

use crate::service::{vm_name, Service};

/// Method names of the task API: containerd 2 speaks `containerd.task.v3`,
/// containerd 1.x `containerd.task.v2`, with the same messages.
const TASK_V3: &str = "/containerd.task.v3.Task/";
const TASK_V2: &str = "/containerd.task.v2.Task/";

/// The task service's methods under both API versions.
pub fn task_methods(
    service: Arc<Service>,
) -> HashMap<String, Box<dyn MethodHandler + Send + Sync>> {
    let mut methods = create_task(service.clone());
    for (name, handler) in create_task(service) {
        if let Some(method) = name.strip_prefix(TASK_V3) {
            methods.insert(format!("{TASK_V2}{method}"), handler);
        }
    }
    methods
}

/// `start`: launches the server for this task and prints its socket's
/// address for containerd: bare, which containerd 1.x requires and 2.x up
/// to 2.2 accept, or as the bootstrap result of containerd 2.3 and later,
/// which pass their parameters on stdin.
pub fn start(flags: &Flags) -> Result<(), String> {
    // Bootstrap parameters, or runtime options (this shim takes none).
    let mut input = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut input);
    let bootstrap = bootstrap_params(&input, flags);
    let mut opts = StartOpts {
        id: flags.id.clone(),
        publish_binary: flags.publish_binary.clone(),
        address: flags.address.clone(),
        ttrpc_address: std::env::var("TTRPC_ADDRESS").unwrap_or_default(),
        namespace: flags.namespace.clone(),
        debug: flags.debug,
        ..StartOpts::default()
    };
    if let Some(p) = &bootstrap {
        opts.ttrpc_address = p.containerd_ttrpc_address.clone();
        if !p.containerd_grpc_address.is_empty() {
            opts.address = p.containerd_grpc_address.clone();
        }
        opts.socket_dir = p.socket_dir.clone();
    }
    let (_, address) = containerd_shim::spawn(opts, &flags.id, Vec::new())
        .map_err(|e| format!("start the shim server: {e}"))?;
    // The server closes the pipe spawn reads once it serves, or by dying:
    // tell containerd the second case, not an address nobody listens on.
    std::os::unix::net::UnixStream::connect(address.trim_start_matches("unix://")).map_err(
        |e| format!("the shim server did not start ({e}); containerd's log has its error"),
    )?;
    let reply = match bootstrap {
        Some(_) => BootstrapResult {
            version: containerd_shim::protos::TASK_API_VERSION,
            address,
            protocol: "ttrpc".into(),
            ..Default::default()
        }
        .write_to_bytes()
        .map_err(|e| format!("encode the bootstrap result: {e}"))?,
        None => address.into_bytes(),
    };
    let mut out = std::io::stdout().lock();
    out.write_all(&reply)
        .and_then(|()| out.flush())
        .map_err(|e| format!("write the address: {e}"))
}

/// The bootstrap parameters of containerd 2.3 and later, when `input` is
/// them (for this task); `None` for earlier versions, whose stdin is empty
/// or runtime options.
fn bootstrap_params(input: &[u8], flags: &Flags) -> Option<BootstrapParams> {
    let p = BootstrapParams::parse_from_bytes(input).ok()?;
    (!input.is_empty() && p.instance_id == flags.id && p.namespace == flags.namespace).then_some(p)
}

/// The server: serves the task API on `flags.socket` until shut down.
pub fn serve(flags: &Flags) -> Result<(), String> {
    if flags.socket.is_empty() {
        return Err("no -socket given: containerd starts the server through `start`".into());
    }
    containerd_shim::logger::init(flags.debug, "info", &flags.namespace, &flags.id)
        .map_err(|e| format!("open the log: {e}"))?;
    let ttrpc_address =
        std::env::var("TTRPC_ADDRESS").map_err(|_| "TTRPC_ADDRESS is not set".to_string())?;
    let publisher =
        RemotePublisher::new(&ttrpc_address).map_err(|e| format!("connect to containerd: {e}"))?;
    let exit = Arc::new(ExitSignal::default());
    let service =
        Service::new(&flags.namespace, publisher, Arc::clone(&exit)).map_err(|e| e.to_string())?;
    let path = flags.socket.trim_start_matches("unix://");
    if let Some(dir) = Path::new(path).parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    }
    // A socket left by a server of this task that died is replaced.
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path).map_err(|e| format!("listen on {path}: {e}"))?;
    let mut server = Server::new()
        .add_listener(listener.into_raw_fd())
        .map_err(|e| format!("serve {path}: {e}"))?
        .register_service(task_methods(Arc::new(service)));
    server.start().map_err(|e| format!("serve {path}: {e}"))?;
    let _ = containerd_shim::synchronous::util::write_address(&flags.socket);
    announce_started();
    log::info!("serving task {} on {}", flags.id, flags.socket);
    exit.wait();
    server.shutdown();
    let _ = std::fs::remove_file(path);
    Ok(())
}

/// Closes the pipe `start` reads until the server is up, by pointing
/// stdout at stderr (where nothing is read).
fn announce_started() {
    // SAFETY: dup2 of the process's own standard descriptors; nothing
    // holds a Rust handle to the stdout descriptor being replaced.
    unsafe {
        libc::dup2(libc::STDERR_FILENO, libc::STDOUT_FILENO);
    }
}

/// `delete`: containerd's cleanup after a server that is gone: removes the
/// task's VM and rootfs image, and reports the task as killed.
pub fn delete(flags: &Flags) -> Result<(), String> {
    if let Ok(rt) = ferry::Runtime::new(ferry::Config::default()) {
        let name = vm_name(&flags.namespace, &flags.id);
        if let Ok(vm) = rt.open(&name) {
            let _ = vm.remove();
        }
        let _ = std::fs::remove_file(crate::rootfs::image_path(&rt, &name));
    }
    let bundle = if flags.bundle.is_empty() {
        std::env::current_dir().map_err(|e| e.to_string())?
    } else {
        flags.bundle.clone().into()
    };
    crate::rootfs::unmount(&bundle.join("rootfs"));
    let response = api::DeleteResponse {
        pid: 0,
        exit_status: 128 + libc::SIGKILL as u32,
        exited_at: containerd_shim::protos::protobuf::MessageField::some(crate::process::now()),
        ..Default::default()
    };
    let bytes = response.write_to_bytes().map_err(|e| e.to_string())?;
    let mut out = std::io::stdout().lock();
    out.write_all(&bytes)
        .and_then(|()| out.flush())
        .map_err(|e| format!("write the response: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_task_api_versions_are_served() {
        // No service is called: only the method table is looked at.
        let names: Vec<String> = create_task_names();
        for method in [
            "Create",
            "Start",
            "Wait",
            "Kill",
            "Exec",
            "Pause",
            "Checkpoint",
        ] {
            assert!(names.contains(&format!("{TASK_V3}{method}")), "{method} v3");
            assert!(names.contains(&format!("{TASK_V2}{method}")), "{method} v2");
        }
    }

    #[test]
    fn bootstrap_parameters_are_told_from_runtime_options() {
        let flags = Flags {
            id: "web".into(),
            namespace: "default".into(),
            ..Flags::default()
        };
        let params = BootstrapParams {
            instance_id: "web".into(),
            namespace: "default".into(),
            containerd_ttrpc_address: "/run/containerd/containerd.sock.ttrpc".into(),
            ..Default::default()
        };
        let got = bootstrap_params(&params.write_to_bytes().unwrap(), &flags).unwrap();
        assert_eq!(
            got.containerd_ttrpc_address,
            "/run/containerd/containerd.sock.ttrpc"
        );
        assert!(bootstrap_params(b"", &flags).is_none());
        let other = BootstrapParams {
            instance_id: "db".into(),
            ..params
        };
        assert!(bootstrap_params(&other.write_to_bytes().unwrap(), &flags).is_none());
        // Runtime options (an Any) are not bootstrap parameters.
        let any = containerd_shim::protos::protobuf::well_known_types::any::Any {
            type_url: "containerd.runc.v1.Options".into(),
            value: vec![8, 1],
            ..Default::default()
        };
        assert!(bootstrap_params(&any.write_to_bytes().unwrap(), &flags).is_none());
    }

    fn create_task_names() -> Vec<String> {
        struct Nothing;
        impl containerd_shim::Task for Nothing {}
        let mut methods = create_task(Arc::new(Nothing));
        let v2: Vec<String> = create_task(Arc::new(Nothing))
            .into_keys()
            .filter_map(|n| n.strip_prefix(TASK_V3).map(|m| format!("{TASK_V2}{m}")))
            .collect();
        let mut names: Vec<String> = methods.drain().map(|(n, _)| n).collect();
        names.extend(v2);
        names
    }
}
