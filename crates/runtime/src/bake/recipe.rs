//! Bake recipes: a TOML file describing an image.
//!
//! ```toml
//! from = "base"                  # or a path to a rootfs tarball / ext4 image
//! output = "counter.tar.gz"
//! env = { NODE_ENV = "production" }
//! workdir = "/app"
//! cmd = ["node", "/app/server.js"]   # or a string, run with /bin/sh -c
//! cpus = 2                       # optional
//! memory = 1024                  # MiB, optional
//!
//! [[step]]
//! copy = { from = "server.js", to = "/app/server.js" }
//! [[step]]
//! run = "apt-get update && apt-get install -y nodejs"
//! ```
//!
//! Host paths (`from`, `output`, `copy.from`) are relative to the recipe file.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::{BakeError, BakeSpec, Step};

/// A parsed recipe, with host paths resolved against the recipe's directory.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Recipe {
    /// Image to start from; `None` for the base image.
    pub from: Option<PathBuf>,
    /// Where to write the tarball, if the recipe says.
    pub output: Option<PathBuf>,
    /// Environment recorded in the image (and set for run steps).
    pub env: BTreeMap<String, String>,
    /// Working directory recorded in the image (and used by run steps).
    pub workdir: Option<String>,
    /// Default command recorded in the image.
    pub cmd: Option<Vec<String>>,
    /// vCPUs of the bake VM.
    pub cpus: Option<u32>,
    /// Memory of the bake VM in MiB.
    pub memory_mib: Option<u32>,
    /// Steps, in order.
    pub steps: Vec<Step>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRecipe {
    from: Option<String>,
    output: Option<String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    workdir: Option<String>,
    cmd: Option<RawCmd>,
    cpus: Option<u32>,
    memory: Option<u32>,
    #[serde(default)]
    step: Vec<toml::Spanned<RawStep>>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawCmd {
    Argv(Vec<String>),
    Shell(String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStep {
    copy: Option<RawCopy>,
    run: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCopy {
    from: String,
    to: String,
}

/// 1-based line of byte offset `at` in `text`.
fn line_of(text: &str, at: usize) -> usize {
    text.as_bytes()[..at.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

impl Recipe {
    /// Reads and parses the recipe at `path`.
    pub fn load(path: &Path) -> Result<Recipe, BakeError> {
        let text = std::fs::read_to_string(path).map_err(|e| BakeError::RecipeUnreadable {
            path: path.to_path_buf(),
            why: e.to_string(),
        })?;
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        Recipe::parse(&text, dir, path)
    }

    /// Parses recipe `text`; relative host paths are taken from `dir`. `origin`
    /// names the file in errors.
    pub fn parse(text: &str, dir: &Path, origin: &Path) -> Result<Recipe, BakeError> {
        let invalid = |line: Option<usize>, message: String| BakeError::RecipeInvalid {
            path: origin.to_path_buf(),
            line,
            message,
        };
        let raw: RawRecipe = toml::from_str(text).map_err(|e| {
            invalid(
                e.span().map(|s| line_of(text, s.start)),
                e.message().trim().to_string(),
            )
        })?;
        let host_path = |p: &str| -> PathBuf {
            let p = Path::new(p);
            if p.is_absolute() {
                p.to_path_buf()
            } else {
                dir.join(p)
            }
        };
        let from = match raw.from.as_deref() {
            None | Some("base") => None,
            Some("") => return Err(invalid(None, "`from` is empty".into())),
            Some(p) => Some(host_path(p)),
        };
        let output = match raw.output.as_deref() {
            None => None,
            Some("") => return Err(invalid(None, "`output` is empty".into())),
            Some(p) => Some(host_path(p)),
        };
        let cmd = match raw.cmd {
            None => None,
            Some(RawCmd::Argv(v)) if v.is_empty() => {
                return Err(invalid(None, "`cmd` is an empty list".into()))
            }
            Some(RawCmd::Argv(v)) => Some(v),
            Some(RawCmd::Shell(s)) if s.trim().is_empty() => {
                return Err(invalid(None, "`cmd` is empty".into()))
            }
            Some(RawCmd::Shell(s)) => Some(vec!["/bin/sh".into(), "-c".into(), s]),
        };
        let mut steps = Vec::with_capacity(raw.step.len());
        for (i, spanned) in raw.step.into_iter().enumerate() {
            let line = Some(line_of(text, spanned.span().start));
            let n = i + 1;
            let step = match spanned.into_inner() {
                RawStep {
                    copy: Some(c),
                    run: None,
                } => {
                    if c.from.is_empty() || c.to.is_empty() {
                        return Err(invalid(
                            line,
                            format!("step {n}: copy needs both `from` and `to`"),
                        ));
                    }
                    Step::Copy {
                        from: host_path(&c.from),
                        to: c.to,
                    }
                }
                RawStep {
                    copy: None,
                    run: Some(r),
                } => {
                    if r.trim().is_empty() {
                        return Err(invalid(line, format!("step {n}: `run` is empty")));
                    }
                    Step::Run(r)
                }
                RawStep {
                    copy: Some(_),
                    run: Some(_),
                } => {
                    return Err(invalid(
                        line,
                        format!("step {n} has both `copy` and `run`; use one [[step]] for each"),
                    ))
                }
                RawStep {
                    copy: None,
                    run: None,
                } => {
                    return Err(invalid(
                        line,
                        format!("step {n} has neither `copy` nor `run`"),
                    ))
                }
            };
            steps.push(step);
        }
        let recipe = Recipe {
            from,
            output,
            env: raw.env,
            workdir: raw.workdir,
            cmd,
            cpus: raw.cpus,
            memory_mib: raw.memory,
            steps,
        };
        super::check_config(&recipe.env, recipe.workdir.as_deref())
            .map_err(|message| invalid(None, message))?;
        Ok(recipe)
    }

    /// The spec to bake this recipe into `out`.
    pub fn into_spec(self, out: PathBuf) -> BakeSpec {
        BakeSpec {
            from: self.from,
            steps: self.steps,
            env: self.env,
            workdir: self.workdir,
            cmd: self.cmd,
            out,
            cpus: self.cpus,
            memory_mib: self.memory_mib,
            ..BakeSpec::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Coded;

    fn parse(text: &str) -> Result<Recipe, BakeError> {
        Recipe::parse(text, Path::new("/recipes"), Path::new("/recipes/app.toml"))
    }

    fn error(text: &str) -> (Option<usize>, String) {
        match parse(text).unwrap_err() {
            e @ BakeError::RecipeInvalid { .. } => {
                assert_eq!(e.code(), "BAKE_RECIPE_INVALID");
                let shown = e.to_string();
                let BakeError::RecipeInvalid { line, message, .. } = e else {
                    unreachable!()
                };
                assert!(shown.contains("/recipes/app.toml"), "{shown}");
                (line, message)
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn full_recipe_parses_with_paths_relative_to_the_file() {
        let r = parse(
            r#"
from = "base"
output = "counter.tar.gz"
env = { NODE_ENV = "production" }
workdir = "/app"
cmd = ["node", "/app/server.js"]
memory = 1024

[[step]]
copy = { from = "server.js", to = "/app/server.js" }
[[step]]
run = "apt-get update && apt-get install -y nodejs"
[[step]]
copy = { from = "/abs/dir", to = "/srv" }
"#,
        )
        .unwrap();
        assert_eq!(r.from, None);
        assert_eq!(r.output, Some(PathBuf::from("/recipes/counter.tar.gz")));
        assert_eq!(r.env["NODE_ENV"], "production");
        assert_eq!(r.workdir.as_deref(), Some("/app"));
        assert_eq!(r.cmd, Some(vec!["node".into(), "/app/server.js".into()]));
        assert_eq!((r.cpus, r.memory_mib), (None, Some(1024)));
        assert_eq!(
            r.steps,
            vec![
                Step::Copy {
                    from: "/recipes/server.js".into(),
                    to: "/app/server.js".into()
                },
                Step::Run("apt-get update && apt-get install -y nodejs".into()),
                Step::Copy {
                    from: "/abs/dir".into(),
                    to: "/srv".into()
                },
            ]
        );
        let spec = r.into_spec("/out/x.tar".into());
        assert_eq!(spec.out, PathBuf::from("/out/x.tar"));
        assert_eq!(spec.memory_mib, Some(1024));
        assert_eq!(spec.steps.len(), 3);
    }

    #[test]
    fn from_a_path_and_a_shell_cmd() {
        let r = parse("from = \"images/base.tar.zst\"\ncmd = \"exec server --port 80\"\n").unwrap();
        assert_eq!(r.from, Some(PathBuf::from("/recipes/images/base.tar.zst")));
        assert_eq!(
            r.cmd,
            Some(vec![
                "/bin/sh".into(),
                "-c".into(),
                "exec server --port 80".into()
            ])
        );
        assert!(r.steps.is_empty() && r.output.is_none());
    }

    #[test]
    fn syntax_and_type_errors_carry_the_line() {
        let (line, msg) = error("output = \"x.tar\"\nworkdir = /app\n");
        assert_eq!(line, Some(2), "{msg}");
        let (line, msg) = error("output = \"x.tar\"\n\n[[step]]\nrun = 3\n");
        assert_eq!(line, Some(4), "{msg}");
        assert!(msg.contains("string"), "{msg}");
        let (line, msg) = error("outptu = \"x.tar\"\n");
        assert_eq!(line, Some(1));
        assert!(msg.contains("unknown field `outptu`"), "{msg}");
        let (_, msg) = error("cmd = []\n");
        assert!(msg.contains("empty"), "{msg}");
    }

    #[test]
    fn step_errors_name_the_step_and_its_line() {
        let (line, msg) = error(
            "[[step]]\nrun = \"true\"\n\n[[step]]\nrun = \"a\"\ncopy = { from = \"x\", to = \"/y\" }\n",
        );
        assert_eq!(line, Some(4), "{msg}");
        assert!(msg.contains("step 2 has both"), "{msg}");
        let (line, msg) = error("[[step]]\n\n[[step]]\n");
        assert_eq!(line, Some(1), "{msg}");
        assert!(msg.contains("neither"), "{msg}");
        let (_, msg) = error("[[step]]\nrun = \"  \"\n");
        assert!(msg.contains("step 1: `run` is empty"), "{msg}");
        let (line, msg) = error("[[step]]\ncopy = { from = \"x\" }\n");
        assert!(msg.contains("missing field `to`"), "{msg}");
        assert_eq!(line, Some(2), "{msg}");
    }

    #[test]
    fn config_is_checked() {
        let (_, msg) = error("workdir = \"app\"\n");
        assert!(msg.contains("absolute"), "{msg}");
        let (_, msg) = error("env = { \"A=B\" = \"1\" }\n");
        assert!(msg.contains("A=B"), "{msg}");
    }

    #[test]
    fn unreadable_recipe_has_its_own_code() {
        let e = Recipe::load(Path::new("/no/such/recipe.toml")).unwrap_err();
        assert_eq!(e.code(), "BAKE_RECIPE_UNREADABLE");
    }
}
