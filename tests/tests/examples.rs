//! The manifests in `examples/`: one per bundled model (the SmolLM2 conversions included) plus the tiny demo
//! model. Each must be accepted by the real API server (server-side dry
//! run), ask for a world size its model can be split into, and state a
//! per-rank memory figure that matches the planner's estimate (weights, the
//! batch's KV cache and the prefix cache, as the operator counts them).

use std::collections::BTreeSet;
use std::path::PathBuf;

use tandem_crds::LlamaDeployment;
use tandem_planner::{ServingBudget, check_world_size, lookup_model, memory_per_rank};
use tandem_tests::{Identity, TestNamespace, cluster, repo_root};

fn examples() -> Vec<(PathBuf, String, LlamaDeployment)> {
    let dir = repo_root().join("examples");
    let mut out = Vec::new();
    for entry in std::fs::read_dir(&dir).expect("examples/ exists") {
        let path = entry.expect("readable entry").path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).expect("readable example");
        let deployment: LlamaDeployment = serde_yaml::from_str(&text)
            .unwrap_or_else(|e| panic!("{} is not a LlamaDeployment: {e}", path.display()));
        out.push((path, text, deployment));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// The "about N GB per rank" figure in an example's header comment.
fn stated_gb_per_rank(text: &str) -> Option<f64> {
    let after = text.split("about ").nth(1)?;
    let number = after.split(" GB per rank").next()?;
    number.trim().parse().ok()
}

#[test]
fn every_bundled_model_has_an_example_plus_the_tiny_one() {
    let models: BTreeSet<String> = examples()
        .iter()
        .map(|(_, _, d)| d.spec.model.to_ascii_lowercase())
        .collect();
    for entry in tandem_planner::CATALOG {
        assert!(
            models.contains(&entry.model_id.to_ascii_lowercase()),
            "no example for {}",
            entry.model_id
        );
    }
    assert!(
        models.contains("tandem-dev/tiny-llama"),
        "the tiny demo model has an example"
    );
    assert_eq!(models.len(), tandem_planner::CATALOG.len() + 1);
}

#[test]
fn examples_ask_for_valid_world_sizes_and_state_true_memory_figures() {
    let mut wrong = Vec::new();
    for (path, text, d) in examples() {
        let shape = match (&d.spec.architecture, lookup_model(&d.spec.model)) {
            (Some(arch), _) => arch.shape(),
            (None, Some(entry)) => entry.shape,
            (None, None) => panic!("{}: unknown model without architecture", path.display()),
        };
        let world = u32::try_from(d.spec.sharding.world_size).expect("positive world size");
        check_world_size(&shape, world)
            .unwrap_or_else(|e| panic!("{}: world size {world}: {e}", path.display()));
        if let Some(stated) = stated_gb_per_rank(&text) {
            let limits = d.spec.batch_limits();
            let budget = ServingBudget::batched(
                u64::from(d.spec.max_context_tokens),
                u64::from(limits.max_tokens),
                u64::try_from(limits.prefix_cache_bytes).expect("non-negative cache"),
            );
            let estimate = memory_per_rank(&shape, world, budget).total();
            let estimate_gb = estimate as f64 / 1e9;
            if (stated - estimate_gb).abs() / estimate_gb >= 0.15 {
                wrong.push(format!(
                    "{}: says about {stated} GB per rank, the planner estimates {estimate_gb:.1} GB",
                    path.display()
                ));
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[tokio::test]
async fn the_api_server_accepts_every_example() {
    let c = cluster();
    let ns = TestNamespace::new(c, "examples").await.unwrap();
    let dir = repo_root().join("examples");
    let out = c
        .kubectl(
            Identity::Admin,
            &[
                "apply",
                "--server-side",
                "--dry-run=server",
                "-n",
                ns.name(),
                "-f",
                &dir.to_string_lossy(),
            ],
        )
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "server-side dry run failed:\n{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for (_, _, d) in examples() {
        let name = d.metadata.name.expect("examples are named");
        assert!(
            stdout.contains(&format!(
                "llamadeployment.tandem.dev/{name} serverside-applied (server dry run)"
            )),
            "{name} missing from: {stdout}"
        );
    }
}
