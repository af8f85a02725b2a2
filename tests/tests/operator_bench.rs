//! Benchmark, not a test (ignored; `dev/bench-operator.sh` runs it in
//! release mode): 1000 LlamaDeployments over 64 LlamaNodes against the real
//! API server, with the operator as a real process.
//!
//! It reports the time from the first create until the operator has placed
//! every deployment (all shards written, status Placed), the reconcile
//! latency p50/p99 (from the operator's own histogram), the end-to-end
//! placement latency per deployment, the operator's peak RSS and CPU time,
//! and the time to delete everything through the finalizer. As a peer
//! figure, measured in the same run, it times the benchmark client writing
//! the same number of LlamaShards straight to the API server: the floor for
//! any operator that writes one object per rank.
//!
//! `TANDEM_BENCH_DEPLOYMENTS` and `TANDEM_BENCH_NODES` change the size.

use std::sync::Arc;
use std::time::{Duration, Instant};

use kube::ResourceExt;
use kube::api::{Api, ListParams, ObjectMeta, PostParams};
use tandem_crds::*;
use tandem_tests::{
    TestNamespace, eventually,
    operator::{Setup, WAIT, all_shards, condition, deployment},
    repo_root,
};
use tokio::sync::Semaphore;

/// Requests in flight while creating objects.
const IN_FLIGHT: usize = 32;

fn env_or<T: std::str::FromStr>(key: &str, default: T) -> T {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// `(le, cumulative count)` of a Prometheus histogram.
fn buckets(metrics: &str, name: &str) -> Vec<(f64, f64)> {
    let prefix = format!("{name}_bucket{{le=\"");
    metrics
        .lines()
        .filter_map(|l| l.strip_prefix(&prefix))
        .filter_map(|rest| {
            let (le, count) = rest.split_once("\"} ")?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, count.trim().parse().ok()?))
        })
        .collect()
}

/// Quantile `q` of a histogram, interpolating linearly inside a bucket.
fn quantile(buckets: &[(f64, f64)], q: f64) -> f64 {
    let total = buckets.last().map_or(0.0, |b| b.1);
    let want = q * total;
    let mut prev = (0.0, 0.0);
    for &(le, count) in buckets {
        if count >= want {
            if le.is_infinite() {
                return prev.0;
            }
            let span = count - prev.1;
            let frac = if span > 0.0 {
                (want - prev.1) / span
            } else {
                1.0
            };
            return prev.0 + frac * (le - prev.0);
        }
        prev = (le, count);
    }
    prev.0
}

/// Quantile `q` of plain samples.
fn sample_quantile(samples: &mut [f64], q: f64) -> f64 {
    samples.sort_by(|a, b| a.total_cmp(b));
    let i = ((samples.len() as f64 - 1.0) * q).round() as usize;
    samples.get(i).copied().unwrap_or(f64::NAN)
}

/// `VmHWM` (peak RSS) and `VmRSS` of a process, in KiB.
fn memory_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    (field("VmHWM:"), field("VmRSS:"))
}

/// User plus system CPU seconds of a process.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start at ')'.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of stat, 12 and 13 after ')'.
    (ticks(11) + ticks(12)) / 100.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run dev/bench-operator.sh"]
async fn placing_1000_deployments_over_64_nodes() {
    let count: usize = env_or("TANDEM_BENCH_DEPLOYMENTS", 1000);
    let node_count: u8 = env_or("TANDEM_BENCH_NODES", 64);
    let mut s = Setup::new("bench").await;
    // Kubelet-like renewals, so 64 agents do not load the API server more
    // than real ones would.
    s.agents.renew_every = Duration::from_secs(10);
    s.nodes(node_count, 512, 60).await;
    let op = s.operator("bench");
    let op_ref = &op;
    eventually("the operator to lead", WAIT, || async move {
        Ok(op_ref
            .metric("tandem_operator_leader")
            .ok()
            .filter(|v| *v == 1.0))
    })
    .await
    .expect("leading");

    // Create every deployment, IN_FLIGHT at a time.
    let worlds = [1, 2, 4];
    let expected_shards: usize = (0..count).map(|i| worlds[i % 3] as usize).sum();
    let api = s.deployments();
    let gate = Arc::new(Semaphore::new(IN_FLIGHT));
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(count);
    for i in 0..count {
        let mut d = deployment(&format!("d{i:04}"), worlds[i % 3], &s.agents);
        d.spec.serving = Some(Serving {
            port: 20000 + i as i32,
            ..Serving::default()
        });
        let api = api.clone();
        let gate = Arc::clone(&gate);
        tasks.push(tokio::spawn(async move {
            let _permit = gate.acquire_owned().await.expect("semaphore");
            api.create(&PostParams::default(), &d).await.map(|_| ())
        }));
    }
    for t in tasks {
        t.await.expect("create task").expect("create");
    }
    let created = start.elapsed();

    // Placed, as the operator counts it: every deployment's status written
    // with its shards in place (phase Loading, as no agent loads anything).
    let loading = "tandem_operator_deployments{phase=\"Loading\"}";
    let target = count as f64;
    eventually(
        &format!("{count} deployments placed"),
        Duration::from_secs(600),
        || async move {
            Ok(op_ref
                .metric(loading)
                .ok()
                .filter(|v| *v >= target)
                .map(|_| ()))
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", op.log_tail()));
    let all_placed = start.elapsed();
    let (peak_kib, rss_kib) = memory_kib(op.pid());
    let cpu = cpu_seconds(op.pid());

    // Check it from the API side, and take the per-deployment latency.
    let list = api.list(&ListParams::default()).await.expect("list");
    let mut latencies = Vec::new();
    for d in &list.items {
        let st = d.status.as_ref().expect("status");
        let placed = condition(st, "Placed").expect("Placed");
        assert_eq!(placed.status, "True", "{}: {placed:?}", d.name_any());
        let created_at = d.metadata.creation_timestamp.as_ref().expect("created").0;
        let secs = placed
            .last_transition_time
            .0
            .duration_since(created_at)
            .as_secs_f64();
        latencies.push(secs.max(0.0));
    }
    let shards = all_shards(&s.admin, s.ns()).await.expect("shards");
    assert_eq!(
        shards.len(),
        expected_shards,
        "one shard per rank, none twice"
    );
    let metrics = op.get("/metrics").expect("metrics").body;
    let hist = buckets(&metrics, "tandem_operator_reconcile_duration_seconds");
    let reconciles = hist.last().map_or(0.0, |b| b.1);
    let (p50, p99) = (quantile(&hist, 0.50), quantile(&hist, 0.99));
    let (lat50, lat99) = (
        sample_quantile(&mut latencies, 0.50),
        sample_quantile(&mut latencies, 0.99),
    );

    // Delete everything (one delete-collection call); the finalizer runs
    // for each deployment.
    let delete_start = Instant::now();
    api.delete_collection(&Default::default(), &ListParams::default())
        .await
        .expect("delete collection");
    let api_ref = &api;
    eventually(
        "every deployment deleted",
        Duration::from_secs(600),
        || async move {
            Ok(api_ref
                .list(&ListParams::default())
                .await?
                .items
                .is_empty()
                .then_some(()))
        },
    )
    .await
    .expect("deleted");
    let deleted = delete_start.elapsed();
    // VmHWM only grows: read it again to include the deletions.
    let peak_kib = peak_kib.max(memory_kib(op.pid()).0);

    // Peer figure: the same number of shard objects written straight to the
    // API server by this client, IN_FLIGHT at a time.
    let floor_ns = TestNamespace::new(s.cluster, "op-bench-floor")
        .await
        .expect("namespace");
    let floor_api: Api<LlamaShard> = Api::namespaced(s.admin.clone(), floor_ns.name());
    let floor_start = Instant::now();
    let mut tasks = Vec::with_capacity(shards.len());
    for sh in &shards {
        let copy = LlamaShard {
            metadata: ObjectMeta {
                name: Some(sh.name_any()),
                labels: Some(sh.labels().clone()),
                ..Default::default()
            },
            spec: sh.spec.clone(),
            status: None,
        };
        let api = floor_api.clone();
        let gate = Arc::clone(&gate);
        tasks.push(tokio::spawn(async move {
            let _permit = gate.acquire_owned().await.expect("semaphore");
            api.create(&PostParams::default(), &copy).await.map(|_| ())
        }));
    }
    for t in tasks {
        t.await.expect("create task").expect("create");
    }
    let floor = floor_start.elapsed();

    let report = serde_json::json!({
        "deployments": count,
        "nodes": node_count,
        "shards": expected_shards,
        "create_seconds": created.as_secs_f64(),
        "all_placed_seconds": all_placed.as_secs_f64(),
        "reconciles": reconciles,
        "reconcile_p50_ms": p50 * 1000.0,
        "reconcile_p99_ms": p99 * 1000.0,
        "placement_latency_p50_s": lat50,
        "placement_latency_p99_s": lat99,
        "peak_rss_mib": peak_kib as f64 / 1024.0,
        "rss_after_placing_mib": rss_kib as f64 / 1024.0,
        "operator_cpu_seconds_to_place": cpu,
        "delete_all_seconds": deleted.as_secs_f64(),
        "peer_client_writes_shards_seconds": floor.as_secs_f64(),
    });
    println!("\n== tandem-operator placement benchmark ==");
    println!("{count} LlamaDeployments ({expected_shards} ranks) over {node_count} LlamaNodes");
    println!(
        "  created by the client in          {:>8.2} s",
        created.as_secs_f64()
    );
    println!(
        "  all placed after                  {:>8.2} s   (target < 60 s)",
        all_placed.as_secs_f64()
    );
    println!(
        "  peer: client writes {expected_shards} shards in {:>8.2} s   (same API server, {IN_FLIGHT} in flight)",
        floor.as_secs_f64()
    );
    println!("  reconciles                        {reconciles:>8.0}");
    println!(
        "  reconcile latency p50 / p99       {:>8.1} / {:.1} ms",
        p50 * 1000.0,
        p99 * 1000.0
    );
    println!("  create → Placed p50 / p99         {lat50:>8.0} / {lat99:.0} s   (1 s resolution)");
    println!(
        "  operator peak RSS                 {:>8.1} MiB (target < 100 MiB)",
        peak_kib as f64 / 1024.0
    );
    println!("  operator CPU until all placed     {cpu:>8.2} s");
    println!(
        "  delete all through the finalizer  {:>8.2} s",
        deleted.as_secs_f64()
    );
    let dir = repo_root().join("target/bench");
    std::fs::create_dir_all(&dir).expect("target/bench");
    std::fs::write(
        dir.join("operator.json"),
        serde_json::to_string_pretty(&report).expect("json"),
    )
    .expect("writing target/bench/operator.json");
    drop(op);
}
