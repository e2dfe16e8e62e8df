//! `ferry gc`: remove what killed ferry and VMM processes left behind.

use ferry::{Failure, GcReport, Runtime};

use crate::cli::gc::Args;
use crate::output::human_bytes;

/// Collects, then prints what was removed: a line per kind, or with --json
/// `{"ok":true,"removed":{KIND:{"count":N,"bytes":B},...},"kept":[...]}`.
pub fn run(rt: &Runtime, args: Args, json: bool) -> Result<(), Failure> {
    if let Some(store) = &args.store {
        let r = rt.gc_store(store, args.min_age)?;
        if json {
            println!("{}", serde_json::json!({ "ok": true, "store": r }));
        } else {
            println!(
                "{store}: {} pushed VMs, {} chunks; {} removed ({}), {} unreferenced but younger than {} s kept",
                r.manifests,
                r.chunks,
                r.removed,
                human_bytes(r.removed_bytes),
                r.kept_young,
                args.min_age
            );
        }
        return Ok(());
    }
    let report = rt.gc()?;
    if json {
        println!("{}", to_json(&report));
    } else {
        print!("{}", to_text(&report));
    }
    Ok(())
}

fn to_json(report: &GcReport) -> serde_json::Value {
    let mut v = serde_json::to_value(report).expect("the report serializes");
    v["ok"] = serde_json::Value::Bool(true);
    v
}

fn to_text(report: &GcReport) -> String {
    let mut out = String::new();
    for (kind, freed) in &report.removed {
        if freed.count > 0 {
            out.push_str(&format!(
                "{}: {} removed ({})\n",
                kind.describe(),
                freed.count,
                human_bytes(freed.bytes)
            ));
        }
    }
    if report.total().count == 0 {
        out.push_str("nothing to remove\n");
    }
    for kept in &report.kept {
        out.push_str(&format!("kept {kept}\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_has_ok_and_every_kind_and_text_says_what_went() {
        let v = to_json(&GcReport::default());
        assert_eq!(v["ok"], true);
        for kind in [
            "staging",
            "partial_bundles",
            "fifos",
            "abandoned_vms",
            "layers",
            "incoming",
        ] {
            assert_eq!(v["removed"][kind]["count"], 0, "{kind}");
            assert_eq!(v["removed"][kind]["bytes"], 0, "{kind}");
        }
        assert_eq!(to_text(&GcReport::default()), "nothing to remove\n");
        let mut report = GcReport::default();
        report.removed.insert(
            ferry::GcKind::Layers,
            ferry::Freed {
                count: 2,
                bytes: 3 << 20,
            },
        );
        report.kept.push("x: in use by a restore".into());
        assert_eq!(
            to_text(&report),
            "fork disk layers no VM uses: 2 removed (3.0 MiB)\nkept x: in use by a restore\n"
        );
    }
}
