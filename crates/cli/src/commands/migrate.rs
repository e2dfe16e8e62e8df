//! `ferry migrate NAME DEST` and `ferry receive`: move a running VM to
//! another host while it keeps running.

use ferry::{Failure, MigrateOptions, MigrateTarget, ReceiveOptions, Runtime};
use std::io::Write;

use crate::cli::migrate::{Args, ReceiveArgs};
use crate::output::Output;

fn usage(message: impl Into<String>) -> Failure {
    Failure {
        code: "USAGE_INVALID".into(),
        message: message.into(),
        hint: Some(
            "ferry migrate NAME HOST:PORT --token TOKEN, or ferry migrate NAME - --via 'CMD'"
                .into(),
        ),
    }
}

/// Parses `10M`-style rates (powers of 1024).
fn parse_rate(s: &str) -> Result<u64, Failure> {
    let (num, mult) = match s.trim().to_ascii_uppercase().chars().last() {
        Some('K') => (&s[..s.len() - 1], 1u64 << 10),
        Some('M') => (&s[..s.len() - 1], 1 << 20),
        Some('G') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    num.trim()
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .filter(|&n| n > 0)
        .ok_or_else(|| {
            usage(format!(
                "--bandwidth-limit {s}: give bytes per second, e.g. 50M"
            ))
        })
}

/// Migrates and prints the report.
pub fn run(rt: &Runtime, args: Args, out: &Output) -> Result<(), Failure> {
    let target = MigrateTarget::from_parts(&args.dest, args.via.clone()).map_err(usage)?;
    let opts = MigrateOptions {
        downtime_ms: args.downtime_ms,
        bandwidth_limit: args
            .bandwidth_limit
            .as_deref()
            .map(parse_rate)
            .transpose()?,
        token: args.token.clone(),
    };
    let vm = rt.open_running(&args.name)?;
    eprintln!("migrating {} to {}", args.name, args.dest);
    let report = vm.migrate(&target, &opts)?;
    if out.json {
        println!(
            "{}",
            serde_json::to_string(&report).expect("report serializes")
        );
        return Ok(());
    }
    let mb = |b: u64| b as f64 / 1e6;
    println!(
        "{} runs on the destination as {}",
        args.name, report.destination
    );
    println!(
        "total {:.2} s, downtime {} ms (destination start {} ms), {} rounds, {:.1} MB in all",
        report.total_ms as f64 / 1000.0,
        report.downtime_ms,
        report.destination_restore_ms,
        report.rounds.len(),
        mb(report.bytes)
    );
    for (i, r) in report.rounds.iter().enumerate() {
        println!(
            "  round {i}: {} pages, {:.1} MB, {} ms",
            r.pages,
            mb(r.bytes),
            r.ms
        );
    }
    println!(
        "  paused: {} pages, {:.1} MB; disk {:.1} MB, disk base {:.1} MB",
        report.final_pages,
        mb(report.final_bytes),
        mb(report.disk_bytes),
        mb(report.disk_base_bytes)
    );
    Ok(())
}

/// Receives one VM and prints its name.
pub fn receive(rt: &Runtime, args: ReceiveArgs, out: &Output) -> Result<(), Failure> {
    let (ports, live_mounts) = super::restore::granted(&args.grants)?;
    let opts = ReceiveOptions {
        name: args.name.clone(),
        ports,
        hostname: None,
        net: args.grants.net,
        live_mounts,
        trust_config: args.grants.trust_bundle_config,
    };
    let mut progress = |m: &str| eprintln!("receive: {m}");
    let (vm, report) = match &args.listen {
        Some(addr) => {
            let receiver = rt.listen_for_migration(addr)?;
            let local = receiver.local_addr()?;
            // The token is for the person starting the migration: on
            // standard output only, never in a log.
            if out.json {
                println!(
                    "{}",
                    serde_json::json!({ "listening": local.to_string(), "token": receiver.token() })
                );
            } else {
                println!("listening on {local}");
                println!("token: {}", receiver.token());
            }
            let _ = std::io::stdout().flush();
            receiver.receive(&opts, &mut progress)?
        }
        None => rt.receive_migration(std::io::stdin(), std::io::stdout(), &opts, &mut progress)?,
    };
    // With --stdio, standard output carries the protocol: report on stderr.
    let line = if out.json {
        serde_json::to_string(&report).expect("report serializes")
    } else {
        vm.name().to_string()
    };
    if args.stdio {
        eprintln!("{line}");
    } else {
        println!("{line}");
    }
    Ok(())
}
