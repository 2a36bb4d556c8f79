//! The direction of imports, enforced: every module stands on a floor and references only
//! modules on its own floor or below; the engine uses only what its allow list names (the
//! two roles' traits and shared types, never a backend); model code never reaches a role or
//! the engine; the two roles never reach each other; no two files of one folder import
//! each other in a circle.
//!
//! [`floor`] below is the one statement of the floors; ARCHITECTURE.md and src/lib.rs
//! describe them and point here.
//!
//! References are read from the source text: every `crate::a::b` path and every
//! `super::x` path (resolved through `super::super` and inline `mod` blocks) outside
//! comments and string literals.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The floor of a top-level module: a module references only modules on its floor or
/// below.
fn floor(module: &str) -> Option<u8> {
    Some(match module {
        // Ground: errors, file I/O, HTTP, getting weights, devices, the edit task.
        "error" | "fsio" | "http" | "hub" | "device" | "host_memory" | "stop" | "edit" => 1,
        // Pure model code.
        "models" => 2,
        // The memory plan: made from models' configs and file headers.
        "plan" => 3,
        // The two roles: what makes a model a generator or a judge.
        "generate" | "judge" => 4,
        // Strategies over the two roles' traits.
        "engine" => 5,
        // Drivers of the engine: many edits, suites, studies.
        "batch" | "eval" | "study" => 6,
        // Drivers standing on drivers: the server on batch, judge-eval on eval.
        "serve" | "judge_eval" => 7,
        // The command line: flags, which backends a command builds, what each command does.
        "cli" | "backends" | "commands" | "lib" | "main" => 8,
        _ => return None,
    })
}

/// What the engine may reference: the ground floor, the two roles' top-level items (their
/// traits and shared types, declared in their mod.rs) and these generic parts of them.
const ENGINE_MAY_USE: &[&str] = &[
    "generate::schedule",
    "generate::noise",
    "judge::vie",
    "judge::error",
];

/// Paths a module must never reference, beyond the floor rule and the engine's allow
/// list: `(module prefix, forbidden prefix, why)`.
const NEVER: &[(&str, &str, &str)] = &[
    ("generate", "judge", "the two roles stand apart"),
    ("judge", "generate", "the two roles stand apart"),
];

/// Whether the engine may reference `path` (`crate`-relative, split at `::`), given the
/// submodules each role has.
fn engine_may_use(path: &[&str], submodules: &BTreeMap<String, BTreeSet<String>>) -> bool {
    let top = path[0];
    if top == "engine" || floor(top) == Some(1) {
        return true;
    }
    if top != "generate" && top != "judge" {
        return false;
    }
    match path.get(1) {
        // A role's own items (its mod.rs), or a submodule on the allow list.
        Some(second) if submodules.get(top).is_some_and(|s| s.contains(*second)) => {
            ENGINE_MAY_USE.contains(&format!("{top}::{second}").as_str())
        }
        _ => true,
    }
}

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
    paths_after_at(code, prefix)
        .into_iter()
        .map(|(_, p)| p)
        .collect()
}

/// [`paths_after`] with the position of each path's `prefix`.
fn paths_after_at(code: &str, prefix: &str) -> Vec<(usize, Vec<String>)> {
    let mut found = Vec::new();
    let needle = format!("{prefix}::");
    let mut at = 0;
    while let Some(pos) = code[at..].find(&needle) {
        let start = at + pos;
        at = start + needle.len();
        let before = code[..start].chars().next_back();
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') {
            continue; // e.g. `mycrate::`, or the second `super` of `super::super::`
        }
        let mut paths = Vec::new();
        expand(&code[at..], &[], &mut paths);
        found.extend(paths.into_iter().map(|p| (start, p)));
    }
    found
}

/// The inline `mod name { ... }` blocks of `code`: `(start, end, name)`.
fn inline_modules(code: &str) -> Vec<(usize, usize, String)> {
    let mut blocks = Vec::new();
    let mut at = 0;
    while let Some(pos) = code[at..].find("mod ") {
        let start = at + pos;
        at = start + 4;
        if code[..start]
            .chars()
            .next_back()
            .is_some_and(|c| c.is_alphanumeric() || c == '_')
        {
            continue;
        }
        let rest = &code[at..];
        let name_len = rest
            .find(|c: char| !(c.is_alphanumeric() || c == '_'))
            .unwrap_or(rest.len());
        let after = rest[name_len..].trim_start();
        if name_len == 0 || !after.starts_with('{') {
            continue; // `mod name;`: a file of its own
        }
        let open = at + name_len + (rest[name_len..].len() - after.len());
        let mut depth = 0usize;
        let mut end = code.len();
        for (i, c) in code[open..].char_indices() {
            match c {
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        end = open + i;
                        break;
                    }
                }
                _ => {}
            }
        }
        blocks.push((start, end, rest[..name_len].to_string()));
    }
    blocks
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
    let blocks = inline_modules(&source.code);
    let mut refs = BTreeSet::new();
    for segs in paths_after(&source.code, "crate") {
        refs.insert(segs.join("::"));
    }
    for (pos, segs) in paths_after_at(&source.code, "super") {
        // The module at `pos`: the file's, inside the inline `mod` blocks around `pos`.
        let mut module: Vec<String> = own.split("::").map(str::to_string).collect();
        module.extend(
            blocks
                .iter()
                .filter(|(start, end, _)| *start < pos && pos < *end)
                .map(|(_, _, name)| name.clone()),
        );
        // Each `super` climbs one module.
        module.pop();
        let mut rest = segs.as_slice();
        while rest.first().is_some_and(|s| s == "super") {
            module.pop();
            rest = &rest[1..];
        }
        module.extend(rest.iter().cloned());
        if !module.is_empty() {
            refs.insert(module.join("::"));
        }
    }
    refs
}

/// Breaches of the floor rule, of the engine's allow list and of [`NEVER`], one line each.
fn violations(sources: &[Source]) -> Vec<String> {
    // Each role's submodules (files and folders), to tell them from its own items.
    let mut submodules: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for source in sources {
        let path = module_path(&source.rel);
        let parts: Vec<&str> = path.split("::").collect();
        if parts.len() >= 2 {
            submodules
                .entry(parts[0].to_string())
                .or_default()
                .insert(parts[1].to_string());
        }
    }
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
            let segs: Vec<&str> = r.split("::").collect();
            if top == "engine" && floor(target).is_some() && !engine_may_use(&segs, &submodules) {
                found.push(format!(
                    "{} references crate::{r}: the engine uses only the ground floor and the roles' traits and shared types",
                    source.rel
                ));
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
            "use crate::generate::flux::FluxGenerator;\nuse crate::generate::Generator;\nuse crate::judge::{Judge, vie::ViePair};\nlet mu = crate::models::flux::scheduler::DynamicShift::FLUX;",
        ),
        fake(
            "engine/select.rs",
            "use crate::judge::reward::RewardJudge;\nuse crate::judge::composite::CompositeJudge;\nuse crate::plan::check;",
        ),
        fake(
            "judge/testbed.rs",
            "use crate::generate::testbed::TestbedGenerator;",
        ),
        fake(
            "edit/diptych.rs",
            "// use crate::engine::Engine; in a comment\nlet s = \"crate::engine\";",
        ),
        fake("batch/runner.rs", "use crate::serve::Jobs;"),
        fake("serve/jobs.rs", "use crate::batch::store::table;"),
        fake(
            "models/flux/mod.rs",
            "pub mod text;\nuse super::super::engine::Engine;",
        ),
        fake(
            "models/qwen_vl/mod.rs",
            "use super::flux::FluxConfig;\n#[cfg(test)]\nmod tests {\n    use super::*;\n    use super::super::testbed::Scene;\n}",
        ),
        fake("generate/flux.rs", "mod x;"),
        fake("generate/schedule.rs", ""),
        fake("judge/vie.rs", ""),
        fake("judge/reward.rs", ""),
        fake("judge/composite.rs", ""),
        fake("eval/dataset.rs", "use super::parquet::load;"),
        fake("eval/parquet.rs", "use super::dataset::EvalItem;"),
        fake("eval/item.rs", "use super::dataset::Selection;"),
    ];
    let found = violations(&sources);
    let has = |needle: &str| found.iter().any(|f| f.contains(needle));
    assert!(
        has("models/flux/text.rs (floor 2) references crate::engine::Engine (floor 5)"),
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
        has("engine/run.rs references crate::generate::flux::FluxGenerator: the engine uses only"),
        "{found:#?}"
    );
    assert!(
        has("engine/select.rs references crate::judge::reward::RewardJudge"),
        "{found:#?}"
    );
    assert!(
        has("engine/select.rs references crate::judge::composite::CompositeJudge"),
        "{found:#?}"
    );
    assert!(
        has("engine/select.rs references crate::plan::check"),
        "{found:#?}"
    );
    assert!(
        has(
            "judge/testbed.rs references crate::generate::testbed::TestbedGenerator: the two roles"
        ),
        "{found:#?}"
    );
    assert!(
        has("engine/run.rs references crate::models::flux::scheduler::DynamicShift::FLUX"),
        "{found:#?}"
    );
    assert!(
        has("batch/runner.rs (floor 6) references crate::serve::Jobs (floor 7)"),
        "{found:#?}"
    );
    assert!(
        !has("serve/jobs.rs"),
        "the server stands on batch: {found:#?}"
    );
    assert!(
        has("models/flux/mod.rs (floor 2) references crate::engine::Engine (floor 5)"),
        "an upward import in a mod.rs, through super::super: {found:#?}"
    );
    // In a mod.rs, `super` is the folder's parent; in its inline tests, the folder itself.
    assert!(!has("models/qwen_vl/mod.rs"), "{found:#?}");
    let qwen = references(&sources[10]);
    assert!(qwen.contains("models::flux::FluxConfig"), "{qwen:?}");
    assert!(qwen.contains("models::testbed::Scene"), "{qwen:?}");
    for allowed in [
        "crate::generate::Generator",
        "crate::judge::Judge",
        "crate::judge::vie::ViePair",
    ] {
        assert!(
            !found
                .iter()
                .any(|f| f.starts_with("engine/") && f.contains(allowed)),
            "the engine may use {allowed}: {found:#?}"
        );
    }
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
