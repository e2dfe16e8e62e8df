//! What the command line parses to.

use clap::{CommandFactory, Parser};

use super::{Cli, Command};

fn parse(argv: &[&str]) -> Command {
    Cli::try_parse_from(std::iter::once("ferry").chain(argv.iter().copied()))
        .unwrap_or_else(|e| panic!("{argv:?}: {e}"))
        .command
}

fn exec(argv: &[&str]) -> super::exec::Args {
    match parse(argv) {
        Command::Exec(args) => args,
        other => panic!("not exec: {other:?}"),
    }
}

#[test]
fn the_definition_is_consistent() {
    Cli::command().debug_assert();
}

#[test]
fn exec_takes_the_command_without_a_double_dash() {
    let a = exec(&["exec", "web", "ls", "-la", "/tmp"]);
    assert_eq!(a.name, "web");
    assert_eq!(a.command, ["ls", "-la", "/tmp"]);
    assert!(!a.interactive && !a.tty);
    // Options after the command's first word are the command's.
    let a = exec(&["exec", "web", "sh", "-c", "echo hi", "--json", "-i"]);
    assert_eq!(a.command, ["sh", "-c", "echo hi", "--json", "-i"]);
    assert!(!a.interactive);
}

#[test]
fn exec_still_accepts_a_double_dash() {
    let a = exec(&["exec", "web", "--", "ls", "-la"]);
    assert_eq!(a.command, ["ls", "-la"]);
    let a = exec(&["exec", "-e", "A=1", "web", "--", "env"]);
    assert_eq!(a.env, [("A".to_string(), "1".to_string())]);
    assert_eq!(a.command, ["env"]);
}

#[test]
fn exec_it_is_interactive_and_on_a_tty() {
    let a = exec(&["exec", "-it", "web", "sh"]);
    assert!(a.interactive && a.tty);
    assert_eq!(
        (a.name.as_str(), a.command.as_slice()),
        ("web", &["sh".to_string()][..])
    );
    let a = exec(&[
        "exec", "-i", "-t", "-u", "nobody", "-w", "/tmp", "web", "bash", "-l",
    ]);
    assert!(a.interactive && a.tty);
    assert_eq!(a.user.as_deref(), Some("nobody"));
    assert_eq!(a.workdir.as_deref(), Some("/tmp"));
    assert_eq!(a.command, ["bash", "-l"]);
    let a = exec(&["exec", "-t", "web", "top"]);
    assert!(a.tty && !a.interactive);
}

#[test]
fn exec_needs_a_command() {
    assert!(Cli::try_parse_from(["ferry", "exec", "web"]).is_err());
    assert!(Cli::try_parse_from(["ferry", "exec", "web", "--"]).is_err());
}

#[test]
fn ps_ls_and_the_vm_commands() {
    match parse(&["ps", "-aq"]) {
        Command::Ps(a) => assert!(a.all && a.quiet),
        other => panic!("{other:?}"),
    }
    match parse(&["ls", "-q"]) {
        Command::Ls(a) => assert!(a.quiet && !a.all),
        other => panic!("{other:?}"),
    }
    match parse(&["stop", "--time", "3", "a", "b"]) {
        Command::Stop(a) => assert_eq!((a.time, a.names.len()), (3, 2)),
        other => panic!("{other:?}"),
    }
    match parse(&["stop", "a"]) {
        Command::Stop(a) => assert_eq!(a.time, 10),
        other => panic!("{other:?}"),
    }
    for cmd in ["pause", "resume", "kill"] {
        assert!(
            Cli::try_parse_from(["ferry", cmd]).is_err(),
            "{cmd} needs a name"
        );
        parse(&[cmd, "web"]);
    }
    match parse(&["logs", "--tail", "3", "web"]) {
        Command::Logs(a) => assert_eq!(a.tail, Some(3)),
        other => panic!("{other:?}"),
    }
    match parse(&["logs", "-n", "all", "web"]) {
        Command::Logs(a) => assert_eq!(a.tail, Some(usize::MAX)),
        other => panic!("{other:?}"),
    }
    assert!(Cli::try_parse_from(["ferry", "logs", "--tail", "x", "web"]).is_err());
    match parse(&["cp", "-r", "web:/etc", "."]) {
        Command::Cp(a) => assert!(a.recursive),
        other => panic!("{other:?}"),
    }
}

#[test]
fn fork_takes_a_count_or_names() {
    match parse(&["fork", "web", "--count", "3"]) {
        Command::Fork(a) => {
            assert_eq!(a.count, Some(3));
            assert!(a.new_name.is_empty());
        }
        other => panic!("{other:?}"),
    }
    match parse(&["fork", "web", "--new-name", "a", "--new-name", "b", "-d"]) {
        Command::Fork(a) => {
            assert_eq!(a.new_name, ["a", "b"]);
            assert!(a.detach && a.count.is_none());
        }
        other => panic!("{other:?}"),
    }
    assert!(Cli::try_parse_from(["ferry", "fork", "web", "--count", "0"]).is_err());
}

#[test]
fn json_is_global_and_completions_name_a_shell() {
    let cli = Cli::try_parse_from(["ferry", "ps", "--json"]).unwrap();
    assert!(cli.json);
    match parse(&["completions", "zsh"]) {
        Command::Completions(a) => assert_eq!(a.shell, super::completions::Shell::Zsh),
        other => panic!("{other:?}"),
    }
    assert!(Cli::try_parse_from(["ferry", "completions", "tcsh"]).is_err());
}
