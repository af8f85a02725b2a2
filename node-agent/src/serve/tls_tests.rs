//! The accept loop over TLS on 127.0.0.1, with a one-route router in place
//! of the API: the handshake is bounded by the read timeout, the connection
//! cap still answers 503 (over TLS), and plain HTTP gets no answer.

use std::time::{Duration, Instant};

use axum::routing::get;
use rustls::pki_types::ServerName;
use rustls::pki_types::pem::PemObject;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::*;
use crate::tls::TlsMaterial;

/// Serves a router answering `GET /` with `ok` over TLS; returns the port.
async fn start(material: &TlsMaterial, limits: ApiLimits) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let router = Router::new().route("/", get(|| async { "ok" }));
    let tls = material.http_server_config().expect("server config");
    tokio::spawn(serve(
        listener,
        router,
        limits,
        Some(tls),
        std::future::pending(),
    ));
    port
}

/// A TLS client of 127.0.0.1:`port` trusting `material`'s CA.
async fn connect_tls(
    material: &TlsMaterial,
    port: u16,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_slice_iter(material.ca_pem.as_bytes()) {
        roots.add(cert.expect("ca")).expect("root");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = TcpStream::connect(("127.0.0.1", port)).await?;
    let name = ServerName::try_from("127.0.0.1").expect("name");
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
}

/// Everything until the server closes (or 10 s pass).
async fn read_all(mut stream: impl AsyncRead + Unpin) -> String {
    let mut raw = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut raw)).await;
    String::from_utf8_lossy(&raw).into_owned()
}

const GET: &[u8] = b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";

#[tokio::test]
async fn tls_clients_are_served_and_plain_http_gets_no_answer() {
    let material = crate::tls::test_material();
    let port = start(&material, ApiLimits::default()).await;

    let mut client = connect_tls(&material, port).await.expect("handshake");
    client.write_all(GET).await.expect("send");
    let answer = read_all(client).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.ends_with("ok"), "{answer}");

    let mut plain = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    plain.write_all(GET).await.expect("send");
    let answer = read_all(plain).await;
    assert!(
        !answer.starts_with("HTTP/"),
        "plain HTTP was answered: {answer}"
    );

    // A client that does not trust the CA refuses the server itself.
    let stranger = crate::tls::test_material();
    assert!(connect_tls(&stranger, port).await.is_err());
}

#[tokio::test]
async fn a_handshake_that_never_comes_is_cut_at_the_read_timeout_and_the_cap_holds() {
    let material = crate::tls::test_material();
    let limits = ApiLimits {
        max_connections: 2,
        read_timeout_ms: 1_500,
        max_tokenizing: 1,
    };
    let port = start(&material, limits).await;

    // Silent connections hold both slots: the next client, over TLS, is
    // told 503 too_many_connections.
    let silent = [
        TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("connect"),
        TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("connect"),
    ];
    tokio::time::sleep(Duration::from_millis(200)).await;
    let refused = connect_tls(&material, port).await.expect("handshake");
    let answer = read_all(refused).await;
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains("too_many_connections"), "{answer}");

    // Neither silent client ever sends a ClientHello: each is closed once
    // the read timeout passes, which frees the slots.
    let started = Instant::now();
    for stream in silent {
        let rest = read_all(stream).await;
        assert!(rest.is_empty(), "{rest}");
    }
    let waited = started.elapsed();
    assert!(
        waited < Duration::from_secs(10),
        "the silent handshakes were never cut off ({waited:?})"
    );
    let mut client = connect_tls(&material, port).await.expect("handshake");
    client.write_all(GET).await.expect("send");
    let answer = read_all(client).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}
