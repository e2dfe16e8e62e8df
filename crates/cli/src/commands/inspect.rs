//! `ferry inspect`: describe a VM or a bundle.

use std::path::Path;

use ferry::{Failure, Runtime};

use crate::cli::inspect::Args;

/// Prints the description (JSON with --json, readable otherwise).
pub fn run(rt: &Runtime, args: Args, json: bool) -> Result<(), Failure> {
    let value = if Path::new(&args.target).is_file() {
        let b = rt.inspect_bundle(Path::new(&args.target))?;
        serde_json::json!({
            "kind": "bundle",
            "path": args.target,
            "bytes": b.bytes,
            // A thin bundle restores only where its disk base already is.
            "thin": b.thin,
            "memory_compressed": b.memory_compressed,
            // An incremental bundle restores only with all of these.
            "chain": b.chain,
            "manifest": b.manifest,
        })
    } else {
        // The agent token is a secret: never printed.
        let info = rt.open(&args.target)?.info();
        serde_json::json!({ "kind": "vm", "vm": info })
    };
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&value).expect("serializable")
        );
    } else {
        println!("{}", serde_yaml_like(&value, 0));
    }
    Ok(())
}

/// An indented key: value rendering for people.
fn serde_yaml_like(v: &serde_json::Value, depth: usize) -> String {
    let pad = "  ".repeat(depth);
    match v {
        serde_json::Value::Object(m) => m
            .iter()
            .map(|(k, v)| match v {
                serde_json::Value::Object(_) | serde_json::Value::Array(_) => {
                    format!("{pad}{k}:\n{}", serde_yaml_like(v, depth + 1))
                }
                _ => format!("{pad}{k}: {}", scalar(v)),
            })
            .collect::<Vec<_>>()
            .join("\n"),
        serde_json::Value::Array(a) => a
            .iter()
            .map(|v| match v {
                serde_json::Value::Object(_) | serde_json::Value::Array(_) => {
                    format!("{pad}-\n{}", serde_yaml_like(v, depth + 1))
                }
                _ => format!("{pad}- {}", scalar(v)),
            })
            .collect::<Vec<_>>()
            .join("\n"),
        _ => format!("{pad}{}", scalar(v)),
    }
}

fn scalar(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}
