//! Peer transport tests: real TCP sockets on 127.0.0.1, in-process.

use std::io::Write;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::handshake::{self, Hello, Role, PROOF_BYTES, TAG_PROOF, TAG_REFUSAL};
use super::*;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum TestRequest {
    Echo(String),
    /// Answers `Doubled(2 * value)` after `millis`.
    Slow {
        millis: u64,
        value: u64,
    },
    /// Never answers.
    Never,
    /// Answers with the identity the caller proved.
    Who,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum TestResponse {
    Echo(String),
    Doubled(u64),
    From(String),
}

/// Counts the requests a listener runs at once.
#[derive(Default)]
struct Counters {
    handled: AtomicUsize,
    running: AtomicUsize,
    most_running: AtomicUsize,
}

struct TestHandler(Arc<Counters>);

impl PeerHandler<TestRequest, TestResponse> for TestHandler {
    async fn handle(&self, from: HostAddr, request: TestRequest) -> TestResponse {
        let counters = &self.0;
        counters.handled.fetch_add(1, Ordering::SeqCst);
        let running = counters.running.fetch_add(1, Ordering::SeqCst) + 1;
        counters.most_running.fetch_max(running, Ordering::SeqCst);
        let response = match request {
            TestRequest::Echo(text) => TestResponse::Echo(text),
            TestRequest::Slow { millis, value } => {
                tokio::time::sleep(Duration::from_millis(millis)).await;
                TestResponse::Doubled(2 * value)
            }
            TestRequest::Never => std::future::pending().await,
            TestRequest::Who => TestResponse::From(from.to_string()),
        };
        counters.running.fetch_sub(1, Ordering::SeqCst);
        response
    }
}

type Pool = PeerPool<TestRequest, TestResponse>;

fn secret(byte: u8) -> ClusterSecret {
    ClusterSecret::new(&[byte; 32]).unwrap()
}

fn host(name: &str) -> HostAddr {
    HostAddr::new(name).unwrap()
}

fn config(identity: &str, secret_byte: u8) -> PeerConfig {
    PeerConfig::new(host(identity), secret(secret_byte))
}

const LOOPBACK: &str = "127.0.0.1:0";

async fn listen_with(config: PeerConfig, address: SocketAddr) -> (PeerListener, Arc<Counters>) {
    let counters = Arc::new(Counters::default());
    let listener = PeerListener::bind(address, config, TestHandler(Arc::clone(&counters)))
        .await
        .unwrap();
    (listener, counters)
}

async fn listen(secret_byte: u8) -> (PeerListener, Arc<Counters>) {
    listen_with(config("server:1", secret_byte), LOOPBACK.parse().unwrap()).await
}

fn address_of(listener: &PeerListener) -> HostAddr {
    HostAddr::from(listener.local_addr())
}

/// Waits until `condition` holds, for at most `limit`.
async fn eventually(limit: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if condition() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    condition()
}

/// Reads until the peer closes (or fails) the connection, for at most `limit`; returns
/// what was read, or `None` if the connection stayed open.
async fn read_until_closed(stream: &mut TcpStream, limit: Duration) -> Option<Vec<u8>> {
    let mut bytes = Vec::new();
    let reading = async {
        let mut chunk = [0; 1024];
        loop {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(read) => bytes.extend_from_slice(&chunk[..read]),
            }
        }
    };
    tokio::time::timeout(limit, reading).await.ok()?;
    Some(bytes)
}

/// Log lines written while it is the thread's default subscriber (tests run on one
/// thread, so every task's events land here).
#[derive(Clone, Default)]
struct CapturedLogs(Arc<Mutex<Vec<u8>>>);

impl CapturedLogs {
    fn start() -> (CapturedLogs, tracing::subscriber::DefaultGuard) {
        let logs = CapturedLogs::default();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(logs.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .finish();
        let guard = tracing::subscriber::set_default(subscriber);
        (logs, guard)
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }

    /// Whether one WARN line holds every one of `parts`.
    fn has_warning(&self, parts: &[&str]) -> bool {
        self.text()
            .lines()
            .any(|line| line.contains("WARN") && parts.iter().all(|part| line.contains(part)))
    }
}

impl Write for CapturedLogs {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for CapturedLogs {
    type Writer = CapturedLogs;

    fn make_writer(&'a self) -> CapturedLogs {
        self.clone()
    }
}

#[test]
fn secrets_must_be_long_enough_and_never_print() {
    assert_eq!(
        ClusterSecret::new(b"").unwrap_err(),
        SecretTooShort { length: 0 }
    );
    assert!(ClusterSecret::new(&[1; MIN_SECRET_BYTES - 1]).is_err());
    let secret = ClusterSecret::new(b"correct horse battery").unwrap();
    assert!(!format!("{secret:?}").contains("horse"));
}

#[test]
fn host_addresses_are_short_printable_ascii() {
    assert_eq!(host("10.0.0.1:7001").as_str(), "10.0.0.1:7001");
    assert!(HostAddr::new("").is_err());
    assert!(HostAddr::new("a b:1").is_err());
    assert!(HostAddr::new("hôte:1").is_err());
    assert!(HostAddr::new(&"a".repeat(MAX_HOST_ADDR_BYTES)).is_ok());
    assert!(HostAddr::new(&"a".repeat(MAX_HOST_ADDR_BYTES + 1)).is_err());
    let address: SocketAddr = "[::1]:7001".parse().unwrap();
    assert_eq!(HostAddr::from(address).as_str(), "[::1]:7001");
}

#[test]
fn backoff_doubles_up_to_its_cap() {
    let mut backoff = RECONNECT_MIN;
    let mut waits = vec![backoff];
    for _ in 0..7 {
        backoff = next_backoff(backoff);
        waits.push(backoff);
    }
    let millis: Vec<u128> = waits.iter().map(Duration::as_millis).collect();
    assert_eq!(millis, [50, 100, 200, 400, 800, 1600, 2000, 2000]);
}

#[tokio::test]
async fn a_call_round_trips() {
    let (listener, counters) = listen(1).await;
    let server = address_of(&listener);
    let pool = Pool::new(config("client:9", 1));
    let echoed = pool
        .call(
            &server,
            TestRequest::Echo("hello".into()),
            DEFAULT_REQUEST_TIMEOUT,
        )
        .await;
    assert_eq!(echoed, Ok(TestResponse::Echo("hello".into())));
    let who = pool
        .call(&server, TestRequest::Who, DEFAULT_REQUEST_TIMEOUT)
        .await;
    assert_eq!(who, Ok(TestResponse::From("client:9".into())));
    assert!(pool.is_connected(&server));
    assert_eq!(counters.handled.load(Ordering::SeqCst), 2);
    assert_eq!(listener.open_connections(), 1);
}

#[tokio::test]
async fn a_thousand_concurrent_calls_share_one_connection() {
    let (listener, counters) = listen(1).await;
    let server = address_of(&listener);
    let pool = Pool::new(config("client:9", 1));
    let started = Instant::now();
    let mut calls = tokio::task::JoinSet::new();
    for value in 0..1000u64 {
        let (pool, server) = (pool.clone(), server.clone());
        calls.spawn(async move {
            let request = TestRequest::Slow { millis: 50, value };
            let response = pool.call(&server, request, Duration::from_secs(20)).await;
            (value, response)
        });
    }
    let mut answered = 0;
    while let Some(joined) = calls.join_next().await {
        let (value, response) = joined.unwrap();
        assert_eq!(response, Ok(TestResponse::Doubled(2 * value)));
        answered += 1;
    }
    assert_eq!(answered, 1000);
    assert_eq!(listener.open_connections(), 1);
    let most_running = counters.most_running.load(Ordering::SeqCst);
    assert!(
        most_running >= 100,
        "only {most_running} requests ran at once"
    );
    // One after the other, they would take 50 s.
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[tokio::test]
async fn calls_and_answers_beyond_one_write_batch_all_arrive() {
    let (listener, _) = listen(1).await;
    let server = address_of(&listener);
    let pool = Pool::new(config("client:9", 1));
    // 64 calls of 100 KiB each: several full write batches each way.
    let mut calls = tokio::task::JoinSet::new();
    for n in 0..64u8 {
        let (pool, server) = (pool.clone(), server.clone());
        calls.spawn(async move {
            let text = char::from(b'a' + n % 26).to_string().repeat(100 * 1024);
            let response = pool
                .call(
                    &server,
                    TestRequest::Echo(text.clone()),
                    Duration::from_secs(10),
                )
                .await;
            (text, response)
        });
    }
    let mut answered = 0;
    while let Some(joined) = calls.join_next().await {
        let (text, response) = joined.unwrap();
        assert_eq!(response, Ok(TestResponse::Echo(text)));
        answered += 1;
    }
    assert_eq!(answered, 64);
    const { assert!(MAX_WRITE_BATCH_BYTES < 64 * 100 * 1024) };
}

#[tokio::test]
async fn calls_past_the_in_flight_limit_wait_for_a_slot() {
    let mut server_config = config("server:1", 1);
    server_config.max_in_flight = 4;
    let (listener, counters) = listen_with(server_config, LOOPBACK.parse().unwrap()).await;
    let server = address_of(&listener);
    let mut client_config = config("client:9", 1);
    client_config.max_in_flight = 4;
    let pool = Pool::new(client_config);
    let mut calls = tokio::task::JoinSet::new();
    for value in 0..40u64 {
        let (pool, server) = (pool.clone(), server.clone());
        calls.spawn(async move {
            let request = TestRequest::Slow { millis: 10, value };
            pool.call(&server, request, Duration::from_secs(20)).await
        });
    }
    while let Some(joined) = calls.join_next().await {
        assert!(matches!(joined.unwrap(), Ok(TestResponse::Doubled(_))));
    }
    assert_eq!(counters.handled.load(Ordering::SeqCst), 40);
    assert!(counters.most_running.load(Ordering::SeqCst) <= 4);
}

#[tokio::test]
async fn a_wrong_secret_is_refused_on_both_sides() {
    let (logs, _guard) = CapturedLogs::start();
    let (listener, counters) = listen(1).await;
    let server = address_of(&listener);
    let pool = Pool::new(config("intruder:9", 2));
    let refused = pool
        .call(&server, TestRequest::Who, DEFAULT_REQUEST_TIMEOUT)
        .await;
    assert_eq!(
        refused,
        Err(PeerError::Refused {
            peer: server.clone(),
            reason: RefusalReason::WrongSecret
        })
    );
    assert_eq!(
        refused.unwrap_err().to_string(),
        format!("connection to peer {server} refused: wrong cluster secret")
    );
    // The listener logged the refusal with the dialer's address and the reason.
    assert!(
        eventually(Duration::from_secs(2), || logs.has_warning(&[
            "refused a peer connection",
            "remote=127.0.0.1:",
            "reason=wrong cluster secret"
        ]))
        .await,
        "{}",
        logs.text()
    );
    // The dialer logged it too, with the peer's address.
    assert!(logs.has_warning(&[&server.to_string(), "wrong cluster secret"]));
    // While the link waits to retry, calls fail at once with the same reason.
    let again = pool
        .call(&server, TestRequest::Who, DEFAULT_REQUEST_TIMEOUT)
        .await;
    assert!(matches!(
        again,
        Err(PeerError::Refused {
            reason: RefusalReason::WrongSecret,
            ..
        })
    ));
    assert_eq!(counters.handled.load(Ordering::SeqCst), 0);
    assert!(!pool.is_connected(&server));
}

#[tokio::test]
async fn a_dialer_refuses_an_acceptor_without_the_secret() {
    let (logs, _guard) = CapturedLogs::start();
    let fake = TcpListener::bind(LOOPBACK).await.unwrap();
    let server = HostAddr::from(fake.local_addr().unwrap());
    let impostor = tokio::spawn(async move {
        let (mut stream, _) = fake.accept().await.unwrap();
        let hello = Hello::new(Role::Acceptor, host("impostor:1")).unwrap();
        stream.write_all(&hello.encode()).await.unwrap();
        handshake::read_hello(&mut stream, Role::Dialer)
            .await
            .unwrap();
        let mut their_proof = [0; 1 + PROOF_BYTES];
        stream.read_exact(&mut their_proof).await.unwrap();
        let mut forged = [0x5a; 1 + PROOF_BYTES];
        forged[0] = TAG_PROOF;
        stream.write_all(&forged).await.unwrap();
        read_until_closed(&mut stream, Duration::from_secs(5)).await
    });
    let pool = Pool::new(config("client:9", 1));
    let refused = pool
        .call(&server, TestRequest::Who, DEFAULT_REQUEST_TIMEOUT)
        .await;
    assert_eq!(
        refused,
        Err(PeerError::Refused {
            peer: server.clone(),
            reason: RefusalReason::WrongSecret
        })
    );
    // The dialer told the impostor why and closed, before sending any request.
    assert_eq!(
        impostor.await.unwrap(),
        Some(vec![TAG_REFUSAL, RefusalReason::WrongSecret.code()])
    );
    assert!(logs.has_warning(&[&server.to_string(), "wrong cluster secret"]));
}

#[tokio::test]
async fn a_listener_refuses_another_protocol_version() {
    let (logs, _guard) = CapturedLogs::start();
    let (listener, counters) = listen(1).await;
    let mut stream = TcpStream::connect(listener.local_addr()).await.unwrap();
    let mut hello = Hello::new(Role::Dialer, host("future:1")).unwrap();
    hello.version = PROTOCOL_VERSION + 1;
    stream.write_all(&hello.encode()).await.unwrap();
    handshake::read_hello(&mut stream, Role::Acceptor)
        .await
        .unwrap();
    let rest = read_until_closed(&mut stream, Duration::from_secs(5)).await;
    assert_eq!(
        rest,
        Some(vec![TAG_REFUSAL, RefusalReason::VersionMismatch.code()])
    );
    assert!(logs.has_warning(&["remote=127.0.0.1:", "reason=protocol version mismatch"]));
    assert_eq!(counters.handled.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn a_dialer_refuses_another_protocol_version() {
    let (logs, _guard) = CapturedLogs::start();
    let fake = TcpListener::bind(LOOPBACK).await.unwrap();
    let server = HostAddr::from(fake.local_addr().unwrap());
    let future_peer = tokio::spawn(async move {
        let (mut stream, _) = fake.accept().await.unwrap();
        let mut hello = Hello::new(Role::Acceptor, host("future:1")).unwrap();
        hello.version = PROTOCOL_VERSION + 1;
        stream.write_all(&hello.encode()).await.unwrap();
        // What the dialer sends: its hello, then its refusal.
        read_until_closed(&mut stream, Duration::from_secs(5)).await
    });
    let pool = Pool::new(config("client:9", 1));
    let refused = pool
        .call(&server, TestRequest::Who, DEFAULT_REQUEST_TIMEOUT)
        .await;
    assert_eq!(
        refused,
        Err(PeerError::Refused {
            peer: server.clone(),
            reason: RefusalReason::VersionMismatch
        })
    );
    let sent = future_peer.await.unwrap().unwrap();
    assert!(sent.ends_with(&[TAG_REFUSAL, RefusalReason::VersionMismatch.code()]));
    let dialer_hello = Hello::decode(&sent[..sent.len() - 2]).unwrap();
    assert_eq!(dialer_hello.identity, host("client:9"));
    assert!(logs.has_warning(&[&server.to_string(), "protocol version mismatch"]));
}

#[tokio::test]
async fn a_call_that_gets_no_answer_times_out_and_spares_the_others() {
    let (listener, _) = listen(1).await;
    let server = address_of(&listener);
    let pool = Pool::new(config("client:9", 1));
    let timeout = Duration::from_millis(200);
    let started = Instant::now();
    let never = pool.call(&server, TestRequest::Never, timeout).await;
    let waited = started.elapsed();
    assert_eq!(
        never,
        Err(PeerError::Timeout {
            peer: server.clone(),
            timeout_ms: 200
        })
    );
    assert!(
        waited >= timeout && waited < Duration::from_secs(1),
        "{waited:?}"
    );
    // The connection is still good for other calls.
    let echoed = pool
        .call(&server, TestRequest::Echo("still here".into()), timeout)
        .await;
    assert_eq!(echoed, Ok(TestResponse::Echo("still here".into())));
    assert_eq!(listener.open_connections(), 1);
}

#[tokio::test]
async fn the_pool_reconnects_when_the_server_comes_back() {
    let (listener, _) = listen(1).await;
    let address = listener.local_addr();
    let server = HostAddr::from(address);
    let pool = Pool::new(config("client:9", 1));
    let echo = || TestRequest::Echo("ping".into());
    let first = pool.call(&server, echo(), DEFAULT_REQUEST_TIMEOUT).await;
    assert_eq!(first, Ok(TestResponse::Echo("ping".into())));

    drop(listener);
    assert!(eventually(Duration::from_secs(5), || !pool.is_connected(&server)).await);
    // While the server is down, calls fail fast instead of waiting out their timeout.
    let started = Instant::now();
    let down = pool.call(&server, echo(), Duration::from_secs(5)).await;
    assert!(
        matches!(down, Err(PeerError::Unreachable { .. })),
        "{down:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(1));

    // Same port again (the old listening socket closes once its task is gone).
    let deadline = Instant::now() + Duration::from_secs(5);
    let (_listener, _) = loop {
        match PeerListener::bind(address, config("server:1", 1), TestHandler(Arc::default())).await
        {
            Ok(listener) => break (listener, ()),
            Err(error) if Instant::now() < deadline => {
                assert_eq!(error.kind(), std::io::ErrorKind::AddrInUse);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(error) => panic!("cannot bind {address} again: {error}"),
        }
    };
    // The pool reconnects by itself; no call is needed to trigger it.
    assert!(
        eventually(RECONNECT_MAX + Duration::from_secs(3), || pool
            .is_connected(&server))
        .await
    );
    let again = pool.call(&server, echo(), DEFAULT_REQUEST_TIMEOUT).await;
    assert_eq!(again, Ok(TestResponse::Echo("ping".into())));
}

#[tokio::test]
async fn an_unreachable_peer_fails_fast() {
    let vacant = TcpListener::bind(LOOPBACK).await.unwrap();
    let server = HostAddr::from(vacant.local_addr().unwrap());
    drop(vacant);
    let pool = Pool::new(config("client:9", 1));
    let started = Instant::now();
    let result = pool
        .call(&server, TestRequest::Who, Duration::from_secs(5))
        .await;
    assert!(
        matches!(result, Err(PeerError::Unreachable { .. })),
        "{result:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(1));
    // Attempts at about 0, 50, 150 and 350 ms; the next one waits until about 750 ms.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let started = Instant::now();
    let result = pool
        .call(&server, TestRequest::Who, Duration::from_secs(5))
        .await;
    assert!(
        matches!(result, Err(PeerError::Unreachable { .. })),
        "{result:?}"
    );
    // A call between attempts fails at once with the last attempt's reason.
    assert!(
        started.elapsed() < Duration::from_millis(150),
        "{:?}",
        started.elapsed()
    );
}

/// Connects to `listener` and completes the handshake as a peer with the secret.
async fn authenticated_stream(listener: &PeerListener, identity: &str) -> TcpStream {
    let mut stream = TcpStream::connect(listener.local_addr()).await.unwrap();
    let proved = handshake::dial(&mut stream, &config(identity, 1))
        .await
        .unwrap();
    assert_eq!(proved, host("server:1"));
    stream
}

#[tokio::test]
async fn a_bad_frame_closes_only_its_own_connection() {
    let (logs, _guard) = CapturedLogs::start();
    let (listener, _) = listen(1).await;
    let server = address_of(&listener);
    let pool = Pool::new(config("client:9", 1));
    let echo = || TestRequest::Echo("fine".into());
    let fine = Ok(TestResponse::Echo("fine".into()));
    assert_eq!(
        pool.call(&server, echo(), DEFAULT_REQUEST_TIMEOUT).await,
        fine
    );

    let mut lying_vector = vec![0, 0, 0, 0, 0, 0, 0];
    // Call { id: 0, request: Echo(a string that claims 2^32 bytes) }.
    lying_vector.extend_from_slice(&[0xfc, 0xff, 0xff, 0xff, 0xff]);
    let length = (lying_vector.len() - 4) as u32;
    lying_vector[..4].copy_from_slice(&length.to_be_bytes());
    let bad_frames: [&[u8]; 3] = [
        // Declares more than MAX_PEER_FRAME_BYTES.
        &[0xff, 0xff, 0xff, 0xff, 1, 2, 3],
        // Three bytes that decode to nothing.
        &[0, 0, 0, 3, 0xff, 0xff, 0xff],
        &lying_vector,
    ];
    for (index, frame) in bad_frames.into_iter().enumerate() {
        let mut stream = authenticated_stream(&listener, &format!("rogue:{index}")).await;
        stream.write_all(frame).await.unwrap();
        let rest = read_until_closed(&mut stream, Duration::from_secs(5)).await;
        assert_eq!(
            rest,
            Some(Vec::new()),
            "frame {index} left the connection open"
        );
        // The good connection goes on.
        assert_eq!(
            pool.call(&server, echo(), DEFAULT_REQUEST_TIMEOUT).await,
            fine
        );
    }
    assert!(eventually(Duration::from_secs(2), || listener.open_connections() == 1).await);
    assert!(pool.is_connected(&server));
    assert!(logs.has_warning(&[
        "closed a peer connection",
        "peer=rogue:0",
        "malformed frame"
    ]));
}

#[tokio::test]
async fn a_bad_frame_from_the_acceptor_fails_the_calls_on_that_connection_only() {
    let (listener, _) = listen(1).await;
    let good = address_of(&listener);
    let fake = TcpListener::bind(LOOPBACK).await.unwrap();
    let bad = HostAddr::from(fake.local_addr().unwrap());
    tokio::spawn(async move {
        let (mut stream, _) = fake.accept().await.unwrap();
        handshake::accept(&mut stream, &config("bad:1", 1))
            .await
            .unwrap();
        let mut request = [0; 4];
        stream.read_exact(&mut request).await.unwrap();
        stream.write_all(&[0, 0, 0, 2, 0xff, 0xff]).await.unwrap();
        read_until_closed(&mut stream, Duration::from_secs(5)).await
    });
    let pool = Pool::new(config("client:9", 1));
    let started = Instant::now();
    let failed = pool
        .call(&bad, TestRequest::Who, Duration::from_secs(5))
        .await;
    assert!(
        matches!(&failed, Err(PeerError::Protocol { peer, .. }) if *peer == bad),
        "{failed:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(1));
    let who = pool
        .call(&good, TestRequest::Who, DEFAULT_REQUEST_TIMEOUT)
        .await;
    assert_eq!(who, Ok(TestResponse::From("client:9".into())));
}

#[tokio::test]
async fn a_connection_that_sends_nothing_is_dropped_after_the_handshake_timeout() {
    let (logs, _guard) = CapturedLogs::start();
    let mut server_config = config("server:1", 1);
    server_config.handshake_timeout = Duration::from_millis(300);
    let (listener, _) = listen_with(server_config, LOOPBACK.parse().unwrap()).await;
    let started = Instant::now();
    let mut silent = TcpStream::connect(listener.local_addr()).await.unwrap();
    let received = read_until_closed(&mut silent, Duration::from_secs(5))
        .await
        .expect("the listener kept a silent connection");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(300) && waited < Duration::from_secs(3),
        "{waited:?}"
    );
    // The listener's hello, then the refusal.
    let (hello, refusal) = received.split_at(received.len() - 2);
    assert_eq!(Hello::decode(hello).unwrap().identity, host("server:1"));
    assert_eq!(
        refusal,
        [TAG_REFUSAL, RefusalReason::HandshakeTimeout.code()]
    );
    assert!(logs.has_warning(&["remote=127.0.0.1:", "reason=handshake timeout"]));
    assert!(eventually(Duration::from_secs(2), || listener.open_connections() == 0).await);
}

#[tokio::test]
async fn a_listener_drops_an_authenticated_peer_that_goes_silent() {
    let mut server_config = config("server:1", 1);
    server_config.liveness_timeout = Duration::from_millis(300);
    let (listener, _) = listen_with(server_config, LOOPBACK.parse().unwrap()).await;
    let mut silent = authenticated_stream(&listener, "silent:1").await;
    let started = Instant::now();
    let rest = read_until_closed(&mut silent, Duration::from_secs(5)).await;
    assert_eq!(rest, Some(Vec::new()));
    assert!(started.elapsed() >= Duration::from_millis(300));
}

#[tokio::test]
async fn a_pool_drops_an_acceptor_that_stops_answering() {
    let fake = TcpListener::bind(LOOPBACK).await.unwrap();
    let server = HostAddr::from(fake.local_addr().unwrap());
    tokio::spawn(async move {
        let (mut stream, _) = fake.accept().await.unwrap();
        handshake::accept(&mut stream, &config("mute:1", 1))
            .await
            .unwrap();
        // Reads everything, answers nothing (not even pings).
        read_until_closed(&mut stream, Duration::from_secs(10)).await
    });
    let mut client_config = config("client:9", 1);
    client_config.liveness_timeout = Duration::from_millis(300);
    let pool = Pool::new(client_config);
    let started = Instant::now();
    let lost = pool
        .call(&server, TestRequest::Who, Duration::from_secs(5))
        .await;
    assert_eq!(lost, Err(PeerError::ConnectionLost { peer: server }));
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(300) && waited < Duration::from_secs(2),
        "{waited:?}"
    );
}
