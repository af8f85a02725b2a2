//! The CRD YAML checked into `crds/` and `charts/tandem/crds/` must be exactly
//! what the Rust types generate. Regenerate with:
//! `cargo run -p tandem-crds --bin crdgen -- --write crds` and
//! `cargo run -p tandem-crds --bin crdgen -- --write charts/tandem/crds`.

use std::path::Path;

fn check_dir(dir: &str) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(dir);
    let mut drifted = Vec::new();
    for (file, crd) in tandem_crds::all_crds() {
        let want = tandem_crds::crd_yaml(&crd).expect("CRD serializes to YAML");
        let path = root.join(file);
        let have = std::fs::read_to_string(&path).unwrap_or_default();
        if have != want {
            drifted.push(path.display().to_string());
        }
    }
    assert!(
        drifted.is_empty(),
        "generated CRDs differ from the checked-in files {drifted:?}; run `cargo run -p tandem-crds --bin crdgen -- --write {dir}`"
    );
}

#[test]
fn repository_crds_match_the_types() {
    check_dir("crds");
}

#[test]
fn chart_crds_match_the_types() {
    check_dir("charts/tandem/crds");
}

#[test]
fn every_schema_property_has_a_description() {
    // `kubectl explain` is only as useful as these descriptions.
    fn walk(path: &str, schema: &serde_json::Value, missing: &mut Vec<String>) {
        if let Some(props) = schema.get("properties").and_then(|p| p.as_object()) {
            for (name, sub) in props {
                let here = format!("{path}.{name}");
                let is_meta = matches!(name.as_str(), "apiVersion" | "kind" | "metadata");
                if !is_meta && sub.get("description").is_none() {
                    missing.push(here.clone());
                }
                walk(&here, sub, missing);
            }
        }
        if let Some(items) = schema.get("items") {
            walk(&format!("{path}[]"), items, missing);
        }
    }
    let mut missing = Vec::new();
    for (file, crd) in tandem_crds::all_crds() {
        let json = serde_json::to_value(&crd).expect("CRD serializes to JSON");
        let schema = &json["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
        walk(file, schema, &mut missing);
    }
    assert!(
        missing.is_empty(),
        "fields without a doc comment: {missing:?}"
    );
}
