//! The module layering, checked on the source: a module may use only modules below it, so the arrows in
//! docs/architecture.md stay true as the code changes.

use std::path::Path;

/// Top to bottom. `oidc` and `provision` are siblings that must not use each other; their order here
/// only makes that a violation in both directions' absence.
const LAYERS: &[&str] = &[
    "cli",
    "startup",
    "config",
    "http",
    "directory",
    "reconcile",
    "access",
    "provision",
    "oidc",
    "identity",
    "telemetry",
];

fn sources(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Every `crate::x` a source mentions, including the members of `crate::{x, y::z}`.
fn mentioned(text: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find("crate::") {
        rest = &rest[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let end = group.find('}').unwrap_or(group.len());
            for item in group[..end].split(',') {
                let name: String = item
                    .trim()
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                found.push(name);
            }
        } else {
            found.push(
                rest.chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect(),
            );
        }
    }
    found
}

#[test]
fn no_module_uses_a_module_above_it() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut violations = Vec::new();
    for (rank, layer) in LAYERS.iter().enumerate() {
        let mut files = Vec::new();
        let single = src.join(format!("{layer}.rs"));
        if single.exists() {
            files.push(single);
        }
        if src.join(layer).is_dir() {
            sources(&src.join(layer), &mut files);
        }
        assert!(!files.is_empty(), "no source for module {layer}");
        for file in files {
            let text = std::fs::read_to_string(&file).unwrap();
            for used in mentioned(&text) {
                if let Some(used_rank) = LAYERS.iter().position(|l| *l == used)
                    && used_rank <= rank
                    && used != *layer
                {
                    violations.push(format!("{} uses crate::{used}", file.display()));
                }
            }
        }
    }
    assert!(
        violations.is_empty(),
        "upward arrows:\n{}",
        violations.join("\n")
    );
}

#[test]
fn the_checker_sees_grouped_imports() {
    assert_eq!(
        mentioned("use crate::{http::x, oidc};\nlet a = crate::access::f();"),
        ["http", "oidc", "access"]
    );
}
