//! The guides in `docs/guides/`: each page's Rust runs as a doc test of the `examples`
//! crate (checked here: the page is included there), and each page's sidecar config is
//! a verbatim part of an example config in `examples/sidecar/` (which `example_configs`
//! serves against the demo upstream) and passes `keyward check`.
#![allow(clippy::unwrap_used)]

mod support;

use std::path::{Path, PathBuf};

use support::check;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The `docs/guides/*.md` file names, sorted.
fn guides() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(root().join("docs/guides"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".md"))
        .collect();
    names.sort();
    names
}

/// The fenced code blocks of `page` tagged `lang`.
fn blocks(page: &str, lang: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current: Option<String> = None;
    for line in page.lines() {
        match (&mut current, line.trim_start().strip_prefix("```")) {
            (None, Some(tag)) if tag.trim() == lang => current = Some(String::new()),
            (None, Some(_)) => current = Some(String::from("\u{0}")), // another language
            (Some(block), Some("")) => {
                if !block.starts_with('\u{0}') {
                    out.push(std::mem::take(block));
                }
                current = None;
            }
            (Some(block), _) => {
                block.push_str(line);
                block.push('\n');
            }
            (None, None) => {}
        }
    }
    out
}

#[test]
fn the_six_problems_each_have_a_page_linked_from_the_readme() {
    let names = guides();
    assert_eq!(
        names,
        [
            "cache-stampedes.md",
            "fencing-tokens.md",
            "per-tenant-quotas.md",
            "retried-payments.md",
            "webhooks.md",
            "where-keyward-stops.md",
        ]
    );
    let readme = read(&root().join("README.md"));
    for name in &names {
        assert!(
            readme.contains(&format!("(docs/guides/{name})")),
            "README.md does not link docs/guides/{name}"
        );
    }
}

#[test]
fn every_page_has_rust_that_runs_as_a_doc_test() {
    let lib = read(&root().join("examples/src/lib.rs"));
    for name in guides() {
        let page = read(&root().join("docs/guides").join(&name));
        let rust = blocks(&page, "rust");
        assert!(!rust.is_empty(), "{name}: no ```rust example");
        assert!(
            rust.iter().all(|b| b.contains("assert")),
            "{name}: an example that checks nothing"
        );
        assert!(
            lib.contains(&format!("include_str!(\"../../docs/guides/{name}\")")),
            "{name} is not included in examples/src/lib.rs, so its code is never run"
        );
        assert!(
            page.matches("```").count() % 2 == 0,
            "{name}: unbalanced code fences"
        );
    }
}

#[test]
fn every_sidecar_config_in_a_page_is_part_of_an_example_and_checks() {
    let examples: Vec<(String, String)> = std::fs::read_dir(root().join("examples/sidecar"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .map(|p| {
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                read(&p),
            )
        })
        .collect();
    let server = "[server]\nlisten = \"127.0.0.1:8080\"\nupstream = \"http://127.0.0.1:9000\"\n\n";
    for name in guides() {
        let page = read(&root().join("docs/guides").join(&name));
        let tomls = blocks(&page, "toml");
        assert!(!tomls.is_empty(), "{name}: no sidecar config");
        for block in tomls {
            let owner = examples.iter().find(|(_, text)| text.contains(&block));
            let Some((file, _)) = owner else {
                panic!("{name}: this config is not part of any examples/sidecar/*.toml:\n{block}")
            };
            assert!(
                page.contains(&format!("examples/sidecar/{file}")),
                "{name}: quotes examples/sidecar/{file} without naming it"
            );
            if block.contains("[[routes]]") {
                let (code, out) = check(&format!("{server}{block}"));
                assert_eq!(code, 0, "{name}: keyward check on\n{block}\n{out}");
            }
        }
    }
}
