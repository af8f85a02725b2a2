//! Tensor-parallel groups of 2 and 4 ranks, each rank in its own agent
//! (distinct node names and ports) on loopback, formed through rank 0's
//! control service and the MLX ring backend, serving through rank 0. The
//! HTTP answer is checked against the engine alone (`tandem-agent
//! generate --world-size N`) on the same prompt.

use serde_json::json;
use tandem_tests::{
    TestNamespace, admin,
    agent::{Agent, AgentOptions, Group, MODEL, agent_binary, model_dir},
    cluster,
    http::{post, request, sse_data},
    unique_name,
};

/// The engine's own greedy text for `prompt` at `world` ranks.
fn engine_text(prompt: &str, max_tokens: usize, world: usize) -> anyhow::Result<String> {
    let out = std::process::Command::new(agent_binary())
        .arg("generate")
        .arg("--model")
        .arg(model_dir().join(MODEL))
        .args(["--prompt", prompt, "--max-tokens", &max_tokens.to_string()])
        .args(["--world-size", &world.to_string(), "--json"])
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "generate failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().last().unwrap_or_default();
    let report: serde_json::Value = serde_json::from_str(line)?;
    Ok(report["text"].as_str().unwrap_or_default().to_owned())
}

async fn form_and_serve(world: usize) -> anyhow::Result<()> {
    let cluster = cluster();
    let admin = admin(cluster).await;
    let ns = TestNamespace::new(cluster, &format!("agent-tp{world}")).await?;
    let agents: Vec<Agent> = (0..world)
        .map(|r| {
            Agent::start(
                cluster,
                &unique_name(&format!("agent-tp{world}-r{r}")),
                AgentOptions::tiny_model(),
            )
        })
        .collect();
    let nodes: Vec<String> = agents.iter().map(|a| a.name.clone()).collect();
    let group = Group::new(&format!("tp{world}"), 1, &nodes);
    group
        .create(&admin, ns.name(), &format!("token-tp{world}"))
        .await?;
    group.wait_ready(&admin, ns.name()).await?;
    for agent in &agents {
        assert_eq!(agent.workers().len(), 1, "one worker on {}", agent.name);
    }

    let prompt = "The quick brown fox";
    let done = post(
        group.serving_port,
        "/v1/completions",
        &json!({"model": MODEL, "prompt": prompt, "max_tokens": 12, "temperature": 0}),
    )?;
    assert_eq!(done.status, 200, "{}", done.body);
    let text = done.json()?["choices"][0]["text"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert_eq!(
        text,
        engine_text(prompt, 12, world)?,
        "the group answers as the engine alone does"
    );

    let chat = post(
        group.serving_port,
        "/v1/chat/completions",
        &json!({"model": MODEL, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 6, "stream": true}),
    )?;
    assert_eq!(chat.status, 200, "{}", chat.body);
    let data = sse_data(&chat.body);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "{data:?}");
    let metrics = request(group.serving_port, "GET", "/metrics", &[], None)?.body;
    for r in 0..world {
        assert!(
            metrics.contains(&format!("tandem_rank_ready{{rank=\"{r}\"}} 1")),
            "{metrics}"
        );
    }
    assert!(
        metrics.contains("tandem_generated_tokens_total"),
        "{metrics}"
    );

    // Each agent's firewall rules open its rank's ring port, on the ring
    // address only, to the group's hosts and drop the rest.
    for (rank, agent) in agents.iter().enumerate() {
        let out = std::process::Command::new(agent_binary())
            .args(["firewall-rules", "--format", "nft", "--state-dir"])
            .arg(&agent.state_dir)
            .output()?;
        let rules = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let port = group.ring_ports[rank];
        assert!(
            rules.contains(&format!(
                "# {}/{} epoch 1 rank {rank}",
                ns.name(),
                group.shard_name(rank)
            )) && rules.contains(&format!(
                "ip daddr 127.0.0.1 tcp dport {port} ip saddr {{ 127.0.0.1 }} accept"
            )) && rules.contains(&format!("ip daddr 127.0.0.1 tcp dport {port} drop")),
            "{rules}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn a_group_of_two_forms_and_serves() -> anyhow::Result<()> {
    form_and_serve(2).await
}

#[tokio::test]
async fn a_group_of_four_forms_and_serves() -> anyhow::Result<()> {
    form_and_serve(4).await
}

/// A Mac's full host name can be longer than a label value (63
/// characters): the operator shortens it with a hash in the shard's
/// `tandem.dev/node` label, and the agent must select its shards by that
/// same value, not by its raw name (which the API server refuses as a
/// selector).
#[tokio::test]
async fn an_agent_whose_node_name_is_longer_than_a_label_value_runs_its_shard() -> anyhow::Result<()>
{
    let cluster = cluster();
    let admin = admin(cluster).await;
    let ns = TestNamespace::new(cluster, "agent-long-name").await?;
    let name = format!(
        "mac-studio-of-the-inference-team.{}",
        unique_name("lab-building-2.corp.example")
    );
    assert!(name.len() > 63, "{name}");
    let agent = Agent::start(cluster, &name, AgentOptions::tiny_model());
    let group = Group::new("long", 1, std::slice::from_ref(&agent.name));
    group.create(&admin, ns.name(), "token-long").await?;
    group.wait_ready(&admin, ns.name()).await?;
    let done = post(
        group.serving_port,
        "/v1/completions",
        &json!({"model": MODEL, "prompt": "Hello", "max_tokens": 3, "temperature": 0}),
    )?;
    assert_eq!(done.status, 200, "{}", done.body);
    Ok(())
}
