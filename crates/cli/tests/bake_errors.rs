//! `ferry bake` refuses bad input before booting anything: a stable code, a hint,
//! a non-zero exit, no VM and no output file. No KVM or assets needed.

use std::path::Path;
use std::process::{Command, Output};

fn ferry(home: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(args)
        .env("FERRY_DATA_DIR", home.join("data"))
        .env("FERRY_CACHE_DIR", home.join("cache"))
        .output()
        .expect("run ferry")
}

fn assert_code(out: &Output, code: &str) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "expected failure, got success");
    assert!(
        stderr.contains(&format!("error[{code}]")),
        "expected {code}, got: {stderr}"
    );
    assert!(stderr.contains("hint:"), "no hint: {stderr}");
    assert!(!stderr.contains("panicked"), "panic: {stderr}");
    stderr
}

/// Nothing but what the test itself put there.
fn assert_untouched(home: &Path, dir: &Path, expected: &[&str]) {
    assert!(
        !home.join("data/vms").exists()
            || std::fs::read_dir(home.join("data/vms")).unwrap().count() == 0,
        "a VM was created"
    );
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, expected);
}

#[test]
fn missing_copy_source_is_refused_before_booting() {
    let home = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("img.tar.gz");
    let r = ferry(
        home.path(),
        &[
            "bake",
            "-o",
            out.to_str().unwrap(),
            "--copy",
            "/no/such/file.sh:/usr/local/bin/file.sh",
            "--run",
            "true",
        ],
    );
    let stderr = assert_code(&r, "BAKE_COPY_SOURCE_MISSING");
    assert!(stderr.contains("/no/such/file.sh"), "{stderr}");
    assert_untouched(home.path(), work.path(), &[]);
}

#[test]
fn unwritable_or_unnamed_output_is_refused() {
    let home = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let missing_dir = work.path().join("no/such/dir/img.tar.gz");
    let r = ferry(
        home.path(),
        &["bake", "-o", missing_dir.to_str().unwrap(), "--run", "true"],
    );
    assert_code(&r, "BAKE_OUTPUT_UNWRITABLE");
    let r = ferry(
        home.path(),
        &["bake", "-o", work.path().to_str().unwrap(), "--run", "true"],
    );
    assert_code(&r, "BAKE_OUTPUT_FORMAT");
    let iso = work.path().join("img.iso");
    let r = ferry(home.path(), &["bake", "-o", iso.to_str().unwrap()]);
    assert_code(&r, "BAKE_OUTPUT_FORMAT");
    let r = ferry(home.path(), &["bake", "--run", "true"]);
    assert_code(&r, "BAKE_BAD_ARGUMENTS");
    assert_untouched(home.path(), work.path(), &[]);
}

#[test]
fn invalid_recipes_name_the_file_and_line() {
    let home = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let recipe = work.path().join("app.toml");
    std::fs::write(
        &recipe,
        "output = \"app.tar.gz\"\n[[step]]\nrun = \"true\"\ncopy = { from = \"a\", to = \"/a\" }\n",
    )
    .unwrap();
    let r = ferry(home.path(), &["bake", "-f", recipe.to_str().unwrap()]);
    let stderr = assert_code(&r, "BAKE_RECIPE_INVALID");
    assert!(stderr.contains("app.toml line 2"), "{stderr}");
    assert!(stderr.contains("both `copy` and `run`"), "{stderr}");

    std::fs::write(&recipe, "output = \"app.tar.gz\"\ncmd = [\"a\", 1]\n").unwrap();
    let r = ferry(home.path(), &["bake", "-f", recipe.to_str().unwrap()]);
    let stderr = assert_code(&r, "BAKE_RECIPE_INVALID");
    assert!(stderr.contains("line 2"), "{stderr}");

    // Copy sources are taken from the recipe's directory.
    std::fs::write(
        &recipe,
        "output = \"app.tar.gz\"\n[[step]]\ncopy = { from = \"server.js\", to = \"/app/\" }\n",
    )
    .unwrap();
    let r = ferry(home.path(), &["bake", "-f", recipe.to_str().unwrap()]);
    let stderr = assert_code(&r, "BAKE_COPY_SOURCE_MISSING");
    let expected = work.path().join("server.js");
    assert!(
        stderr.contains(expected.to_str().unwrap()),
        "{stderr} should name {}",
        expected.display()
    );

    let r = ferry(home.path(), &["bake", "-f", "/no/such/recipe.toml"]);
    assert_code(&r, "BAKE_RECIPE_UNREADABLE");
    assert_untouched(home.path(), work.path(), &["app.toml"]);
}

#[test]
fn json_errors_carry_the_code() {
    let home = tempfile::tempdir().unwrap();
    let r = ferry(
        home.path(),
        &[
            "--json",
            "bake",
            "-o",
            "/no/such/dir/x.tar",
            "--run",
            "true",
        ],
    );
    assert_eq!(r.status.code(), Some(125));
    assert!(r.stdout.is_empty());
    let v: serde_json::Value = serde_json::from_slice(&r.stderr).unwrap();
    assert_eq!(v["code"], "BAKE_OUTPUT_UNWRITABLE");
}
