//! `ferry fork`: clone a running VM; all continue from the same instant.

use ferry::{Failure, ForkOptions, Runtime};

use crate::cli::fork::Args;
use crate::output::{Output, USAGE};
use crate::progress::Display;

/// The new VMs' names: the `--new-name`s, or NAME-1 ... NAME-N for
/// `--count N` (one when neither is given).
pub fn names(
    source: &str,
    new_names: &[String],
    count: Option<u32>,
) -> Result<Vec<String>, Failure> {
    match (new_names.len(), count) {
        (0, count) => Ok((1..=count.unwrap_or(1))
            .map(|i| format!("{source}-{i}"))
            .collect()),
        (n, Some(count)) if n != count as usize => Err(Failure {
            code: USAGE.into(),
            message: format!("--count {count} with {n} --new-name(s): they must agree"),
            hint: Some(format!(
                "ferry fork {source} --count {count} (names {source}-1...), or one --new-name per fork"
            )),
        }),
        _ => Ok(new_names.to_vec()),
    }
}

/// Forks and prints the new VMs' names and what the source paid.
pub fn run(rt: &Runtime, args: Args, out: &Output) -> Result<(), Failure> {
    let started = std::time::Instant::now();
    let names = names(&args.name, &args.new_name, args.count)?;
    let ports = super::parse_ports(&args.publish)?;
    let source = rt.open_running(&args.name)?;
    let (vms, report) = {
        let _forking = Display::new(out.json).spinner(&format!("forking {}", args.name));
        source.fork(&ForkOptions {
            names,
            count: None,
            ports: vec![ports],
        })?
    };
    if out.json {
        out.json(&serde_json::json!({
            "ok": true,
            "name": vms[0].name(),
            "names": vms.iter().map(|v| v.name()).collect::<Vec<_>>(),
            "ready_ms": started.elapsed().as_millis() as u64,
            "source_paused_ms": report.source_paused_ms,
            "copied_bytes": report.copied_bytes,
        }));
    } else {
        for vm in &vms {
            println!("{}", vm.name());
        }
        eprintln!(
            "{} paused {} ms; {} bytes of memory copied",
            args.name, report.source_paused_ms, report.copied_bytes
        );
    }
    if !args.detach {
        super::logs::follow(&vms[0]);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn forks_are_named_from_the_source_or_the_flags() {
        assert_eq!(
            names("web", &[], Some(3)).unwrap(),
            s(&["web-1", "web-2", "web-3"])
        );
        assert_eq!(names("web", &[], None).unwrap(), s(&["web-1"]));
        assert_eq!(names("web", &s(&["a", "b"]), None).unwrap(), s(&["a", "b"]));
        assert_eq!(
            names("web", &s(&["a", "b"]), Some(2)).unwrap(),
            s(&["a", "b"])
        );
        assert_eq!(names("web", &s(&["a"]), Some(2)).unwrap_err().code, USAGE);
    }
}
