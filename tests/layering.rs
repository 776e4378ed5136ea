//! The module layering of `proto-notes/architecture.md`, checked on the source: every
//! `crate::X` a top-level module names must be one of the layers below it.
//!
//! ```text
//! fsutil
//! protocol, wal            -> (wal), fsutil
//! archive                  -> wal, fsutil
//! datadir                  -> archive, protocol, wal, fsutil
//! receive, backup, restore, lifecycle
//!                          -> datadir, archive, protocol, wal, fsutil   (never each other)
//! service                  -> receive, backup, restore, lifecycle and below
//! cli                      -> anything (parses and resolves; main.rs dispatches)
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

/// What each top-level module may name besides itself.
fn allowed(module: &str) -> Option<&'static [&'static str]> {
    Some(match module {
        "fsutil" => &[],
        "wal" => &["fsutil"],
        "protocol" => &["wal", "fsutil"],
        "archive" => &["wal", "fsutil"],
        "datadir" => &["archive", "protocol", "wal", "fsutil"],
        "receive" | "backup" | "restore" | "lifecycle" => {
            &["datadir", "archive", "protocol", "wal", "fsutil"]
        }
        "service" => &[
            "receive",
            "backup",
            "restore",
            "lifecycle",
            "datadir",
            "archive",
            "protocol",
            "wal",
            "fsutil",
        ],
        "cli" => return None,
        _ => return None,
    })
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// `crate::NAME` references in `text` (code and doc links alike: a doc link to a higher layer
/// is a dependency of the reader's mind too).
fn crate_refs(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("crate::") {
        let after = &rest[i + "crate::".len()..];
        let name: String = after
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        let preceded_by_ident = rest[..i]
            .chars()
            .last()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
        if !name.is_empty() && !preceded_by_ident {
            out.insert(name);
        }
        rest = after;
    }
    out
}

#[test]
fn layers_point_down_only() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut violations: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut seen = BTreeSet::new();
    for f in &files {
        let rel = f.strip_prefix(&src).unwrap();
        let first = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy();
        let module = first.trim_end_matches(".rs").to_string();
        let Some(ok) = allowed(&module) else {
            continue;
        };
        seen.insert(module.clone());
        let text = fs::read_to_string(f).unwrap();
        for r in crate_refs(&text) {
            if r != module && !ok.contains(&r.as_str()) {
                violations
                    .entry(format!("{} ({module})", rel.display()))
                    .or_default()
                    .insert(r);
            }
        }
    }
    for m in [
        "fsutil",
        "wal",
        "protocol",
        "archive",
        "datadir",
        "receive",
        "backup",
        "restore",
        "lifecycle",
        "service",
    ] {
        assert!(seen.contains(m), "module {m} not found under src/");
    }
    assert!(
        violations.is_empty(),
        "imports that point up or sideways (see proto-notes/architecture.md): {violations:#?}"
    );
}

#[test]
fn the_reference_finder_sees_paths_not_lookalikes() {
    let refs = crate_refs("use crate::wal::Lsn; x = my_crate::foo; [`crate::archive::Store`]");
    assert_eq!(
        refs.into_iter().collect::<Vec<_>>(),
        vec!["archive".to_string(), "wal".to_string()]
    );
}
