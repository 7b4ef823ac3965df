//! Checks of the repository itself, run with the normal test suite: documentation present
//! and complete, generated files fresh, CI wired to the README's test command.

use std::path::Path;

use sluice_tests::repo_root;

fn read(path: &str) -> String {
    let full = repo_root().join(path);
    std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("{} must exist: {e}", full.display()))
}

fn workspace_members() -> Vec<String> {
    let manifest: toml::Table = toml::from_str(&read("Cargo.toml")).unwrap();
    manifest["workspace"]["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m.as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn committed_config_schema_matches_the_config_types() {
    assert!(
        read("schema/sluice.schema.json") == sluice_core::config_schema_json(),
        "schema/sluice.schema.json is stale: run `cargo xtask codegen` and commit it"
    );
}

#[test]
fn architecture_has_a_code_map_entry_for_every_crate() {
    let architecture = read("ARCHITECTURE.md");
    for member in workspace_members() {
        assert!(
            architecture.contains(&format!("`{member}`")),
            "ARCHITECTURE.md's code map must describe `{member}`"
        );
    }
}

#[test]
fn every_crate_root_says_what_the_crate_is_for() {
    for member in workspace_members() {
        let dir = repo_root().join(&member);
        let root = ["src/lib.rs", "src/main.rs"]
            .iter()
            .map(|f| dir.join(f))
            .find(|p| p.exists())
            .unwrap_or_else(|| panic!("{member} has no lib.rs or main.rs"));
        let text = std::fs::read_to_string(&root).unwrap();
        let doc_lines = text.lines().take_while(|l| l.starts_with("//!")).count();
        assert!(
            doc_lines >= 3,
            "{} must open with a paragraph of crate docs",
            root.display()
        );
    }
}

#[test]
fn readme_gives_the_two_setup_commands_and_ci_runs_the_test_one() {
    let readme = read("README.md");
    assert!(
        readme.contains("cargo xtask ci"),
        "README must give the test command"
    );
    assert!(
        readme.contains("cargo xtask db up"),
        "README must give the command that runs sluice locally"
    );
    let ci = read(".ci/run");
    assert!(
        ci.contains("cargo xtask ci"),
        ".ci/run must run the README's test command"
    );
}

#[test]
fn sqlx_offline_data_is_committed() {
    let dir = repo_root().join(".sqlx");
    let queries = std::fs::read_dir(&dir).map(|d| d.count()).unwrap_or(0);
    assert!(
        queries > 0,
        "{} must hold the offline query data (cargo xtask codegen)",
        dir.display()
    );
    assert!(Path::new(&repo_root().join(".cargo/config.toml")).exists());
    assert!(
        read(".cargo/config.toml").contains("SQLX_OFFLINE = \"true\""),
        "builds must not need a database"
    );
}

#[test]
fn readme_links_point_at_files_that_exist() {
    let readme = read("README.md");
    for link in readme
        .split("](")
        .skip(1)
        .filter_map(|rest| rest.split(')').next())
    {
        if link.starts_with("http") || link.starts_with('#') {
            continue;
        }
        assert!(
            repo_root().join(link).exists(),
            "README links to {link}, which does not exist"
        );
    }
}

/// Every `.rs` file under `dir`, recursively.
fn rust_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = entry.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|e| e == "rs") {
                found.push(p);
            }
        }
    }
    found
}

#[test]
fn no_fix_tells_the_user_to_see_the_message() {
    // A configuration error carries a real fix; "see the message" is not one.
    let root = repo_root();
    let mut offenders = Vec::new();
    for member in workspace_members() {
        for file in rust_files(&root.join(&member).join("src")) {
            let text = std::fs::read_to_string(&file).unwrap();
            for (n, line) in text.lines().enumerate() {
                if line.contains("\"see the message") {
                    offenders.push(format!("{}:{}", file.display(), n + 1));
                }
            }
        }
    }
    assert!(offenders.is_empty(), "{offenders:#?}");
}

/// The crate graph flows one way, read from each manifest's `[dependencies]`: the binaries
/// and `xtask` may use anything; consumer / sources / provisioning / tunnel / target-pg use
/// only `pg`, `stream` and `core`; `pg` and `stream` only `core`; the consumer only `core`;
/// no source depends on a target.
#[test]
fn crate_dependencies_follow_the_layering() {
    let lower: &[(&str, &[&str])] = &[
        ("sluice-core", &[]),
        ("sluice-pg", &["sluice-core"]),
        ("sluice-stream", &["sluice-core"]),
        ("sluice-localpg", &["sluice-core"]),
        ("sluice-consumer", &["sluice-core"]),
        ("sluice-alerts", &["sluice-core"]),
        // The API runtime is a source's foundation: it knows no provider.
        ("sluice-source-api", &["sluice-core"]),
        (
            "sluice-tunnel",
            &["sluice-core", "sluice-pg", "sluice-stream"],
        ),
        (
            "sluice-target-pg",
            &["sluice-core", "sluice-pg", "sluice-stream"],
        ),
        (
            "sluice-provisioning",
            &["sluice-core", "sluice-pg", "sluice-stream"],
        ),
        (
            "sluice-proxy",
            &["sluice-core", "sluice-pg", "sluice-stream"],
        ),
    ];
    let mut broken = Vec::new();
    for member in workspace_members() {
        let manifest: toml::Table = toml::from_str(&read(&format!("{member}/Cargo.toml"))).unwrap();
        let name = manifest["package"]["name"].as_str().unwrap().to_owned();
        let allowed: Option<&[&str]> = lower
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, a)| *a)
            .or_else(|| {
                name.starts_with("sluice-source-").then_some(
                    &[
                        "sluice-core",
                        "sluice-pg",
                        "sluice-stream",
                        "sluice-source-api",
                    ][..],
                )
            });
        let Some(allowed) = allowed else {
            continue; // the binaries, xtask and the end-to-end tests assemble everything
        };
        let deps = manifest
            .get("dependencies")
            .and_then(|d| d.as_table())
            .map(|d| d.keys().cloned().collect::<Vec<_>>())
            .unwrap_or_default();
        for dep in deps.iter().filter(|d| d.starts_with("sluice-")) {
            if !allowed.contains(&dep.as_str()) {
                broken.push(format!("{name} depends on {dep}"));
            }
        }
    }
    assert!(broken.is_empty(), "against the layering: {broken:#?}");
}

/// A SQLSTATE becomes a meaning in `sluice-pg`'s classifier and nowhere else: no other crate
/// matches a code literal or asks sqlx whether an error is one kind of violation.
#[test]
fn sqlstates_are_matched_only_in_the_pg_crate() {
    let root = repo_root();
    let mut offenders = Vec::new();
    for member in workspace_members().iter().filter(|m| *m != "crates/pg") {
        for file in rust_files(&root.join(member).join("src")) {
            let text = std::fs::read_to_string(&file).unwrap();
            for (n, line) in text.lines().enumerate() {
                let literal = line.match_indices('"').any(|(i, _)| {
                    let code = line.get(i + 1..i + 6).unwrap_or_default();
                    line.get(i + 6..i + 7) == Some("\"")
                        && code.starts_with(|c: char| c.is_ascii_digit())
                        && code
                            .chars()
                            .all(|c| c.is_ascii_digit() || c.is_ascii_uppercase())
                });
                let helper = [
                    "is_unique_violation",
                    "is_foreign_key_violation",
                    "is_check_violation",
                ]
                .iter()
                .any(|h| line.contains(h));
                if literal || helper {
                    offenders.push(format!("{}:{}: {}", file.display(), n + 1, line.trim()));
                }
            }
        }
    }
    assert!(
        offenders.is_empty(),
        "use sluice_pg::Condition (or classify with an override) instead: {offenders:#?}"
    );
}

/// One idea per file: a module over 600 lines says why in a comment containing "long because".
#[test]
fn no_module_is_over_600_lines_without_saying_why() {
    let root = repo_root();
    let mut offenders = Vec::new();
    for member in workspace_members() {
        for file in rust_files(&root.join(&member).join("src")) {
            let text = std::fs::read_to_string(&file).unwrap();
            let lines = text.lines().count();
            if lines > 600 && !text.contains("long because") {
                offenders.push(format!("{} ({lines} lines)", file.display()));
            }
        }
    }
    assert!(
        offenders.is_empty(),
        "split these, or say in a comment why the file is long because …: {offenders:#?}"
    );
}
