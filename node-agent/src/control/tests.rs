//! The control service over real sockets on 127.0.0.1.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tonic::Code;
use tonic::transport::Endpoint;

use super::*;
use crate::engine::batch::{Admit, Feed, PlanSink, Reuse, Save, StepPlan};
use crate::engine::sampling::SamplingParams;
use crate::tls::TlsMaterial;

fn identity(world_size: i32) -> GroupIdentity {
    GroupIdentity {
        deployment: "llama".into(),
        epoch: 4,
        world_size,
        model: "org/model".into(),
        revision: "main".into(),
    }
}

const TOKEN: &str = "s3cret-token";

/// The certificate every test's rank 0 serves (127.0.0.1) and its CA.
fn material() -> &'static TlsMaterial {
    static MATERIAL: std::sync::OnceLock<TlsMaterial> = std::sync::OnceLock::new();
    MATERIAL.get_or_init(crate::tls::test_material)
}

/// Serves rank 0's control service on `listener` with `token` (over TLS
/// with `tls`) until `shutdown` resolves.
fn spawn_serve(
    listener: TcpListener,
    coordinator: Arc<Coordinator>,
    token: &str,
    tls: Option<&'static TlsMaterial>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    let token = token.to_owned();
    tokio::spawn(async move {
        let _ = serve(
            listener,
            coordinator,
            token,
            tls,
            std::future::pending(),
            shutdown,
        )
        .await;
    })
}

/// Starts rank 0's service over TLS; returns its address and coordinator.
async fn start(world_size: i32, barrier: Duration) -> (String, Arc<Coordinator>) {
    start_with(world_size, barrier, Some(material())).await
}

async fn start_with(
    world_size: i32,
    barrier: Duration,
    tls: Option<&'static TlsMaterial>,
) -> (String, Arc<Coordinator>) {
    let coordinator = Coordinator::new(identity(world_size), barrier);
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = listener.local_addr().expect("addr").to_string();
    spawn_serve(
        listener,
        coordinator.clone(),
        TOKEN,
        tls,
        std::future::pending(),
    );
    (address, coordinator)
}

fn client(address: &str, rank: i32, token: &str, id: GroupIdentity) -> ControlClient {
    ControlClient::new(
        address,
        id,
        rank,
        token,
        Some(material()),
        Duration::from_secs(5),
    )
    .expect("client")
}

#[tokio::test]
async fn ranks_meet_and_every_rank_receives_every_job() {
    ranks_meet_and_receive_every_job(true).await;
}

#[tokio::test]
async fn ranks_meet_and_every_rank_receives_every_job_in_plain_text() {
    ranks_meet_and_receive_every_job(false).await;
}

async fn ranks_meet_and_receive_every_job(tls: bool) {
    let tls = tls.then(material);
    let (address, coordinator) = start_with(3, Duration::from_secs(10), tls).await;
    let client = |rank| {
        ControlClient::new(
            &address,
            identity(3),
            rank,
            TOKEN,
            tls,
            Duration::from_secs(5),
        )
        .expect("client")
    };
    let c1 = client(1);
    let c2 = client(2);

    let (r0, r1, r2) = tokio::join!(
        coordinator.arrive(0, Stage::Connect),
        c1.join(Stage::Connect),
        c2.join(Stage::Connect)
    );
    assert_eq!(r0.expect("rank 0"), vec![0, 1, 2]);
    assert_eq!(r1.expect("rank 1"), vec![0, 1, 2]);
    assert_eq!(r2.expect("rank 2"), vec![0, 1, 2]);

    let mut s1 = c1.steps().await.expect("stream 1");
    let mut s2 = c2.steps().await.expect("stream 2");
    let (r0, r1, r2) = tokio::join!(
        coordinator.arrive(0, Stage::Ready),
        c1.join(Stage::Ready),
        c2.join(Stage::Ready)
    );
    assert!(r0.is_ok() && r1.is_ok() && r2.is_ok());

    // A step with every kind of change survives the wire unchanged.
    let plan = StepPlan {
        step: 0,
        evict: vec![4],
        save: vec![Save {
            id: 6,
            entry: 5,
            tokens: 12,
        }],
        retire: vec![6],
        admit: vec![Admit {
            id: 7,
            prompt: vec![1, 2, 3],
            sampling: SamplingParams {
                temperature: 0.5,
                top_p: 0.9,
                seed: 1,
            },
            reuse: Some(Reuse {
                entry: 3,
                tokens: 2,
            }),
            logprobs: None,
        }],
        feed: vec![
            Feed {
                id: 7,
                prompt_tokens: 1,
            },
            Feed {
                id: 8,
                prompt_tokens: 0,
            },
        ],
    };
    PlanSink::send(&coordinator, &plan).expect("send");
    for stream in [&mut s1, &mut s2] {
        let step = stream.message().await.expect("recv").expect("a step");
        assert_eq!(plan_from_proto(step), plan);
    }

    // A formed group takes no more members.
    let late = c1.join(Stage::Connect).await;
    assert!(late.is_err());

    // Rank 2 going away breaks the group, and rank 1 hears of it.
    let watcher = tokio::spawn(coordinator.clone().watch_streams());
    drop(s2);
    let reason = tokio::time::timeout(Duration::from_secs(10), coordinator.wait_broken())
        .await
        .expect("noticed in time");
    assert!(reason.contains("rank 2"), "{reason}");
    watcher.await.expect("watcher");
    let end = tokio::time::timeout(Duration::from_secs(10), s1.message())
        .await
        .expect("stream ends");
    assert!(!matches!(end, Ok(Some(_))), "{end:?}");
}

#[tokio::test]
async fn outsiders_can_neither_join_nor_read_steps() {
    let (address, coordinator) = start(2, Duration::from_secs(2)).await;
    for token in ["wrong-token", ""] {
        // A refused token is retried until the deadline (an older epoch's
        // rank 0 may still hold the address), then the refusal is the error.
        // The outsider has the CA: TLS lets it talk, the token keeps it out.
        let outsider = ControlClient::new(
            &address,
            identity(2),
            1,
            token,
            Some(material()),
            Duration::from_secs(1),
        )
        .expect("client");
        match outsider.join(Stage::Connect).await {
            Err(ClientError::Refused { code, .. }) => assert_eq!(code, Code::Unauthenticated),
            other => panic!("join with {token:?} should be refused: {other:?}"),
        }
        match outsider.steps().await {
            Err(ClientError::Refused { code, .. }) => assert_eq!(code, Code::Unauthenticated),
            other => panic!("steps with {token:?} should be refused: {other:?}"),
        }
    }
    // No token at all.
    let channel = Endpoint::from_shared(format!("https://{address}"))
        .expect("uri")
        .tls_config(material().control_client_config())
        .expect("tls")
        .connect()
        .await
        .expect("connect");
    let mut bare = pb::control_client::ControlClient::new(channel);
    let status = bare
        .steps(pb::StepsRequest {
            member: Some(identity(2).member(1)),
        })
        .await
        .expect_err("refused");
    assert_eq!(status.code(), Code::Unauthenticated);
    // Nothing the outsiders did counts as arriving.
    let alone = coordinator.arrive(0, Stage::Connect).await;
    assert!(
        matches!(&alone, Err(BarrierError::Timeout { missing, .. }) if missing == &vec![1]),
        "{alone:?}"
    );
}

#[tokio::test]
async fn a_plain_client_and_a_client_trusting_another_ca_get_nowhere() {
    let (address, coordinator) = start(2, Duration::from_secs(2)).await;
    // Plain gRPC to the TLS port: never an answer, only a transport error.
    let plain = ControlClient::new(
        &address,
        identity(2),
        1,
        TOKEN,
        None,
        Duration::from_millis(800),
    )
    .expect("client");
    match plain.join(Stage::Connect).await {
        Err(ClientError::Unreachable { .. }) => {}
        other => panic!("a plain client should not reach a TLS rank 0: {other:?}"),
    }
    // A rank trusting another CA refuses this rank 0's certificate, and so
    // never presents its token to it.
    let other_ca = crate::tls::test_material();
    let wary = ControlClient::new(
        &address,
        identity(2),
        1,
        TOKEN,
        Some(&other_ca),
        Duration::from_millis(800),
    )
    .expect("client");
    match wary.join(Stage::Connect).await {
        Err(ClientError::Unreachable { last, .. }) => {
            assert!(last.to_lowercase().contains("certificate"), "{last}");
        }
        other => panic!("an unknown issuer should be refused: {other:?}"),
    }
    let alone = coordinator.arrive(0, Stage::Connect).await;
    assert!(
        matches!(&alone, Err(BarrierError::Timeout { missing, .. }) if missing == &vec![1]),
        "{alone:?}"
    );
}

#[tokio::test]
async fn stale_epochs_and_other_models_are_refused_by_name() {
    let (address, _coordinator) = start(2, Duration::from_secs(2)).await;
    let mut stale = identity(2);
    stale.epoch = 3;
    match client(&address, 1, TOKEN, stale).join(Stage::Connect).await {
        Err(ClientError::Refused { code, message, .. }) => {
            assert_eq!(code, Code::FailedPrecondition);
            assert!(
                message.contains("epoch 3") && message.contains("epoch 4"),
                "{message}"
            );
        }
        other => panic!("{other:?}"),
    }
    let mut other_model = identity(2);
    other_model.model = "org/other".into();
    let refused = client(&address, 1, TOKEN, other_model)
        .join(Stage::Connect)
        .await;
    assert!(
        matches!(refused, Err(ClientError::Refused { .. })),
        "{refused:?}"
    );
}

#[tokio::test]
async fn a_missing_rank_times_the_barrier_out_with_its_number() {
    let (address, _coordinator) = start(3, Duration::from_millis(500)).await;
    let c1 = client(&address, 1, TOKEN, identity(3));
    match c1.join(Stage::Connect).await {
        Err(ClientError::BarrierTimeout(message)) => {
            assert!(message.contains("[0, 2]"), "{message}");
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn an_absent_rank_0_is_reported_unreachable() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = listener.local_addr().expect("addr").to_string();
    drop(listener);
    let c = ControlClient::new(
        &address,
        identity(2),
        1,
        TOKEN,
        Some(material()),
        Duration::from_millis(800),
    )
    .expect("client");
    match c.join(Stage::Connect).await {
        Err(ClientError::Unreachable { address: a, .. }) => assert_eq!(a, address),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn a_rank_waits_out_an_older_rank_0_that_still_holds_the_address() {
    // The older epoch's rank 0, with that epoch's token, still listens.
    let older = Coordinator::new(identity(2), Duration::from_secs(10));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = listener.local_addr().expect("addr");
    let (stop_older, stopped) = tokio::sync::oneshot::channel::<()>();
    let older_server = spawn_serve(
        listener,
        older,
        "older-epoch-token",
        Some(material()),
        async {
            let _ = stopped.await;
        },
    );
    let c1 = client(&address.to_string(), 1, TOKEN, identity(2));
    let joining = tokio::spawn(async move { c1.join(Stage::Connect).await });
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(
        !joining.is_finished(),
        "the older rank 0's refusal is retried, not taken as final"
    );
    let _ = stop_older.send(());
    older_server.await.expect("the older rank 0 stops");

    // The new epoch's rank 0 takes the same address.
    let coordinator = Coordinator::new(identity(2), Duration::from_secs(10));
    let listener = TcpListener::bind(address).await.expect("rebind");
    spawn_serve(
        listener,
        coordinator.clone(),
        TOKEN,
        Some(material()),
        std::future::pending(),
    );
    let (r0, r1) = tokio::join!(coordinator.arrive(0, Stage::Connect), joining);
    assert_eq!(r0.expect("rank 0"), vec![0, 1]);
    assert_eq!(
        r1.expect("join task").expect("rank 1 joins the new rank 0"),
        vec![0, 1]
    );
}
