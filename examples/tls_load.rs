//! The handshake client of `MODE=tls scripts/bench.sh`: CONCURRENCY loops, each opening a
//! TCP connection, making a TLS handshake, sending one `GET PATH` with `Connection: close`,
//! reading the answer to its end and closing, for SECONDS. With `resume` each loop keeps the
//! session the server gave it and offers it on its next connection (TLS 1.3 tickets, TLS
//! 1.2 session IDs), as a browser coming back does; with `full` it never does. rustls says
//! which kind each handshake was, so the run proves the servers resumed, or did not.
//!
//!   tls_load ADDR SNI CA_FILE PATH CONCURRENCY SECONDS full|resume
//!
//! Prints one `key=value` line: connections, handshakes/s, how many were resumed, errors.
//! Both proxies get the same client, certificate and request. Every wait is bounded.

// A benchmark run by the script: a failed setup step should stop it loudly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rustls::client::Resumption;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// Longest wait for one connection: connect, handshake, answer.
const CONNECTION_DEADLINE: Duration = Duration::from_secs(10);

#[derive(Default)]
struct Counts {
    connections: AtomicU64,
    resumed: AtomicU64,
    errors: AtomicU64,
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() != 7 {
        eprintln!("usage: tls_load ADDR SNI CA_FILE PATH CONCURRENCY SECONDS full|resume");
        return ExitCode::FAILURE;
    }
    let addr: SocketAddr = args[0].parse().expect("ADDR: ip:port");
    let sni = ServerName::try_from(args[1].clone()).expect("SNI: a DNS name");
    let path = args[3].clone();
    let concurrency: usize = args[4].parse().expect("CONCURRENCY");
    let seconds: u64 = args[5].parse().expect("SECONDS");
    let resume = match args[6].as_str() {
        "full" => false,
        "resume" => true,
        other => panic!("full or resume, not {other}"),
    };
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(&args[2]).expect("CA_FILE") {
        roots
            .add(cert.expect("CA_FILE: a PEM certificate"))
            .unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let counts = Arc::new(Counts::default());
    let start = Instant::now();
    let end = start + Duration::from_secs(seconds);
    rt.block_on(async {
        let mut loops = Vec::new();
        for _ in 0..concurrency {
            // A session store per loop: each is one returning client.
            let mut config = config.clone();
            config.resumption = if resume {
                Resumption::in_memory_sessions(4)
            } else {
                Resumption::disabled()
            };
            let connector = TlsConnector::from(Arc::new(config));
            let (sni, path, counts) = (sni.clone(), path.clone(), counts.clone());
            loops.push(tokio::spawn(async move {
                while Instant::now() < end {
                    let one = once(&connector, addr, sni.clone(), &path);
                    match tokio::time::timeout(CONNECTION_DEADLINE, one).await {
                        Ok(Ok(resumed)) => {
                            counts.connections.fetch_add(1, Ordering::Relaxed);
                            if resumed {
                                counts.resumed.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        Ok(Err(e)) => {
                            if counts.errors.fetch_add(1, Ordering::Relaxed) < 5 {
                                eprintln!("tls_load: {e}");
                            }
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                        Err(_) => {
                            counts.errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }));
        }
        for l in loops {
            l.await.unwrap();
        }
    });
    let secs = start.elapsed().as_secs_f64();
    let n = counts.connections.load(Ordering::Relaxed);
    println!(
        "connections={n} secs={secs:.2} per_s={:.0} resumed={} errors={}",
        n as f64 / secs,
        counts.resumed.load(Ordering::Relaxed),
        counts.errors.load(Ordering::Relaxed),
    );
    ExitCode::SUCCESS
}

/// One connection: handshake, one request, the whole answer. Returns whether the handshake
/// resumed a session.
async fn once(
    connector: &TlsConnector,
    addr: SocketAddr,
    sni: ServerName<'static>,
    path: &str,
) -> Result<bool, String> {
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let _ = tcp.set_nodelay(true);
    let mut tls = connector
        .connect(sni, tcp)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let resumed = tls.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
    let request = format!("GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n");
    tls.write_all(request.as_bytes())
        .await
        .map_err(|e| format!("write: {e}"))?;
    let mut answer = Vec::with_capacity(1024);
    // Until the server closes: `Connection: close` asked for it. A server that closes
    // without close_notify is fine here (rustls reports it as an error after the bytes).
    let _ = tls.read_to_end(&mut answer).await;
    if !answer.starts_with(b"HTTP/1.1 200") {
        return Err(format!(
            "answer: {:?}",
            String::from_utf8_lossy(&answer[..answer.len().min(64)])
        ));
    }
    Ok(resumed)
}
