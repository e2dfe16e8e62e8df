//! What each subcommand does, one module per subcommand (what users can
//! type is in [`crate::cli`]).

pub mod bake;
pub mod bench_dirty;
pub mod bench_pool;
pub mod bench_rtt;
pub mod boot;
pub mod completions;
pub mod cp;
pub mod exec;
pub mod fork;
pub mod gc;
pub mod images;
pub mod inspect;
pub mod install;
pub mod logs;
pub mod ls;
pub mod migrate;
pub mod restore;
pub mod rm;
pub mod snapshot;
pub mod stop;
pub mod store;
pub mod template;
pub mod vms;

use ferry::{Failure, Runtime};

use crate::cli::Command;
use crate::output::Output;

/// Runs `command`; gives the status ferry exits with when it succeeded as
/// far as ferry is concerned (a guest command's own status for `exec` and
/// attached `boot`).
pub fn run(rt: &Runtime, command: Command, out: &Output) -> Result<u8, Failure> {
    let json = out.json;
    let done = |r: Result<(), Failure>| r.map(|()| 0);
    match command {
        Command::Install(args) => done(install::run(rt, args, json)),
        Command::Boot(args) => boot::run(rt, args, out),
        Command::Exec(args) => exec::run(rt, args, out),
        Command::Bake(args) => bake::run(rt, args, out),
        Command::Cp(args) => done(cp::run(rt, args, out)),
        Command::Ps(args) => done(ls::run(rt, args, ls::Scope::Running, out)),
        Command::Ls(args) => done(ls::run(rt, args, ls::Scope::All, out)),
        Command::Logs(args) => done(logs::run(rt, args, out)),
        Command::Stop(args) => done(stop::run(rt, args, out)),
        Command::Kill(args) => done(vms::run(rt, args, vms::Action::Kill, out)),
        Command::Pause(args) => done(vms::run(rt, args, vms::Action::Pause, out)),
        Command::Resume(args) => done(vms::run(rt, args, vms::Action::Resume, out)),
        Command::Rm(args) => done(rm::run(rt, args, out)),
        Command::Gc(args) => done(gc::run(rt, args, json)),
        Command::Snapshot(args) => done(snapshot::run(rt, args, out)),
        Command::Restore(args) => done(restore::run(rt, args, out)),
        Command::Push(args) => done(store::push(rt, args, out)),
        Command::PullBundle(args) => done(store::pull_bundle(rt, args, out)),
        Command::Migrate(args) => done(migrate::run(rt, args, out)),
        Command::Receive(args) => done(migrate::receive(rt, args, out)),
        Command::Fork(args) => done(fork::run(rt, args, out)),
        Command::Inspect(args) => done(inspect::run(rt, args, json)),
        Command::Template(args) => done(template::run(rt, args, json)),
        Command::Pull(args) => done(images::pull(rt, args, json)),
        Command::Images => done(images::list(rt, json)),
        Command::Rmi(args) => done(images::remove(rt, args, json)),
        Command::BenchRtt(args) => done(bench_rtt::run(rt, args)),
        Command::BenchPool(args) => done(bench_pool::run(rt, args)),
        Command::BenchDirty(args) => done(bench_dirty::run(rt, args)),
        Command::Completions(args) => {
            completions::run(args);
            Ok(0)
        }
    }
}

/// Parses `-p` specs here rather than in clap, so a bad one gets ferry's error code.
pub fn parse_ports(specs: &[String]) -> Result<Vec<ferry::PortForward>, ferry::Failure> {
    specs
        .iter()
        .map(|p| p.parse::<ferry::PortForward>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(Into::into)
}
