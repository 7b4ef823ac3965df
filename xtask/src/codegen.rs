//! `cargo xtask codegen [--check]`: generated files committed to the repository.
//!
//! - `schema/sluice.schema.json`: the JSON Schema of `sluice.toml`, from `sluice-core`.
//! - `.sqlx/`: sqlx's offline query data, so the workspace builds with no database. It is
//!   produced by compiling every crate that uses the query macros against a throwaway
//!   cluster, with `SQLX_OFFLINE_DIR` pointing at a fresh directory.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use sluice_localpg::Cluster;

use crate::{Result, cargo, root, run_step};

pub fn run(check: bool) -> Result {
    let root = root();
    let mut stale = Vec::new();

    let schema_path = root.join("schema/sluice.schema.json");
    let schema = sluice_core::config_schema_json();
    let current = std::fs::read_to_string(&schema_path).unwrap_or_default();
    if current != schema {
        if check {
            stale.push(format!(
                "{} differs from the Config type",
                rel(&root, &schema_path)
            ));
        } else {
            std::fs::write(&schema_path, schema)
                .map_err(|e| format!("writing {}: {e}", schema_path.display()))?;
            eprintln!("wrote {}", rel(&root, &schema_path));
        }
    }

    let generated = generate_sqlx_data(&root)?;
    let committed = read_dir_files(&root.join(".sqlx"))?;
    let differences = diff(&committed, &generated);
    if !differences.is_empty() {
        if check {
            stale.extend(differences.iter().map(|d| format!(".sqlx/{d}")));
        } else {
            let dir = root.join(".sqlx");
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).map_err(|e| format!("creating .sqlx: {e}"))?;
            for (name, contents) in &generated {
                std::fs::write(dir.join(name), contents)
                    .map_err(|e| format!("writing .sqlx/{name}: {e}"))?;
            }
            eprintln!(
                "wrote .sqlx ({} queries; {} changed)",
                generated.len(),
                differences.len()
            );
        }
    }

    if stale.is_empty() {
        let verb = if check { "are up to date" } else { "written" };
        eprintln!(
            "generated files {verb} ({} sqlx queries, config schema)",
            generated.len()
        );
        Ok(())
    } else {
        Err(format!(
            "generated files are stale; run `cargo xtask codegen` and commit the result:\n  {}",
            stale.join("\n  ")
        ))
    }
}

/// Compiles the query-macro crates against a throwaway cluster and returns what sqlx wrote.
fn generate_sqlx_data(root: &Path) -> Result<BTreeMap<String, Vec<u8>>> {
    let sources = files_with_query_macros(root)?;
    if sources.is_empty() {
        return Ok(BTreeMap::new());
    }
    let pg = Cluster::start_default().map_err(|e| format!("starting a throwaway cluster: {e}"))?;
    let out = root.join("target/xtask-sqlx");
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out).map_err(|e| format!("creating {}: {e}", out.display()))?;
    // The macros run only when their crate recompiles: touch the files that use them.
    for file in &sources {
        std::fs::File::options()
            .append(true)
            .open(file)
            .and_then(|f| f.set_modified(SystemTime::now()))
            .map_err(|e| format!("touching {}: {e}", file.display()))?;
    }
    run_step(
        "cargo check (query macros against a live database)",
        cargo()
            .args(["check", "--workspace", "--all-targets", "--quiet"])
            .env("SQLX_OFFLINE", "false")
            .env("DATABASE_URL", pg.url("postgres"))
            .env("SQLX_OFFLINE_DIR", &out),
    )?;
    read_dir_files(&out)
}

/// Rust files under the workspace's crates that call a checked query macro.
fn files_with_query_macros(root: &Path) -> Result<Vec<PathBuf>> {
    let mut found = Vec::new();
    let mut stack: Vec<PathBuf> = ["crates", "bins", "tests", "xtask"]
        .iter()
        .map(|d| root.join(d))
        .collect();
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let text = std::fs::read_to_string(&path).unwrap_or_default();
                if ["query!(", "query_as!(", "query_scalar!("]
                    .iter()
                    .any(|m| text.contains(m))
                    && path != Path::new(file!())
                {
                    found.push(path);
                }
            }
        }
    }
    found.sort();
    Ok(found)
}

fn read_dir_files(dir: &Path) -> Result<BTreeMap<String, Vec<u8>>> {
    let mut files = BTreeMap::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(files);
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let contents = std::fs::read(entry.path()).map_err(|e| format!("reading {name}: {e}"))?;
        files.insert(name, contents);
    }
    Ok(files)
}

fn diff(
    committed: &BTreeMap<String, Vec<u8>>,
    generated: &BTreeMap<String, Vec<u8>>,
) -> Vec<String> {
    let mut out = Vec::new();
    for (name, contents) in generated {
        match committed.get(name) {
            None => out.push(format!("{name} (missing)")),
            Some(c) if c != contents => out.push(format!("{name} (changed)")),
            Some(_) => {}
        }
    }
    out.extend(
        committed
            .keys()
            .filter(|n| !generated.contains_key(*n))
            .map(|n| format!("{n} (no longer used)")),
    );
    out
}

fn rel(root: &Path, path: &Path) -> String {
    path.strip_prefix(root)
        .unwrap_or(path)
        .display()
        .to_string()
}
