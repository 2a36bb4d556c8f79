//! Every key of each loaded family's reference config class is read by our serde structs,
//! listed as not changing the math (with the reason), or refused by name for a value we do
//! not implement. The key lists are dumped from diffusers' and transformers' classes by
//! tests/fixtures/config_keys/make_config_keys.py; a key the reference adds fails here until
//! it is classified.
//!
//! "Read" is measured, not declared: a key is read when putting a value of the wrong type
//! under it makes the loader's own config parsing fail (a string, then an object, so that
//! every typed field fails on one of them). The parsing runs on a valid config: the family's
//! tiny fixture, with the reference's default for every key the fixture does not write.

use std::path::{Path, PathBuf};

use icedit_scale::models::config_keys::{
    ConfigKeys, DIFFUSERS_COMMON_INERT, TRANSFORMERS_COMMON_INERT,
};
use icedit_scale::models::flux::text::{
    check_t5_config, clip_text_config, CLIP_CONFIG_KEYS, T5_CONFIG_KEYS,
};
use icedit_scale::models::flux::vae::VaeConfig;
use icedit_scale::models::flux::FluxConfig;
use icedit_scale::models::qwen_vl::{Family as QwenFamily, Qwen2VlConfig};
use icedit_scale::models::taef1::TinyConfig;
use serde_json::{json, Value};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn read(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// The loader's parsing of one family's config.
type Parse = fn(&Value) -> Result<(), String>;

struct Family {
    /// `tests/fixtures/config_keys/<name>.json`.
    name: &'static str,
    keys: &'static [ConfigKeys],
    /// Inert keys every config of the library (or family) shares, by section.
    common: fn(&str) -> Vec<(&'static str, &'static str)>,
    /// The fixture config the probes start from.
    fixture: &'static str,
    parse: Parse,
}

fn diffusers_common(_: &str) -> Vec<(&'static str, &'static str)> {
    DIFFUSERS_COMMON_INERT.to_vec()
}

fn transformers_common(_: &str) -> Vec<(&'static str, &'static str)> {
    TRANSFORMERS_COMMON_INERT.to_vec()
}

fn families() -> Vec<Family> {
    fn de<T: serde::de::DeserializeOwned>(v: &Value) -> Result<T, String> {
        serde_json::from_value(v.clone()).map_err(|e| e.to_string())
    }
    vec![
        Family {
            name: "flux_transformer",
            keys: icedit_scale::models::flux::config::CONFIG_KEYS,
            common: diffusers_common,
            fixture: "flux/tiny/transformer/config.json",
            parse: |v| de::<FluxConfig>(v)?.validate(),
        },
        Family {
            name: "vae",
            keys: icedit_scale::models::flux::vae::CONFIG_KEYS,
            common: diffusers_common,
            fixture: "flux/tiny/vae/config.json",
            parse: |v| de::<VaeConfig>(v)?.check(),
        },
        Family {
            name: "taef1",
            keys: icedit_scale::models::taef1::config::CONFIG_KEYS,
            common: diffusers_common,
            fixture: "taef1/tiny/config.json",
            parse: |v| de::<TinyConfig>(v)?.check(),
        },
        Family {
            name: "t5",
            keys: T5_CONFIG_KEYS,
            common: transformers_common,
            fixture: "flux/tiny/text_encoder_2/config.json",
            parse: |v| check_t5_config(v).map(|_| ()),
        },
        Family {
            name: "clip_text",
            keys: CLIP_CONFIG_KEYS,
            common: transformers_common,
            fixture: "flux/tiny/text_encoder/config.json",
            parse: |v| clip_text_config(v).map(|_| ()),
        },
        Family {
            name: "qwen2_vl",
            keys: QwenFamily::Qwen2Vl.config_keys(),
            common: QwenFamily::shared_inert,
            fixture: "qwen2vl/tiny/qwen2_vl/config.json",
            parse: |v| Qwen2VlConfig::from_json(v).map(|_| ()),
        },
        Family {
            name: "qwen2_5_vl",
            keys: QwenFamily::Qwen25Vl.config_keys(),
            common: QwenFamily::shared_inert,
            fixture: "qwen2vl/tiny/qwen2_5_vl/config.json",
            parse: |v| Qwen2VlConfig::from_json(v).map(|_| ()),
        },
        Family {
            name: "qwen3_vl",
            keys: QwenFamily::Qwen3Vl.config_keys(),
            common: QwenFamily::shared_inert,
            fixture: "qwen3vl/tiny/config.json",
            parse: |v| Qwen2VlConfig::from_json(v).map(|_| ()),
        },
    ]
}

/// The section `section` of `config` (`""`: the top level).
fn section<'a>(config: &'a mut Value, section: &str) -> &'a mut Value {
    if section.is_empty() {
        config
    } else {
        &mut config[section]
    }
}

/// The fixture with the reference's default under every key it does not write.
fn baseline(fixture: &Value, reference: &Value) -> Value {
    let mut config = fixture.clone();
    for (name, defaults) in reference["sections"].as_object().unwrap() {
        let target = section(&mut config, name);
        if !target.is_object() {
            *target = json!({});
        }
        for (key, default) in defaults.as_object().unwrap() {
            if default == "(section)" {
                continue;
            }
            let map = target.as_object_mut().unwrap();
            map.entry(key.clone()).or_insert_with(|| default.clone());
        }
    }
    config
}

/// Whether the loader's parsing reads `key` of `name`: a wrong-typed value there fails it.
fn is_read(parse: Parse, base: &Value, name: &str, key: &str) -> bool {
    [json!("\u{0}poison"), json!({"\u{0}poison": [1, "x"]})]
        .into_iter()
        .any(|poison| {
            let mut config = base.clone();
            section(&mut config, name)[key] = poison;
            parse(&config).is_err()
        })
}

/// How each reference key of `family` is treated: `(section.key, class)` where class is
/// `read`, `inert`, `refused`; problems (a key in no class, a refusal that does not name
/// its key, an inert key that is read) as errors.
fn classify(family: &Family, reference: &Value) -> (Vec<(String, &'static str)>, Vec<String>) {
    let fixture = read(&root().join(family.fixture));
    let base = baseline(&fixture, reference);
    let mut classes = Vec::new();
    let mut problems = Vec::new();
    if let Err(e) = (family.parse)(&base) {
        problems.push(format!(
            "{}: the baseline config does not parse: {e}",
            family.name
        ));
        return (classes, problems);
    }
    for (name, keys) in reference["sections"].as_object().unwrap() {
        let Some(rules) = family.keys.iter().find(|k| k.section == name) else {
            problems.push(format!("{}: section {name:?} has no key list", family.name));
            continue;
        };
        let common = (family.common)(name);
        let at = |key: &str| {
            if name.is_empty() {
                format!("{}.{key}", family.name)
            } else {
                format!("{}.{name}.{key}", family.name)
            }
        };
        for key in keys.as_object().unwrap().keys() {
            let class = if let Some((_, bad)) = rules.refused.iter().find(|(k, _)| k == key) {
                let mut config = base.clone();
                section(&mut config, name)[key.as_str()] = serde_json::from_str(bad).unwrap();
                match (family.parse)(&config) {
                    Err(e) if e.contains(key.as_str()) => "refused",
                    Err(e) => {
                        problems.push(format!(
                            "{}: refused as {bad} without naming it: {e}",
                            at(key)
                        ));
                        continue;
                    }
                    Ok(()) => {
                        problems.push(format!(
                            "{}: listed as refused, but {bad} is accepted",
                            at(key)
                        ));
                        continue;
                    }
                }
            } else if is_read(family.parse, &base, name, key) {
                // A key the family lists as inert must not be read (the list would lie); one
                // of the library's common keys may be (candle's T5 config reads `use_cache`).
                if rules.inert.iter().any(|(k, _)| k == key) {
                    problems.push(format!("{}: listed as inert but read", at(key)));
                    continue;
                }
                "read"
            } else if let Some(why) = rules.inert_reason(key, &common) {
                if why.is_empty() {
                    problems.push(format!("{}: listed as inert without a reason", at(key)));
                    continue;
                }
                "inert"
            } else {
                problems.push(format!(
                    "{}: not read, not listed as leaving the math unchanged, not refused",
                    at(key)
                ));
                continue;
            };
            classes.push((at(key), class));
        }
        // The family's own lists name only keys the reference has.
        for (key, _) in rules.inert.iter().chain(rules.refused.iter()) {
            if !keys.as_object().unwrap().contains_key(*key) && !key.starts_with('_') {
                problems.push(format!(
                    "{}: listed, but the reference has no such key",
                    at(key)
                ));
            }
        }
    }
    (classes, problems)
}

#[test]
fn every_reference_config_key_is_read_inert_or_refused() {
    let mut problems = Vec::new();
    for family in families() {
        let reference = read(&root().join(format!("config_keys/{}.json", family.name)));
        let (classes, found) = classify(&family, &reference);
        let count = |c: &str| classes.iter().filter(|(_, k)| *k == c).count();
        println!(
            "{} ({}): {} read, {} inert, {} refused",
            family.name,
            reference["reference"].as_str().unwrap(),
            count("read"),
            count("inert"),
            count("refused")
        );
        problems.extend(found);
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// The test can fail: a key the reference adds that nothing here reads or lists is found.
#[test]
fn a_key_the_reference_adds_is_caught() {
    for family in families() {
        let mut reference = read(&root().join(format!("config_keys/{}.json", family.name)));
        let first = reference["sections"]
            .as_object()
            .unwrap()
            .keys()
            .next()
            .unwrap()
            .clone();
        reference["sections"][&first]["new_math_knob"] = json!(3);
        let (_, problems) = classify(&family, &reference);
        assert!(
            problems
                .iter()
                .any(|p| p.contains("new_math_knob") && p.contains("not read")),
            "{}: {problems:?}",
            family.name
        );
    }
}
