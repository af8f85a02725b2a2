//! Rank 0's API from the outside: the real `openai` Python client (PyPI,
//! venv from `dev/py-client.sh`) streaming a chat completion from a group
//! of two; 8 streams at once in one batch, one of them cancelled by its
//! client while the rest go on; a rank worker killed with SIGKILL while 4
//! streams run (every client gets an error promptly, the shard reports the
//! crash, the group re-forms); every
//! kind of bad request answered with an OpenAI-style error; a full queue
//! answered 429; a client that disconnects stops its generation.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;
use tandem_crds::ShardPhase;
use tandem_tests::{
    TestNamespace, admin,
    agent::{Agent, AgentOptions, Group, MODEL, WAIT, create_secret, shard_status},
    cluster, eventually,
    http::{Response, metric_value, openai_python, post, request, send},
    unique_name,
};

/// Streams a chat completion with the openai client, printing one JSON line
/// per chunk, then `{"done": ...}` or `{"error": ...}`.
const STREAM_CHAT: &str = r#"
import json, sys, time, openai
port, max_tokens, ignore_eos = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1"
client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=120)
models = [m.id for m in client.models.list().data]
print(json.dumps({"models": models}), flush=True)
content, finish, started = "", None, time.time()
try:
    stream = client.chat.completions.create(
        model=models[0],
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me a story."}],
        max_tokens=max_tokens, temperature=0.7, seed=3, stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": ignore_eos},
    )
    usage = None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage.completion_tokens
        for choice in chunk.choices:
            if choice.delta.content:
                content += choice.delta.content
                print(json.dumps({"chunk": choice.delta.content}), flush=True)
            if choice.finish_reason:
                finish = choice.finish_reason
    print(json.dumps({"done": {"content": content, "finish": finish, "usage": usage}}), flush=True)
except openai.APIError as e:
    print(json.dumps({"error": str(e), "type": type(e).__name__, "after": time.time() - started}), flush=True)
    sys.exit(3)
"#;

/// Streams `n` chat completions at once with the openai client, one thread
/// each, printing one JSON line per event: `{"stream": i, "chunk": ..}`,
/// then `{"stream": i, "done": ..}` or `{"stream": i, "error": ..}`. Stream
/// `cancel` (if not -1) closes its connection after 3 chunks and prints
/// `{"stream": i, "cancelled": true}`.
const MULTI_STREAM: &str = r#"
import json, sys, threading, time, openai
port, n, max_tokens, cancel = (int(a) for a in sys.argv[1:5])
client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=120)
model = client.models.list().data[0].id
lock = threading.Lock()
def say(**kw):
    with lock:
        kw["t"] = time.time()
        print(json.dumps(kw), flush=True)
def run(i):
    try:
        stream = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": f"Story number {i}, please."}],
            max_tokens=max_tokens, temperature=0, stream=True, extra_body={"ignore_eos": True},
            stream_options={"include_usage": True},
        )
        chunks, usage = 0, None
        for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage.completion_tokens
            for choice in chunk.choices:
                if choice.delta.content:
                    chunks += 1
                    say(stream=i, chunk=choice.delta.content)
            if i == cancel and chunks >= 3:
                stream.close()
                say(stream=i, cancelled=True)
                return
        say(stream=i, done={"chunks": chunks, "usage": usage})
    except openai.APIError as e:
        say(stream=i, error=str(e))
threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
for t in threads: t.start()
for t in threads: t.join()
"#;

fn start_streams(port: u16, n: usize, max_tokens: usize, cancel: i32) -> std::process::Child {
    Command::new(openai_python())
        .arg("-c")
        .arg(MULTI_STREAM)
        .args([
            port.to_string(),
            n.to_string(),
            max_tokens.to_string(),
            cancel.to_string(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python")
}

fn start_stream(port: u16, max_tokens: usize, ignore_eos: bool) -> std::process::Child {
    Command::new(openai_python())
        .arg("-c")
        .arg(STREAM_CHAT)
        .arg(port.to_string())
        .arg(max_tokens.to_string())
        .arg(if ignore_eos { "1" } else { "0" })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python")
}

fn lines_of(child: &mut std::process::Child) -> impl Iterator<Item = serde_json::Value> + use<> {
    let stdout = child.stdout.take().expect("stdout");
    BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
        .filter_map(|l| serde_json::from_str(&l).ok())
}

struct Pair {
    _agents: Vec<Agent>,
    group: Group,
    ns: TestNamespace,
    admin: kube::Client,
}

async fn group_of_two(prefix: &str, max_context_tokens: u32) -> anyhow::Result<Pair> {
    let cluster = cluster();
    let admin = admin(cluster).await;
    let ns = TestNamespace::new(cluster, prefix).await?;
    let agents: Vec<Agent> = (0..2)
        .map(|r| {
            Agent::start(
                cluster,
                &unique_name(&format!("{prefix}-r{r}")),
                AgentOptions::tiny_model(),
            )
        })
        .collect();
    let nodes: Vec<String> = agents.iter().map(|a| a.name.clone()).collect();
    let mut group = Group::new(prefix, 1, &nodes);
    group.max_context_tokens = max_context_tokens;
    group.create(&admin, ns.name(), "token-openai").await?;
    group.wait_ready(&admin, ns.name()).await?;
    Ok(Pair {
        _agents: agents,
        group,
        ns,
        admin,
    })
}

#[tokio::test]
async fn the_openai_client_streams_a_chat_completion() -> anyhow::Result<()> {
    let pair = group_of_two("agent-oai", 512).await?;
    let mut child = start_stream(pair.group.serving_port, 24, false);
    let lines: Vec<serde_json::Value> = lines_of(&mut child).collect();
    let status = child.wait()?;
    let mut stderr = String::new();
    if let Some(mut e) = child.stderr.take() {
        use std::io::Read;
        let _ = e.read_to_string(&mut stderr);
    }
    assert!(status.success(), "{lines:?}\n{stderr}");
    assert_eq!(lines[0]["models"][0], MODEL);
    let done = &lines.last().expect("output")["done"];
    let content = done["content"].as_str().unwrap_or_default();
    let chunks = lines.iter().filter(|l| l.get("chunk").is_some()).count();
    assert!(chunks >= 1, "{lines:?}");
    assert!(!content.is_empty());
    assert!(
        matches!(done["finish"].as_str(), Some("stop" | "length")),
        "{done}"
    );
    assert!(
        done["usage"]
            .as_u64()
            .is_some_and(|n| (1..=24).contains(&n)),
        "{done}"
    );
    Ok(())
}

#[tokio::test]
async fn eight_concurrent_streams_complete_and_a_cancelled_one_leaves_the_rest()
-> anyhow::Result<()> {
    let pair = group_of_two("agent-eight", 512).await?;
    let mut child = start_streams(pair.group.serving_port, 8, 40, 2);
    let lines: Vec<serde_json::Value> = lines_of(&mut child).collect();
    child.wait()?;
    let of = |i: u64| lines.iter().filter(move |l| l["stream"] == i);
    let cancelled_at = of(2)
        .find(|l| l.get("cancelled").is_some())
        .and_then(|l| l["t"].as_f64())
        .expect("stream 2 cancelled itself");
    for i in (0..8).filter(|&i| i != 2) {
        let done = of(i)
            .find_map(|l| l.get("done").cloned())
            .unwrap_or_else(|| panic!("stream {i} did not complete: {lines:?}"));
        assert_eq!(done["usage"], 40, "stream {i}: {done}");
        assert!(done["chunks"].as_u64().is_some_and(|c| c >= 1), "{done}");
    }
    // The others kept streaming after the cancellation.
    let after = lines
        .iter()
        .filter(|l| l["stream"] != 2 && l.get("chunk").is_some())
        .filter(|l| l["t"].as_f64().is_some_and(|t| t > cancelled_at))
        .count();
    assert!(after > 0, "no stream went on after the cancellation");
    // The cancelled generation stopped: the group went idle.
    eventually("the batch to empty", Duration::from_secs(30), || async {
        let m = request(pair.group.serving_port, "GET", "/metrics", &[], None)?.body;
        Ok(m.lines().any(|l| l == "tandem_in_flight 0").then_some(()))
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn a_rank_killed_mid_stream_fails_the_request_promptly_and_the_group_recovers()
-> anyhow::Result<()> {
    let pair = group_of_two("agent-kill", 8192).await?;
    let rank1_node = pair.group.nodes[1].clone();
    let rank1 = pair
        ._agents
        .iter()
        .find(|a| a.name == rank1_node)
        .expect("rank 1 agent");
    let victims = rank1.workers();
    assert_eq!(victims.len(), 1);

    // Four streams in one batch.
    let mut child = start_streams(pair.group.serving_port, 4, 4000, -1);
    let mut lines = lines_of(&mut child);
    // Wait until every stream has its first piece, then kill rank 1's worker.
    let mut started = std::collections::BTreeSet::new();
    for line in lines.by_ref() {
        if line.get("chunk").is_some() {
            started.insert(line["stream"].as_u64().unwrap_or(99));
        }
        if started.len() == 4 {
            break;
        }
    }
    assert_eq!(started.len(), 4, "every stream started");
    let killed_at = Instant::now();
    Command::new("kill")
        .args(["-KILL", &victims[0].to_string()])
        .status()?;
    let mut ended = std::collections::BTreeMap::new();
    for line in lines {
        if line.get("error").is_some() || line.get("done").is_some() {
            ended.insert(line["stream"].as_u64().unwrap_or(99), line);
        }
        if ended.len() == 4 {
            break;
        }
    }
    let noticed = killed_at.elapsed();
    assert_eq!(ended.len(), 4, "every stream ended: {ended:?}");
    for (i, end) in &ended {
        assert!(
            end.get("error").is_some(),
            "stream {i} sees an error, not a normal end: {end}"
        );
    }
    assert!(
        noticed < Duration::from_secs(10),
        "the last error came {noticed:?} after the kill"
    );
    let _ = child.wait();

    // The crash is reported on rank 1's shard, and the worker restarts.
    let name = pair.group.shard_name(1);
    let failed = eventually("rank 1 to report the crash", WAIT, || async {
        let s = shard_status(&pair.admin, pair.ns.name(), &name).await?;
        Ok(s.filter(|s| s.phase == Some(ShardPhase::Failed)))
    })
    .await?;
    assert_eq!(
        failed.reason.as_deref(),
        Some("WorkerCrashed"),
        "{failed:?}"
    );
    assert!(failed.message.unwrap_or_default().contains("signal 9"));
    pair.group.wait_ready(&pair.admin, pair.ns.name()).await?;
    let restarted = rank1.workers();
    assert_eq!(restarted.len(), 1);
    assert_ne!(restarted, victims);

    // The re-formed group serves again.
    let again = eventually("the re-formed group to answer", WAIT, || async {
        let r = post(
            pair.group.serving_port,
            "/v1/chat/completions",
            &json!({"model": MODEL, "messages": [{"role": "user", "content": "again"}], "max_tokens": 4}),
        );
        Ok(r.ok().filter(|r| r.status == 200))
    })
    .await?;
    assert_eq!(again.json()?["object"], "chat.completion");
    Ok(())
}

#[tokio::test]
async fn bad_requests_get_openai_errors_and_a_full_queue_gets_429() -> anyhow::Result<()> {
    let cluster = cluster();
    let admin = admin(cluster).await;
    let ns = TestNamespace::new(cluster, "agent-errors").await?;
    let node_name = unique_name("agent-errors");
    let _agent = Agent::start(
        cluster,
        &node_name,
        AgentOptions {
            // One request in the batch, one waiting, the rest refused.
            args: vec![
                "--max-queue".into(),
                "1".into(),
                "--max-batch-sequences".into(),
                "1".into(),
            ],
            ..AgentOptions::tiny_model()
        },
    );
    let mut group = Group::new("errors", 1, std::slice::from_ref(&node_name));
    group.api_key_secret = Some("errors-api-key".into());
    group.api_key = Some("sk-test-key".into());
    group.max_context_tokens = 4096;
    create_secret(
        &admin,
        ns.name(),
        "errors-api-key",
        "api-key",
        "sk-test-key",
    )
    .await?;
    group.create(&admin, ns.name(), "token-errors").await?;
    group.wait_ready(&admin, ns.name()).await?;
    let port = group.serving_port;
    let key = [("Authorization", "Bearer sk-test-key")];
    let call = |path: &str, body: &str| request(port, "POST", path, &key, Some(body));
    let error = |r: &Response| -> serde_json::Value {
        r.json().map(|v| v["error"].clone()).unwrap_or_default()
    };

    // Authentication.
    let r = request(port, "GET", "/v1/models", &[], None)?;
    assert_eq!(r.status, 401, "{}", r.body);
    assert_eq!(error(&r)["code"], "invalid_api_key");
    let r = request(
        port,
        "GET",
        "/v1/models",
        &[("Authorization", "Bearer wrong")],
        None,
    )?;
    assert_eq!(r.status, 401);
    assert_eq!(request(port, "GET", "/v1/models", &key, None)?.status, 200);
    assert_eq!(
        request(port, "GET", "/healthz", &[], None)?.status,
        200,
        "health needs no key"
    );

    let chat = |extra: serde_json::Value| {
        let mut body = json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4});
        if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
            for (k, v) in e {
                b.insert(k.clone(), v.clone());
            }
        }
        body.to_string()
    };
    // Bad JSON.
    let r = call("/v1/chat/completions", "{\"model\": ")?;
    assert_eq!(r.status, 400);
    assert_eq!(error(&r)["type"], "invalid_request_error");
    assert_eq!(error(&r)["code"], "invalid_json");
    // Unknown model.
    let r = call(
        "/v1/chat/completions",
        &chat(json!({"model": "no/such-model"})),
    )?;
    assert_eq!(r.status, 404);
    assert_eq!(error(&r)["code"], "model_not_found");
    assert_eq!(error(&r)["param"], "model");
    // A prompt longer than the context.
    let long = "word ".repeat(5000);
    let r = call(
        "/v1/chat/completions",
        &chat(json!({"messages": [{"role": "user", "content": long}]})),
    )?;
    assert_eq!(r.status, 400, "{}", r.body);
    assert_eq!(error(&r)["code"], "context_length_exceeded");
    assert_eq!(error(&r)["param"], "messages");
    let r = call(
        "/v1/completions",
        &json!({"model": MODEL, "prompt": long}).to_string(),
    )?;
    assert_eq!(error(&r)["code"], "context_length_exceeded");
    assert_eq!(error(&r)["param"], "prompt");
    // Bad parameters.
    for (extra, param) in [
        (json!({"temperature": 9}), "temperature"),
        (json!({"top_p": -1}), "top_p"),
        (json!({"max_tokens": 0}), "max_tokens"),
        (json!({"n": 3}), "n"),
        (json!({"messages": []}), "messages"),
        (json!({"stream": "yes"}), "stream"),
        (json!({"stop": "s".repeat(257)}), "stop"),
    ] {
        let r = call("/v1/chat/completions", &chat(extra.clone()))?;
        assert_eq!(r.status, 400, "{extra}: {}", r.body);
        assert_eq!(error(&r)["param"], param, "{extra}");
        assert!(error(&r)["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    let r = call(
        "/v1/completions",
        &json!({"model": MODEL, "prompt": [999999]}).to_string(),
    )?;
    assert_eq!(r.status, 400);
    assert_eq!(error(&r)["param"], "prompt");
    // A body over the limit (1 MiB + 32 bytes per context token) is refused
    // from its Content-Length, before it is read: the answer comes although
    // the client has sent none of it.
    let limit = 1_048_576 + 32 * 4096;
    let answer = {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
        s.set_read_timeout(Some(std::time::Duration::from_secs(30)))?;
        write!(
            s,
            "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n\
             Authorization: Bearer sk-test-key\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n",
            limit + 1
        )?;
        let mut answer = String::new();
        s.read_to_string(&mut answer)?;
        answer
    };
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    let json_body = answer.split("\r\n\r\n").nth(1).unwrap_or_default();
    let body: serde_json::Value = serde_json::from_str(json_body).unwrap_or_default();
    assert_eq!(body["error"]["code"], "request_too_large", "{answer}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains(&limit.to_string())),
        "{answer}"
    );
    // Unknown paths and methods.
    let r = request(port, "GET", "/v1/chat/completions", &key, None)?;
    assert_eq!(r.status, 405);
    let r = request(port, "GET", "/v1/nothing", &key, None)?;
    assert_eq!(r.status, 404);
    assert_eq!(error(&r)["type"], "invalid_request_error");

    // A full queue: one request generating, one waiting, the rest refused.
    let long_request =
        json!({"model": MODEL, "prompt": "go", "max_tokens": 1500, "ignore_eos": true}).to_string();
    let handles: Vec<_> = (0..4)
        .map(|_| {
            let body = long_request.clone();
            std::thread::spawn(move || {
                request(
                    port,
                    "POST",
                    "/v1/completions",
                    &[("Authorization", "Bearer sk-test-key")],
                    Some(&body),
                )
            })
        })
        .collect();
    let statuses: Vec<u16> = handles
        .into_iter()
        .map(|h| h.join().expect("thread").map(|r| r.status).unwrap_or(0))
        .collect();
    assert!(statuses.contains(&429), "{statuses:?}");
    assert!(statuses.contains(&200), "{statuses:?}");

    // A client that goes away stops its generation.
    let before = generated_tokens(port)?;
    {
        use std::io::Read;
        let body = json!({"model": MODEL, "prompt": "go", "max_tokens": 3000, "ignore_eos": true, "stream": true}).to_string();
        let mut stream = send(
            port,
            "POST",
            "/v1/completions",
            &[("Authorization", "Bearer sk-test-key")],
            Some(&body),
        )?;
        // Read until the first event arrives: generation has started.
        let mut seen = Vec::new();
        let mut buf = [0u8; 512];
        while !String::from_utf8_lossy(&seen).contains("data:") {
            let n = stream.read(&mut buf)?;
            assert!(
                n > 0,
                "the stream ended early: {}",
                String::from_utf8_lossy(&seen)
            );
            seen.extend_from_slice(&buf[..n]);
        }
    }
    let stopped = eventually(
        "the abandoned generation to stop",
        Duration::from_secs(30),
        || async {
            let m = request(port, "GET", "/metrics", &[], None)?.body;
            Ok(m.lines().any(|l| l == "tandem_in_flight 0").then_some(()))
        },
    )
    .await;
    stopped?;
    let after = generated_tokens(port)?;
    assert!(
        after - before < 2900.0,
        "the generation stopped early ({} tokens)",
        after - before
    );
    Ok(())
}

fn generated_tokens(port: u16) -> anyhow::Result<f64> {
    let m = request(port, "GET", "/metrics", &[], None)?.body;
    metric_value(&m, "tandem_generated_tokens_total")
        .ok_or_else(|| anyhow::anyhow!("no tandem_generated_tokens_total in {m}"))
}
