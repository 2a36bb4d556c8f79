//! Properties of everything that reads user input: whatever numbers or strings the CLI's
//! options, a manifest line or a suite file carry, nothing panics or aborts, and every
//! refusal is bad input (exit code 2) with a message. What is accepted is runnable: its
//! strategy passes the engine's own check.

use std::io::Cursor;
use std::path::PathBuf;

use icedit_scale::batch::manifest::{Entry, ManifestReader};
use icedit_scale::cli::{Cli, Command};
use icedit_scale::commands::{edit::check_edit, exit_code, EXIT_BAD_INPUT};
use icedit_scale::engine::StrategyConfig;
use icedit_scale::eval::suite::Suite;
use proptest::prelude::*;

/// Numbers as users (and fuzzers) type them: small, huge, negative, fractional, special.
fn number() -> impl Strategy<Value = String> {
    prop_oneof![
        (0u64..3000).prop_map(|n| n.to_string()),
        any::<u64>().prop_map(|n| n.to_string()),
        any::<i64>().prop_map(|n| n.to_string()),
        any::<f64>().prop_map(|x| x.to_string()),
        prop::sample::select(vec![
            "NaN", "inf", "-inf", "-0", "1e400", "0x10", "", " 8", "1_000", "٣",
        ])
        .prop_map(str::to_string),
        "[a-z0-9.,-]{0,6}",
    ]
}

const FLAGS: &[&str] = &[
    "--seeds",
    "--probe-steps",
    "--keep",
    "--steps",
    "--seed",
    "--seed-list",
    "--width",
    "--batch-size",
    "--judge-concurrency",
    "--t5-tokens",
    "--guidance",
    "--lora-scale",
    "--testbed-difficulty",
    "--judge-seed",
];

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn edit_options_never_panic_and_every_refusal_is_bad_input(
        picks in prop::collection::vec((prop::sample::select(FLAGS), number()), 1..4),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let mut args: Vec<String> = [
            "icedit-scale", "edit", "--image", "tests/fixtures/flux/source.png",
            "--instruction", "make the sky night", "--out",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.push(out.display().to_string());
        let mut seen = std::collections::HashSet::new();
        for (flag, value) in &picks {
            if seen.insert(*flag) {
                args.push(format!("{flag}={value}"));
            }
        }
        match <Cli as clap::Parser>::try_parse_from(&args) {
            Err(e) => prop_assert_eq!(e.exit_code(), EXIT_BAD_INPUT, "{}", e),
            Ok(cli) => {
                let Some(Command::Edit(edit)) = cli.command else {
                    unreachable!("an edit command line");
                };
                match check_edit(&edit) {
                    Ok(checked) => prop_assert!(checked.strategy.validate().is_ok()),
                    Err(e) => {
                        prop_assert_eq!(exit_code(&e), EXIT_BAD_INPUT, "{:#}", e);
                        prop_assert!(!e.to_string().is_empty());
                    }
                }
            }
        }
    }

    #[test]
    fn manifest_lines_never_panic_and_accepted_items_are_runnable(
        lines in prop::collection::vec(manifest_line(), 1..6),
    ) {
        let text = lines.join("\n");
        let reader = ManifestReader::new(Cursor::new(text), PathBuf::from("/data"), StrategyConfig::default());
        for entry in reader {
            match entry.unwrap() {
                Entry::Item(item) => prop_assert!(item.strategy.validate().is_ok()),
                Entry::Bad(bad) => prop_assert!(!bad.reason.is_empty()),
            }
        }
    }

    #[test]
    fn suites_never_panic_and_every_refusal_is_bad_input(
        width in number(),
        resamples in number(),
        arms in prop::collection::vec(arm(), 1..4),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("suite.toml");
        let toml = format!(
            "name = \"p\"\nwidth = {width}\nresamples = {resamples}\n[dataset]\nkind = \"testbed\"\nedits = 2\n[selection_judge]\njudge = \"testbed\"\n{}",
            arms.join("\n")
        );
        std::fs::write(&path, toml).unwrap();
        match Suite::load(&path) {
            Ok(suite) => {
                for arm in &suite.arms {
                    prop_assert!(suite.config(arm).validate().is_ok());
                }
            }
            Err(e) => {
                let e = anyhow::Error::from(e);
                prop_assert_eq!(exit_code(&e), EXIT_BAD_INPUT);
            }
        }
    }
}

/// A manifest line with random strategy values, paths and shapes.
fn manifest_line() -> impl Strategy<Value = String> {
    let value = prop_oneof![
        number(),
        number().prop_map(|n| format!("\"{n}\"")),
        prop::collection::vec(number(), 0..4).prop_map(|v| format!("[{}]", v.join(", "))),
        Just("null".to_string()),
    ];
    let key = prop::sample::select(vec![
        "seeds",
        "probe_steps",
        "keep",
        "steps",
        "seed",
        "strategy",
        "bogus",
    ]);
    let image = prop::sample::select(vec![
        "a.png",
        "../a.png",
        "/etc/passwd",
        "x/../a.png",
        "x/../../a.png",
        "",
        ".",
    ]);
    (
        "[a-z0-9._/-]{0,6}",
        image,
        prop::collection::vec((key, value), 0..4),
    )
        .prop_map(|(id, image, fields)| {
            let mut line =
                format!("{{\"id\": \"{id}\", \"image\": \"{image}\", \"instruction\": \"x\"");
            for (k, v) in fields {
                line.push_str(&format!(", \"{k}\": {v}"));
            }
            line.push('}');
            line
        })
}

/// A suite arm with random values.
fn arm() -> impl Strategy<Value = String> {
    let strategy = prop::sample::select(vec![
        "random",
        "best-of-n",
        "early-filter",
        "tournament",
        "successive-halving",
        "bogus",
    ]);
    (
        "[a-z]{1,4}",
        strategy,
        prop::collection::vec(
            (
                prop::sample::select(vec!["seeds", "probe_steps", "keep", "steps", "seed"]),
                number(),
            ),
            0..4,
        ),
    )
        .prop_map(|(name, strategy, fields)| {
            let mut arm = format!("[[arms]]\nname = \"{name}\"\nstrategy = \"{strategy}\"\n");
            let mut seen = std::collections::HashSet::new();
            for (k, v) in fields {
                if seen.insert(k) {
                    arm.push_str(&format!("{k} = {v}\n"));
                }
            }
            arm
        })
}
