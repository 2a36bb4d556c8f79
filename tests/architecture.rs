//! The direction of imports, enforced: every module stands on a floor and references only
//! modules on its own floor or below; model code never reaches a role or the engine; the
//! engine never reaches a backend; no two files of one folder import each other in a circle.
//!
//! The floors (ARCHITECTURE.md draws them):
//!
//! | floor | modules |
//! |---|---|
//! | 1 ground | error, fsio, http, hub, device, stop, edit |
//! | 2 models | models |
//! | 3 roles | generate, judge (never each other) |
//! | 4 engine | engine |
//! | 5 drivers | batch, eval, study, plan, judge_eval, serve |
//! | 6 top | cli, backends, commands, lib, main |
//!
//! References are read from the source text: every `crate::a::b` path and every
//! `super::x` path outside comments and string literals.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The floor of a top-level module.
fn floor(module: &str) -> Option<u8> {
    Some(match module {
        "error" | "fsio" | "http" | "hub" | "device" | "host_memory" | "stop" | "edit" => 1,
        "models" => 2,
        "generate" | "judge" => 3,
        "engine" => 4,
        "batch" | "eval" | "study" | "plan" | "judge_eval" | "serve" => 5,
        "cli" | "backends" | "commands" | "lib" | "main" => 6,
        _ => return None,
    })
}

/// Paths a module must never reference, beyond the floor rule: `(module prefix, forbidden
/// prefix, why)`.
const NEVER: &[(&str, &str, &str)] = &[
    (
        "engine",
        "generate::flux",
        "the engine drives the Generator trait, not a backend",
    ),
    (
        "engine",
        "generate::testbed",
        "the engine drives the Generator trait, not a backend",
    ),
    (
        "engine",
        "judge::openai",
        "the engine drives the Judge trait, not a backend",
    ),
    (
        "engine",
        "judge::qwen_vl",
        "the engine drives the Judge trait, not a backend",
    ),
    (
        "engine",
        "judge::testbed",
        "the engine drives the Judge trait, not a backend",
    ),
    (
        "engine",
        "judge::cache",
        "the engine drives the Judge trait, not a backend",
    ),
    (
        "engine",
        "models",
        "the engine holds no model code or constant",
    ),
    ("generate", "judge", "the two roles stand apart"),
    ("judge", "generate", "the two roles stand apart"),
];

/// A source file as the checker sees it.
struct Source {
    /// Path relative to `src/`, e.g. `models/flux/text.rs`.
    rel: String,
    /// The text without comments and string literals.
    code: String,
}

/// The module path of a file: `models/flux/text.rs` -> `models::flux::text`,
/// `models/flux/mod.rs` -> `models::flux`.
fn module_path(rel: &str) -> String {
    let trimmed = rel.trim_end_matches(".rs");
    let trimmed = trimmed.strip_suffix("/mod").unwrap_or(trimmed);
    trimmed.replace('/', "::")
}

/// Removes comments, string and char literals, keeping line structure.
fn strip(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < bytes.len() {
        let rest = &text[i..];
        if rest.starts_with("//") {
            let end = rest.find('\n').unwrap_or(rest.len());
            i += end;
        } else if rest.starts_with("/*") {
            let end = rest.find("*/").map_or(rest.len(), |e| e + 2);
            out.extend(rest[..end].chars().filter(|&c| c == '\n'));
            i += end;
        } else if rest.starts_with("r#\"") || rest.starts_with("r\"") {
            let hashes = rest[1..].chars().take_while(|&c| c == '#').count();
            let close = format!("\"{}", "#".repeat(hashes));
            let body = 2 + hashes;
            let end = rest[body..]
                .find(&close)
                .map_or(rest.len(), |e| body + e + close.len());
            out.push_str("\"\"");
            i += end;
        } else if rest.starts_with('"') {
            let mut j = 1;
            while j < rest.len() {
                match rest.as_bytes()[j] {
                    b'\\' => j += 2,
                    b'"' => break,
                    _ => j += 1,
                }
            }
            out.push_str("\"\"");
            i += (j + 1).min(rest.len());
        } else if rest.starts_with("'\\''") || rest.starts_with("'\"'") {
            // A quote character literal; the general case below would misread it.
            out.push_str("' '");
            i += 3 + usize::from(rest.starts_with("'\\''"));
        } else {
            let c = rest.chars().next().expect("non-empty");
            out.push(c);
            i += c.len_utf8();
        }
    }
    out
}

/// Every path after `prefix::` in `code`, as segments (`crate::a::b::C` -> [a, b, C]);
/// groups (`prefix::a::{b::X, c}`) give one path per member.
fn paths_after(code: &str, prefix: &str) -> Vec<Vec<String>> {
    let mut found = Vec::new();
    let needle = format!("{prefix}::");
    let mut at = 0;
    while let Some(pos) = code[at..].find(&needle) {
        let start = at + pos;
        at = start + needle.len();
        let before = code[..start].chars().next_back();
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue; // e.g. `mycrate::`
        }
        expand(&code[at..], &[], &mut found);
    }
    found
}

/// Reads one path (with nested groups) from the start of `text`, appending each full path
/// to `out` behind `stem`.
fn expand(text: &str, stem: &[String], out: &mut Vec<Vec<String>>) {
    let (segs, rest) = segments(text);
    let mut full = stem.to_vec();
    full.extend(segs);
    match rest.strip_prefix("{") {
        Some(group) => {
            for member in split_group(group) {
                expand(member.trim_start(), &full, out);
            }
        }
        None if !full.is_empty() => out.push(full),
        None => {}
    }
}

/// The members of a `{...}` group (its opening brace already consumed), split at
/// top-level commas.
fn split_group(group: &str) -> Vec<&str> {
    let (mut depth, mut from, mut members) = (0usize, 0, Vec::new());
    for (i, c) in group.char_indices() {
        match c {
            '{' => depth += 1,
            '}' if depth == 0 => {
                members.push(&group[from..i]);
                return members;
            }
            '}' => depth -= 1,
            ',' if depth == 0 => {
                members.push(&group[from..i]);
                from = i + 1;
            }
            _ => {}
        }
    }
    members.push(&group[from..]);
    members
}

/// The leading `a::b::c` segments of `text`, and what follows them (after a trailing
/// `::`, so a group starts with `{`).
fn segments(text: &str) -> (Vec<String>, &str) {
    let mut segs = Vec::new();
    let mut rest = text;
    loop {
        let len = rest
            .find(|c: char| !(c.is_alphanumeric() || c == '_'))
            .unwrap_or(rest.len());
        if len > 0 {
            segs.push(rest[..len].to_string());
        }
        match rest[len..].strip_prefix("::") {
            Some(next) if len > 0 => rest = next,
            _ => return (segs, &rest[len..]),
        }
    }
}

/// The module paths (`crate`-relative) a file references.
fn references(source: &Source) -> BTreeSet<String> {
    let own = module_path(&source.rel);
    // `super` of a mod.rs is its folder's parent; of a plain file, its folder.
    let parent: Vec<&str> = {
        let mut parts: Vec<&str> = own.split("::").collect();
        parts.pop();
        parts
    };
    let mut refs = BTreeSet::new();
    for segs in paths_after(&source.code, "crate") {
        refs.insert(segs.join("::"));
    }
    for segs in paths_after(&source.code, "super") {
        if segs.first().is_some_and(|s| s == "super") {
            continue; // super::super: the tests of a submodule reaching its parent
        }
        let mut full: Vec<String> = parent.iter().map(|s| s.to_string()).collect();
        full.extend(segs);
        refs.insert(full.join("::"));
    }
    refs
}

/// Breaches of the floor rule and of [`NEVER`], one line each.
fn violations(sources: &[Source]) -> Vec<String> {
    let mut found = Vec::new();
    for source in sources {
        let own = module_path(&source.rel);
        let top = own.split("::").next().unwrap_or_default().to_string();
        let Some(own_floor) = floor(&top) else {
            found.push(format!("{}: module `{top}` is on no floor", source.rel));
            continue;
        };
        for r in references(source) {
            let target = r.split("::").next().unwrap_or_default();
            if let Some(target_floor) = floor(target) {
                if target_floor > own_floor {
                    found.push(format!(
                        "{} (floor {own_floor}) references crate::{r} (floor {target_floor})",
                        source.rel
                    ));
                }
            }
            for (module, forbidden, why) in NEVER {
                let in_module = own == *module || own.starts_with(&format!("{module}::"));
                let hits = r == *forbidden || r.starts_with(&format!("{forbidden}::"));
                if in_module && hits {
                    found.push(format!("{} references crate::{r}: {why}", source.rel));
                }
            }
        }
    }
    found
}

/// Circles among the files of one folder (mod.rs excluded: it declares and re-exports its
/// children).
fn circles(sources: &[Source]) -> Vec<String> {
    let files: BTreeMap<String, &Source> = sources
        .iter()
        .filter(|s| !s.rel.ends_with("mod.rs") && s.rel != "lib.rs" && s.rel != "main.rs")
        .map(|s| (module_path(&s.rel), s))
        .collect();
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (module, source) in &files {
        let folder = module.rsplit_once("::").map_or("", |(f, _)| f);
        for r in references(source) {
            // The sibling file a reference lands in: folder::name::...
            let Some(rest) = r
                .strip_prefix(&format!("{folder}::"))
                .filter(|_| !folder.is_empty())
            else {
                continue;
            };
            let sibling = format!("{folder}::{}", rest.split("::").next().unwrap_or_default());
            if &sibling != module && files.contains_key(&sibling) {
                edges.entry(module.clone()).or_default().insert(sibling);
            }
        }
    }
    let mut found = BTreeSet::new();
    for start in edges.keys() {
        // Depth-first search for a path back to `start`.
        let mut stack = vec![(start.clone(), vec![start.clone()])];
        let mut seen = BTreeSet::new();
        while let Some((node, path)) = stack.pop() {
            for next in edges.get(&node).into_iter().flatten() {
                if next == start {
                    let mut circle = path.clone();
                    let min = circle.iter().min().expect("non-empty").clone();
                    let at = circle.iter().position(|m| *m == min).expect("present");
                    circle.rotate_left(at);
                    found.insert(circle.join(" -> "));
                } else if seen.insert(next.clone()) {
                    let mut longer = path.clone();
                    longer.push(next.clone());
                    stack.push((next.clone(), longer));
                }
            }
        }
    }
    found.into_iter().collect()
}

fn read_tree(root: &Path) -> Vec<Source> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).expect("readable src tree") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    let mut paths = Vec::new();
    walk(root, &mut paths);
    paths.sort();
    paths
        .into_iter()
        .map(|p| Source {
            rel: p
                .strip_prefix(root)
                .expect("under src")
                .to_string_lossy()
                .replace('\\', "/"),
            code: strip(&std::fs::read_to_string(&p).expect("readable source")),
        })
        .collect()
}

fn src() -> Vec<Source> {
    read_tree(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"))
}

#[test]
fn every_import_runs_down_the_floors() {
    let found = violations(&src());
    assert!(
        found.is_empty(),
        "imports against the floors:\n{}",
        found.join("\n")
    );
}

#[test]
fn no_two_files_of_a_folder_import_each_other_in_a_circle() {
    let found = circles(&src());
    assert!(found.is_empty(), "import circles:\n{}", found.join("\n"));
}

fn fake(rel: &str, text: &str) -> Source {
    Source {
        rel: rel.into(),
        code: strip(text),
    }
}

/// The checker itself: it must catch what the invariants forbid, and only that.
#[test]
fn the_checker_catches_upward_imports_backends_in_the_engine_and_circles() {
    let sources = [
        fake(
            "models/flux/text.rs",
            "use crate::engine::Engine;\nuse crate::error::ModelError;",
        ),
        fake(
            "models/qwen_vl/files.rs",
            "fn f() { crate::judge::qwen_vl::Qwen2VlJudge::new() }",
        ),
        fake(
            "models/testbed/outcomes.rs",
            "use crate::generate::{Generator, schedule::Schedule};",
        ),
        fake(
            "engine/run.rs",
            "use crate::generate::flux::FluxGenerator;\nuse crate::generate::Generator;\nlet mu = crate::models::flux::scheduler::DynamicShift::FLUX;",
        ),
        fake(
            "judge/testbed.rs",
            "use crate::generate::testbed::TestbedGenerator;",
        ),
        fake(
            "edit/diptych.rs",
            "// use crate::engine::Engine; in a comment\nlet s = \"crate::engine\";",
        ),
        fake("eval/dataset.rs", "use super::parquet::load;"),
        fake("eval/parquet.rs", "use super::dataset::EvalItem;"),
        fake("eval/item.rs", "use super::dataset::Selection;"),
    ];
    let found = violations(&sources);
    let has = |needle: &str| found.iter().any(|f| f.contains(needle));
    assert!(
        has("models/flux/text.rs (floor 2) references crate::engine::Engine (floor 4)"),
        "{found:#?}"
    );
    assert!(
        has("models/qwen_vl/files.rs (floor 2) references crate::judge::qwen_vl"),
        "{found:#?}"
    );
    assert!(
        has("models/testbed/outcomes.rs (floor 2) references crate::generate::schedule::Schedule"),
        "{found:#?}"
    );
    assert!(
        has("engine/run.rs references crate::generate::flux::FluxGenerator: the engine drives"),
        "{found:#?}"
    );
    assert!(
        has(
            "judge/testbed.rs references crate::generate::testbed::TestbedGenerator: the two roles"
        ),
        "{found:#?}"
    );
    assert!(has("engine/run.rs references crate::models::flux::scheduler::DynamicShift::FLUX: the engine holds no model"), "{found:#?}");
    assert!(
        !found
            .iter()
            .any(|f| f.starts_with("engine/") && f.contains("crate::generate::Generator")),
        "the engine may use the trait: {found:#?}"
    );
    assert!(
        !has("edit/diptych.rs"),
        "comments and strings are not imports: {found:#?}"
    );
    assert!(!has("ModelError"), "{found:#?}");
    assert_eq!(
        circles(&sources),
        vec!["eval::dataset -> eval::parquet".to_string()]
    );
}
