//! Forks one running VM into three siblings from a single pause and runs a
//! command in each: same past, own hostname, own random numbers.
//!
//! `cargo run -p ferry --example fork_three`

use ferry::{BootOptions, Config, ExecOptions, ForkOptions, Runtime};

fn main() -> Result<(), ferry::Error> {
    let rt = Runtime::new(Config::default())?;
    let source = rt.boot(BootOptions::default())?;
    source.exec(
        &["sh", "-c", "echo before > /root/past"],
        &ExecOptions::default(),
    )?;
    let (siblings, report) = source.fork(&ForkOptions {
        count: Some(3),
        ..ForkOptions::default()
    })?;
    println!("source paused {} ms", report.source_paused_ms);
    for vm in &siblings {
        let out = vm.exec(
            &["sh", "-c", "echo $(hostname) $(cat /root/past) $(head -c 8 /dev/urandom | od -An -tx1 | tr -d ' ')"],
            &ExecOptions::default(),
        )?;
        print!("{}: {}", vm.name(), String::from_utf8_lossy(&out.stdout));
    }
    for vm in siblings.iter().chain([&source]) {
        vm.remove()?;
    }
    Ok(())
}
