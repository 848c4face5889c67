//! The shipped files: every guest config under examples/ loads, checked
//! configurations round-trip through TOML, the committed JSON Schema matches
//! the model, and no input makes the loader panic.

use std::path::{Path, PathBuf};

use proptest::prelude::*;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Every `*.toml` under examples/ with a `[cluster]` section (a guest config).
fn guest_configs() -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            // examples/lab is the host lab's template (paths filled in by scripts/host-lab.sh),
            // checked by tandem-host's own tests.
            if path.is_dir() && path.file_name().is_some_and(|n| n == "lab") {
                continue;
            } else if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "toml")
                && std::fs::read_to_string(&path).unwrap().lines().any(|l| l.trim() == "[cluster]")
            {
                out.push(path);
            }
        }
    }
    let mut out = Vec::new();
    walk(&repo_root().join("examples"), &mut out);
    out.sort();
    out
}

#[test]
fn every_example_guest_config_is_valid_without_warnings() {
    let files = guest_configs();
    let names: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
    assert!(names.iter().any(|n| n.ends_with("guest-postgresql/tandem.toml")), "{names:?}");
    assert!(names.iter().any(|n| n.ends_with("guest-http/tandem.toml")), "{names:?}");
    for f in files {
        let checked = tandem_config::check(&f).unwrap_or_else(|e| panic!("{e}"));
        assert!(checked.warnings.is_empty(), "{}: {:?}", f.display(), checked.warnings);
    }
}

#[test]
fn postgresql_example_says_what_the_docs_say() {
    let c = tandem_config::load(repo_root().join("examples/guest-postgresql/tandem.toml")).unwrap();
    assert_eq!(c.nodes.len(), 2);
    let g = c.group("postgresql").unwrap();
    assert!(g.has_shared_disk());
    assert_eq!(g.resource("postgres").unwrap().depends_on, vec!["data".to_string(), "vip".to_string()]);
    assert_eq!(g.resource("vip").unwrap().depends_on, vec!["data".to_string()]);
    let m = &g.monitors[0];
    assert_eq!(m.options.get("level").map(String::as_str), Some("write"));
    assert!(tandem_monitors::build_probe(&tandem_monitors::ProbeSpec { password: None, ..m.probe_spec() }).is_ok());
}

#[test]
fn checked_configs_round_trip_through_toml() {
    for f in guest_configs() {
        let first = tandem_config::load(&f).unwrap();
        let text = tandem_config::to_toml(&first);
        let second = tandem_config::check_str(&text, "roundtrip.toml").unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert_eq!(first, second.config, "{text}");
        // Writing again gives the same text: the output is canonical.
        assert_eq!(text, tandem_config::to_toml(&second.config));
    }
}

#[test]
fn committed_json_schema_matches_the_model() {
    let committed = std::fs::read_to_string(repo_root().join("docs/config.schema.json")).unwrap();
    assert!(
        committed == tandem_config::json_schema(),
        "docs/config.schema.json is stale: run `cargo run -p tandem-config --example schema`"
    );
}

#[test]
fn json_schema_describes_every_section_and_kind() {
    let schema: serde_json::Value = serde_json::from_str(&tandem_config::json_schema()).unwrap();
    let props = schema["properties"].as_object().unwrap();
    for section in ["cluster", "node", "link", "lease", "group"] {
        assert!(props.contains_key(section), "{section}");
    }
    let text = schema.to_string();
    for kind in
        ["\"disk\"", "\"ip\"", "\"exec\"", "\"ocf\"", "\"systemd\"", "\"lease-watchdog-only\"", "\"host-cluster\""]
    {
        assert!(text.contains(kind), "{kind}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, .. ProptestConfig::default() })]

    #[test]
    fn arbitrary_text_never_panics(src in "\\PC{0,200}") {
        let _ = tandem_config::check_str(&src, "fuzz.toml");
    }

    /// Random edits of a valid file: every error is located inside the file
    /// and displays as one line.
    #[test]
    fn mutated_examples_give_located_errors(pos in 0usize..4000, len in 0usize..8, insert in "[ -~\\n]{0,12}") {
        let base = std::fs::read_to_string(repo_root().join("examples/guest-postgresql/tandem.toml")).unwrap();
        let mut start = pos.min(base.len());
        while !base.is_char_boundary(start) { start -= 1; }
        let mut end = (start + len).min(base.len());
        while !base.is_char_boundary(end) { end -= 1; }
        let src = format!("{}{}{}", &base[..start], insert, &base[end..]);
        if let Err(e) = tandem_config::check_str(&src, "mutated.toml") {
            let lines = src.lines().count() + 1;
            prop_assert!(!e.is_empty());
            for d in &e {
                let l = d.location.unwrap();
                prop_assert!(l.line >= 1 && l.line <= lines, "{d}");
                prop_assert!(!d.message.is_empty());
            }
            prop_assert_eq!(e.to_string().lines().count(), e.len());
        }
    }
}
