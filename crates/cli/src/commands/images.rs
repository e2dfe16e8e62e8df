//! `ferry pull`, `ferry images` and `ferry rmi`.

use ferry::{CachedImage, Failure, PullOptions, Runtime};

use crate::cli::images::{PullArgs, RmiArgs};
use crate::output::human_bytes;
use crate::progress::{Bar, Display};

fn summary(image: &CachedImage, reference: Option<&str>) -> serde_json::Value {
    serde_json::json!({
        "reference": reference.or(image.references.last().map(String::as_str)),
        "references": image.references,
        "digest": image.digest,
        "id": image.id(),
        "size": image.size,
        "created": image.created,
        "layers": image.spec.diff_ids.len(),
        "platform": image.spec.platform,
    })
}

/// `ferry pull`: one progress bar per layer on a terminal.
pub fn pull(rt: &Runtime, args: PullArgs, json: bool) -> Result<(), Failure> {
    let display = Display::new(json);
    let mut bars: Vec<Bar> = Vec::new();
    let options = PullOptions {
        insecure_registries: args.insecure_registries,
    };
    let image = rt.pull_image(&args.reference, &options, &mut |p| {
        while bars.len() <= p.layer {
            let n = bars.len();
            bars.push(display.bytes(&format!("layer {}/{}", n + 1, p.layers), None));
        }
        bars[p.layer].set(p.received, (p.size > 0).then_some(p.size));
    })?;
    drop(bars);
    if json {
        println!("{}", summary(&image, Some(&args.reference)));
    } else {
        println!(
            "{}: {} ({})",
            args.reference,
            image.digest,
            human_bytes(image.size)
        );
    }
    Ok(())
}

/// `ferry images`.
pub fn list(rt: &Runtime, json: bool) -> Result<(), Failure> {
    let images = rt.images();
    if json {
        let all: Vec<_> = images.iter().map(|i| summary(i, None)).collect();
        println!("{}", serde_json::Value::Array(all));
        return Ok(());
    }
    println!("{:<48} {:<12} {:>10}", "REFERENCE", "ID", "SIZE");
    for image in &images {
        for reference in &image.references {
            println!(
                "{:<48} {:<12} {:>10}",
                reference,
                image.id(),
                human_bytes(image.size)
            );
        }
    }
    Ok(())
}

/// `ferry rmi`: removes each image; fails on the first that is not there.
pub fn remove(rt: &Runtime, args: RmiArgs, json: bool) -> Result<(), Failure> {
    for name in &args.names {
        let image = rt.remove_image(name)?;
        if json {
            println!("{}", summary(&image, Some(name)));
        } else {
            println!("removed {name} ({})", image.digest);
        }
    }
    Ok(())
}
