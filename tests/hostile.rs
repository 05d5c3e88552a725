//! Hostile and careless clients never hurt the others, and never make the net-daemon's
//! memory grow without bound: a crowd of 10,000 idle connections, slowloris clients
//! that trickle requests a byte at a time or stop halfway, clients that never read
//! their replies, and malformed lengths or nesting. Each test measures the latency of a
//! normal client and the net-daemon's resident memory (VmRSS from /proc) alongside.
//!
//! The tests run one at a time (they share the machine's cores and the test process's
//! open-file limit) and finish in seconds. `SHOAL_LONG_TESTS=1` scales their counts and
//! durations up.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::sleep;
use std::time::{Duration, Instant};

use common::{encode_command, poll_until, RawConn, Resp, Server};

/// The tests of this file run one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// 1 normally; larger with `SHOAL_LONG_TESTS=1` (or a number: the factor itself).
fn scale() -> usize {
    match common::env_count("SHOAL_LONG_TESTS", 0) {
        0 if common::long_tests() => 5,
        0 => 1,
        1 => 5,
        factor => factor as usize,
    }
}

/// Every p99 a normal client sees must stay under this, crowd or not.
const P99_BOUND: Duration = Duration::from_millis(50);

// ---------------------------------------------------------------- measuring

/// Sets the soft open-file limit of this process (children inherit it).
fn set_soft_fd_limit(soft: Option<u64>) -> (u64, u64) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read or write only the struct we pass.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
        let wanted = libc::rlimit {
            rlim_cur: soft.unwrap_or(limit.rlim_max).min(limit.rlim_max),
            rlim_max: limit.rlim_max,
        };
        assert_eq!(
            libc::setrlimit(libc::RLIMIT_NOFILE, &wanted),
            0,
            "setrlimit({wanted:?}): {}",
            std::io::Error::last_os_error()
        );
        (wanted.rlim_cur, wanted.rlim_max)
    }
}

/// A field of /proc/<pid>/status in KiB (VmRSS, RssAnon, ...).
fn proc_status_kib(pid: i32, field: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/status: {e}"));
    text.lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

fn rss_mib(pid: i32) -> f64 {
    proc_status_kib(pid, "VmRSS") as f64 / 1024.0
}

/// The soft "Max open files" of a process.
fn soft_fd_limit_of(pid: i32) -> u64 {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("limits");
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("Max open files");
    line.split_whitespace()
        .nth(3)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("cannot parse {line:?}"))
}

fn net_daemon_pid(server: &Server) -> i32 {
    let process = server.process_status("net-daemon", 0);
    process["pid"].as_i64().expect("net-daemon pid") as i32
}

/// Latency percentiles of a normal client.
#[derive(Debug, Clone, Copy)]
struct Latency {
    p50: Duration,
    p99: Duration,
    max: Duration,
}

impl std::fmt::Display for Latency {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms",
            self.p50.as_secs_f64() * 1e3,
            self.p99.as_secs_f64() * 1e3,
            self.max.as_secs_f64() * 1e3
        )
    }
}

/// `ops` round trips of PING, SET and GET (in turn) on a fresh connection; checks every
/// reply and returns the latency percentiles.
fn normal_client_latency(server: &Server, ops: usize, tag: &str) -> Latency {
    let mut conn = server.raw();
    let mut samples = Vec::with_capacity(ops);
    for i in 0..ops {
        let key = format!("normal:{tag}:{}", i % 100);
        let started = Instant::now();
        match i % 3 {
            0 => assert_eq!(conn.cmd(&["PING"]), Resp::Simple("PONG".into())),
            1 => assert_eq!(
                conn.cmd(&["SET", &key, &i.to_string()]),
                Resp::Simple("OK".into())
            ),
            _ => assert!(
                matches!(conn.cmd(&["GET", &key]), Resp::Bulk(_) | Resp::NilBulk),
                "GET {key}"
            ),
        }
        samples.push(started.elapsed());
    }
    samples.sort();
    let at = |q: f64| samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)];
    Latency {
        p50: at(0.50),
        p99: at(0.99),
        max: *samples.last().expect("samples"),
    }
}

/// Samples a process's VmRSS every 20 ms on a thread until dropped; reports the peak.
struct RssSampler {
    stop: Arc<AtomicBool>,
    peak_kib: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RssSampler {
    fn start(pid: i32) -> RssSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let peak_kib = Arc::new(AtomicU64::new(proc_status_kib(pid, "VmRSS")));
        let thread = {
            let (stop, peak_kib) = (Arc::clone(&stop), Arc::clone(&peak_kib));
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/status")) {
                        if let Some(kib) = text
                            .lines()
                            .find_map(|l| l.strip_prefix("VmRSS:"))
                            .and_then(|r| r.trim().trim_end_matches("kB").trim().parse().ok())
                        {
                            peak_kib.fetch_max(kib, Ordering::Relaxed);
                        }
                    }
                    sleep(Duration::from_millis(20));
                }
            })
        };
        RssSampler {
            stop,
            peak_kib,
            thread: Some(thread),
        }
    }

    fn peak_mib(&self) -> f64 {
        self.peak_kib.load(Ordering::Relaxed) as f64 / 1024.0
    }
}

impl Drop for RssSampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The open client connections the net-daemon reports.
fn connections(server: &Server) -> u64 {
    server.process_status("net-daemon", 0)["connections"]
        .as_u64()
        .unwrap_or(0)
}

/// Waits (bounded) until the net-daemon reports at most `at_most` open client
/// connections; answers the last count.
fn wait_for_connections_at_most(server: &Server, at_most: u64, timeout: Duration) -> u64 {
    let deadline = Instant::now() + timeout;
    loop {
        let open = connections(server);
        if open <= at_most || Instant::now() >= deadline {
            return open;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits (bounded) until the net-daemon reports `at_least` open client connections.
fn wait_for_connections(server: &Server, at_least: u64, timeout: Duration) -> u64 {
    let deadline = Instant::now() + timeout;
    loop {
        let open = server.process_status("net-daemon", 0)["connections"]
            .as_u64()
            .unwrap_or(0);
        if open >= at_least || Instant::now() >= deadline {
            return open;
        }
        sleep(Duration::from_millis(100));
    }
}

// ---------------------------------------------------------------- idle crowd

#[test]
fn ten_thousand_idle_connections_keep_latency_and_memory_bounded() {
    let _serial = serial();
    let idle = 10_000;
    // The server starts with a soft limit of 1024 open files: the net-daemon must raise
    // its own limit to serve max_connections. The test's own sockets need the hard limit.
    let (_, hard) = set_soft_fd_limit(None);
    assert!(
        hard >= idle as u64 + 512,
        "the hard open-file limit ({hard}) is too low for {idle} connections; raise it \
         (ulimit -Hn) to run this test"
    );
    set_soft_fd_limit(Some(1024));
    let server = Server::start("[client]\nmax_connections = 10100\n");
    set_soft_fd_limit(None);
    let net_daemon = net_daemon_pid(&server);
    let daemon_fds = soft_fd_limit_of(net_daemon);
    assert!(
        daemon_fds >= 10_100,
        "the net-daemon raised its soft open-file limit from 1024 for max_connections = \
         10100; it is {daemon_fds}"
    );

    let ops = 3000 * scale();
    // Warm up (connections to the workers, allocator), then measure without the crowd.
    normal_client_latency(&server, 300, "warm");
    let alone = normal_client_latency(&server, ops, "alone");
    let rss_before = rss_mib(net_daemon);

    let started = Instant::now();
    // Eight threads connect at once, as a crowd arrives.
    let port = server.port;
    let mut crowd: Vec<TcpStream> = (0..8)
        .map(|t| {
            std::thread::spawn(move || {
                (0..idle / 8)
                    .map(|i| {
                        TcpStream::connect(("127.0.0.1", port))
                            .unwrap_or_else(|e| panic!("idle connection {t}/{i}: {e}"))
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .flat_map(|t| t.join().expect("connecting thread"))
        .collect();
    let connect_time = started.elapsed();
    let open = wait_for_connections(&server, idle as u64, Duration::from_secs(20));
    assert!(
        open >= idle as u64,
        "the net-daemon holds {open} of {idle} idle connections"
    );
    // Nothing was refused: no connection of the crowd has been sent anything.
    for (i, stream) in crowd.iter_mut().enumerate().step_by(97) {
        stream.set_nonblocking(true).expect("nonblocking");
        let mut byte = [0u8; 64];
        match stream.read(&mut byte) {
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            other => panic!("idle connection {i} was sent something or closed: {other:?}"),
        }
        stream.set_nonblocking(false).expect("blocking");
    }
    let rss_crowd = rss_mib(net_daemon);
    let anon_crowd = proc_status_kib(net_daemon, "RssAnon") as f64 / 1024.0;
    let crowded = normal_client_latency(&server, ops, "crowd");

    // Every idle connection still works: a PING on each, then every reply.
    for stream in &mut crowd {
        stream.write_all(b"*1\r\n$4\r\nPING\r\n").expect("PING");
    }
    for (i, stream) in crowd.iter_mut().enumerate() {
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let mut reply = [0u8; 7];
        stream
            .read_exact(&mut reply)
            .unwrap_or_else(|e| panic!("PONG on idle connection {i}: {e}"));
        assert_eq!(&reply, b"+PONG\r\n", "idle connection {i}");
    }
    let rss_after_ping = rss_mib(net_daemon);
    drop(crowd);

    eprintln!(
        "idle crowd: {idle} connections opened in {connect_time:?}; net-daemon soft fd limit \
         {daemon_fds}; VmRSS {rss_before:.1} MiB alone, {rss_crowd:.1} MiB with the crowd \
         (RssAnon {anon_crowd:.1} MiB), {rss_after_ping:.1} MiB after one PING on each; \
         latency alone: {alone}; with the crowd: {crowded}"
    );
    assert!(alone.p99 < P99_BOUND, "latency alone: {alone}");
    assert!(
        crowded.p99 < P99_BOUND,
        "latency with {idle} idle connections: {crowded}"
    );
    // Measured in a debug build: 62-80 MiB for 10,000 idle connections, about 6-8 KiB
    // each (the task and its socket registration; no buffers). 160 MiB (16 KiB each)
    // leaves room for allocator slack and still fails if each idle connection held its
    // read and write buffers (2 x 16 KiB).
    let growth = rss_crowd - rss_before;
    assert!(
        growth < 160.0,
        "10,000 idle connections grew the net-daemon by {growth:.1} MiB \
         ({rss_before:.1} -> {rss_crowd:.1})"
    );
    let growth = rss_after_ping - rss_before;
    assert!(
        growth < 200.0,
        "after one PING on each idle connection the net-daemon grew by {growth:.1} MiB"
    );
}

// ---------------------------------------------------------------- slowloris

#[test]
fn slowloris_and_half_sent_requests_never_block_other_clients() {
    let _serial = serial();
    let server = Server::start("");
    let net_daemon = net_daemon_pid(&server);
    normal_client_latency(&server, 300, "warm");
    let alone = normal_client_latency(&server, 1500, "alone");
    let rss_before = rss_mib(net_daemon);

    // Half-sent requests of every shape: each stops in a different place, and some
    // declare large bulk strings they never send.
    let halves: Vec<Vec<u8>> = vec![
        b"*".to_vec(),
        b"*2".to_vec(),
        b"*2\r\n".to_vec(),
        b"*2\r\n$3\r\nGE".to_vec(),
        b"*2\r\n$3\r\nGET\r\n$".to_vec(),
        b"*2\r\n$3\r\nGET\r\n$5\r\nhal".to_vec(),
        b"*2\r\n$3\r\nGET\r\n$5\r\nhalf1\r".to_vec(),
        b"*3\r\n$3\r\nSET\r\n$4\r\nhalf\r\n$60000000\r\nxxxx".to_vec(),
        b"PIN".to_vec(),
        b"SET half inline".to_vec(),
    ];
    let half_count = 300 * scale();
    let mut half_sent: Vec<(TcpStream, usize)> = (0..half_count)
        .map(|i| {
            let mut stream = TcpStream::connect(("127.0.0.1", server.port)).expect("connect");
            stream.write_all(&halves[i % halves.len()]).expect("half");
            (stream, i % halves.len())
        })
        .collect();

    // Slowloris: each connection trickles a full SET one byte at a time, round-robin,
    // while the normal client measures.
    let trickle_count = 200 * scale();
    let requests: Vec<Vec<u8>> = (0..trickle_count)
        .map(|i| {
            let key = format!("slow:{i}");
            encode_command(&[b"SET", key.as_bytes(), b"trickled-value"])
        })
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let rounds_sent = Arc::new(AtomicU64::new(0));
    let trickler = {
        let (port, stop, rounds_sent) = (server.port, Arc::clone(&stop), Arc::clone(&rounds_sent));
        std::thread::spawn(move || {
            let mut streams: Vec<TcpStream> = (0..requests.len())
                .map(|_| {
                    let stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
                    stream.set_nodelay(true).expect("nodelay");
                    stream
                })
                .collect();
            let longest = requests.iter().map(Vec::len).max().unwrap_or(0);
            // Stop one byte short of the end until the normal client is done.
            let mut sent = 0;
            while sent + 1 < longest && !stop.load(Ordering::Relaxed) {
                for (stream, request) in streams.iter_mut().zip(&requests) {
                    if sent + 1 < request.len() {
                        stream.write_all(&request[sent..sent + 1]).expect("trickle");
                    }
                }
                sent += 1;
                rounds_sent.fetch_add(1, Ordering::Relaxed);
                // The trickle's pace: one byte per connection every 5 ms.
                sleep(Duration::from_millis(5));
            }
            while !stop.load(Ordering::Relaxed) {
                sleep(Duration::from_millis(5));
            }
            (streams, requests)
        })
    };
    // The normal client measures once every trickling connection is open and trickling.
    let expected = (half_count + trickle_count) as u64;
    poll_until(
        "the half-sent and trickling connections to be open and the trickle to begin",
        Duration::from_secs(30),
        Duration::from_millis(100),
        || {
            let open = connections(&server);
            let rounds = rounds_sent.load(Ordering::Relaxed);
            if open >= expected && rounds >= 1 {
                Ok(())
            } else {
                Err(format!(
                    "{open} of {expected} connections open, {rounds} rounds trickled"
                ))
            }
        },
    );
    let during = normal_client_latency(&server, 3000 * scale(), "slowloris");
    let rss_during = rss_mib(net_daemon);
    stop.store(true, Ordering::Relaxed);
    let (mut streams, requests) = trickler.join().expect("trickler");

    // The trickled requests were held, not dropped: their last bytes complete them.
    let mut trickled_ok = 0;
    for (i, (stream, request)) in streams.iter_mut().zip(&requests).enumerate() {
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        stream
            .write_all(&request[request.len() - 1..])
            .expect("last byte");
        let mut reply = [0u8; 5];
        match stream.read_exact(&mut reply) {
            Ok(()) if &reply == b"+OK\r\n" => trickled_ok += 1,
            other => panic!("trickled SET {i}: {other:?} {:?}", reply),
        }
    }
    assert_eq!(
        server.raw().cmd(&["GET", "slow:0"]),
        Resp::Bulk(b"trickled-value".to_vec())
    );

    // The half-sent requests too: completing them gets their replies.
    let rests: Vec<&[u8]> = vec![
        b"1\r\n$4\r\nPING\r\n",
        b"\r\n$4\r\nECHO\r\n$2\r\nhi\r\n",
        b"$4\r\nECHO\r\n$2\r\nhi\r\n",
        b"T\r\n$5\r\nhalf1\r\n",
        b"5\r\nhalf1\r\n",
        b"f1\r\n",
        b"\n",
        b"",
        b"G\r\n",
        b"\r\n",
    ];
    let expected: Vec<&[u8]> = vec![
        b"+PONG\r\n",
        b"$2\r\nhi\r\n",
        b"$2\r\nhi\r\n",
        b"$-1\r\n",
        b"$-1\r\n",
        b"$-1\r\n",
        b"$-1\r\n",
        b"",
        b"+PONG\r\n",
        b"+OK\r\n",
    ];
    // One shape at a time; the inline SETs (shape 9) last, as their reply differs.
    let mut half_ok = 0;
    for shape in [0, 1, 2, 3, 4, 5, 6, 8] {
        for (stream, _) in half_sent.iter_mut().filter(|(_, s)| *s == shape) {
            stream.write_all(rests[shape]).expect("rest");
            stream
                .set_read_timeout(Some(Duration::from_secs(10)))
                .expect("timeout");
            let mut reply = vec![0u8; expected[shape].len()];
            stream
                .read_exact(&mut reply)
                .unwrap_or_else(|e| panic!("half-sent shape {shape}: {e}"));
            assert_eq!(
                reply,
                expected[shape],
                "reply to half-sent shape {shape}: {:?}",
                String::from_utf8_lossy(&reply)
            );
            half_ok += 1;
        }
    }
    for (stream, _) in half_sent.iter_mut().filter(|(_, s)| *s == 9) {
        stream.write_all(rests[9]).expect("rest");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let mut reply = [0u8; 5];
        stream.read_exact(&mut reply).expect("inline SET reply");
        assert_eq!(&reply, b"+OK\r\n");
        half_ok += 1;
    }
    assert_eq!(
        server.raw().cmd(&["GET", "half"]),
        Resp::Bulk(b"inline".to_vec()),
        "the inline SET completed"
    );
    // Shape 7 declared a 60 MB bulk and sent 4 bytes of it: still held, never answered.
    let waiting = half_sent.iter_mut().filter(|(_, s)| *s == 7).count();
    drop(half_sent);
    drop(streams);

    eprintln!(
        "slowloris: {trickle_count} trickling + {half_count} half-sent connections; \
         latency alone: {alone}; during: {during}; net-daemon VmRSS {rss_before:.1} -> \
         {rss_during:.1} MiB; {trickled_ok} trickled and {half_ok} half-sent requests \
         completed, {waiting} still waiting for a 60 MB bulk"
    );
    assert!(alone.p99 < P99_BOUND, "latency alone: {alone}");
    assert!(
        during.p99 < P99_BOUND,
        "latency during the slowloris: {during}"
    );
    // A declared length reserves nothing: memory follows what is actually sent.
    let growth = rss_during - rss_before;
    assert!(
        growth < 64.0,
        "the slowloris grew the net-daemon by {growth:.1} MiB"
    );
}

// ---------------------------------------------------------------- never reading

/// Sends pipelines of GETs of `key` and never reads, until the server closes the
/// connection or `timeout` passes; returns when it was closed (None: never).
fn flood_without_reading(port: u16, key: &str, timeout: Duration) -> Option<Duration> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    // A small receive buffer, as a slow client on a real network has.
    set_receive_buffer(&stream, 64 * 1024);
    stream
        .set_write_timeout(Some(Duration::from_millis(200)))
        .expect("write timeout");
    let pipeline: Vec<u8> = (0..1024)
        .flat_map(|_| encode_command(&[b"GET", key.as_bytes()]))
        .collect();
    let started = Instant::now();
    while started.elapsed() < timeout {
        match stream.write(&pipeline) {
            Ok(_) => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                // Back-pressured: the server stopped reading. Is it still open?
                if closed_by_peer(&stream) {
                    return Some(started.elapsed());
                }
            }
            Err(_) => return Some(started.elapsed()),
        }
    }
    None
}

fn set_receive_buffer(stream: &TcpStream, bytes: i32) {
    use std::os::fd::AsRawFd;
    // SAFETY: setsockopt reads `bytes` for the given length; the fd is open.
    unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&bytes as *const i32).cast(),
            std::mem::size_of::<i32>() as libc::socklen_t,
        );
    }
}

/// Whether the peer has closed (or reset) the connection, without consuming data that
/// matters: the replies are discarded anyway.
fn closed_by_peer(stream: &TcpStream) -> bool {
    use std::os::fd::AsRawFd;
    let mut poll = libc::pollfd {
        fd: stream.as_raw_fd(),
        events: libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: poll reads and writes the one pollfd we pass.
    let ready = unsafe { libc::poll(&mut poll, 1, 0) };
    ready > 0 && poll.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0
}

#[test]
fn clients_that_never_read_are_cut_off_and_memory_stays_bounded() {
    let _serial = serial();
    const LIMIT: usize = 1024 * 1024;
    const VALUE: usize = 16 * 1024;
    let server = Server::start(&format!(
        "[client]\nmax_value_bytes = 65536\nmax_output_buffer_bytes = {LIMIT}\n"
    ));
    let net_daemon = net_daemon_pid(&server);
    let value = "v".repeat(VALUE);
    let mut setup = server.raw();
    assert_eq!(
        setup.cmd(&["SET", "big", &value]),
        Resp::Simple("OK".into())
    );
    // A normal client under the limit is unaffected: a pipeline of 32 GETs (512 KiB).
    let pipeline: Vec<u8> = (0..32)
        .flat_map(|_| encode_command(&[b"GET", b"big"]))
        .collect();
    setup.send(&pipeline);
    for _ in 0..32 {
        assert_eq!(
            setup.read_reply().expect("reply"),
            Resp::Bulk(value.clone().into_bytes())
        );
    }
    normal_client_latency(&server, 300, "warm");
    let alone = normal_client_latency(&server, 1500, "alone");
    let rss_before = rss_mib(net_daemon);
    let sampler = RssSampler::start(net_daemon);

    let clients = 8 * scale();
    let port = server.port;
    // The connections before the flood, once the set-up one has closed (the status the
    // count comes from is written now and then).
    drop(setup);
    let open_before = wait_for_connections_at_most(&server, 0, Duration::from_secs(5));
    let flooders: Vec<_> = (0..clients)
        .map(|_| {
            std::thread::spawn(move || flood_without_reading(port, "big", Duration::from_secs(20)))
        })
        .collect();
    let during = normal_client_latency(&server, 3000, "flood");
    let cut: Vec<Option<Duration>> = flooders
        .into_iter()
        .map(|t| t.join().expect("flooder"))
        .collect();
    let peak = sampler.peak_mib();
    drop(sampler);
    // The memory after is measured once the net-daemon has closed the flooders' connections.
    poll_until(
        "the net-daemon to close the never-reading clients' connections",
        Duration::from_secs(30),
        Duration::from_millis(100),
        || match connections(&server) {
            open if open <= open_before => Ok(()),
            open => Err(format!(
                "{open} connections open, {open_before} before the flood"
            )),
        },
    );
    let rss_after = rss_mib(net_daemon);
    let log = server.last_stderr();

    eprintln!(
        "never-reading clients: {clients} x pipelines of 1024 GETs of {VALUE} bytes, \
         max_output_buffer_bytes {LIMIT}; cut off after {cut:?}; net-daemon VmRSS \
         {rss_before:.1} MiB before, peak {peak:.1}, {rss_after:.1} after; latency alone: \
         {alone}; during: {during}"
    );
    for (i, when) in cut.iter().enumerate() {
        assert!(
            when.is_some(),
            "never-reading client {i} was not disconnected within 20 s"
        );
    }
    assert!(
        log.contains("does not read its replies"),
        "the cut is logged:\n{log}"
    );
    assert!(during.p99 < P99_BOUND, "latency during the flood: {during}");
    // Measured growth of the peak: 5-13 MiB with the limit; 95 MiB without it (the
    // connections then stay open, each holding a pipeline's 16 MiB of replies). The
    // bound allows each client twice the limit plus 4 MiB of answers in flight.
    let bound = clients as f64 * (2.0 * LIMIT as f64 / 1048576.0 + 4.0) + 16.0;
    assert!(
        peak - rss_before < bound,
        "the flood grew the net-daemon by {:.1} MiB (bound {bound:.0} MiB)",
        peak - rss_before
    );
    // And the server still serves.
    assert_eq!(
        server.raw().cmd(&["GET", "big"]),
        Resp::Bulk(value.into_bytes())
    );
}

// ---------------------------------------------------------------- malformed lengths

/// Sends `bytes` on a fresh connection, expects `-ERR Protocol error: <reason>` and a close.
fn expect_protocol_error(conn: &mut RawConn, bytes: &[u8], reason: &str) {
    conn.send(bytes);
    let shown = String::from_utf8_lossy(&bytes[..bytes.len().min(60)]).into_owned();
    let line = conn
        .read_line()
        .unwrap_or_else(|e| panic!("no reply to {shown:?}: {e}"));
    assert_eq!(
        line,
        format!("-ERR Protocol error: {reason}"),
        "reply to {shown:?}"
    );
    conn.expect_closed()
        .unwrap_or_else(|e| panic!("after {shown:?}: {e}"));
}

#[test]
fn oversized_negative_and_nested_lengths_get_a_protocol_error_and_a_close() {
    let _serial = serial();
    let server = Server::start("[client]\nmax_value_bytes = 1048576\n");
    let net_daemon = net_daemon_pid(&server);
    let rss_before = rss_mib(net_daemon);
    let mut bystander = server.raw();
    assert_eq!(bystander.cmd(&["SET", "k", "v"]), Resp::Simple("OK".into()));

    // max_value_bytes + 64 KiB of slack is the largest bulk the parser reads.
    let over_bulk = 1048576 + 65536 + 1;
    let deep: Vec<u8> = b"*1\r\n".repeat(10_000);
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (deep, "expected '$', got '*'"),
        (
            b"*2\r\n*1\r\n$4\r\nPING\r\n".to_vec(),
            "expected '$', got '*'",
        ),
        (
            format!("*2\r\n$3\r\nGET\r\n${over_bulk}\r\n").into_bytes(),
            "invalid bulk length",
        ),
        (
            b"*2\r\n$3\r\nGET\r\n$999999999999999999\r\n".to_vec(),
            "invalid bulk length",
        ),
        (
            b"*2\r\n$3\r\nGET\r\n$9999999999999999999\r\n".to_vec(),
            "invalid bulk length",
        ),
        (
            b"*2\r\n$3\r\nGET\r\n$-1\r\n".to_vec(),
            "invalid bulk length",
        ),
        (
            b"*2\r\n$3\r\nGET\r\n$-9223372036854775808\r\n".to_vec(),
            "invalid bulk length",
        ),
        (b"*1048577\r\n".to_vec(), "invalid multibulk length"),
        (
            b"*99999999999999999999\r\n".to_vec(),
            "invalid multibulk length",
        ),
        (
            [b"*1\r\n$".to_vec(), b"9".repeat(100)].concat(),
            "too big bulk count string",
        ),
        (
            [b"*".to_vec(), b"9".repeat(100)].concat(),
            "too big mbulk count string",
        ),
        (vec![b'a'; 70 * 1024], "too big inline request"),
    ];
    for (bytes, reason) in &cases {
        let mut conn = server.raw();
        assert_eq!(conn.cmd(&["PING"]), Resp::Simple("PONG".into()));
        expect_protocol_error(&mut conn, bytes, reason);
        assert_eq!(
            bystander.cmd(&["GET", "k"]),
            Resp::Bulk(b"v".to_vec()),
            "the bystander is unaffected by {reason:?}"
        );
    }
    // A negative or zero multibulk count is an empty request, skipped (as in Redis).
    let mut conn = server.raw();
    conn.send(b"*-1\r\n*0\r\n*-100\r\n");
    assert_eq!(conn.cmd(&["PING"]), Resp::Simple("PONG".into()));

    // Before AUTH, the limits are small (as in Redis): 10 arguments, 16 KiB bulks.
    let guarded = Server::start("[client]\nrequirepass = \"secret\"\n");
    for (bytes, reason) in [
        (b"*11\r\n".to_vec(), "invalid multibulk length"),
        (
            b"*2\r\n$4\r\nAUTH\r\n$16385\r\n".to_vec(),
            "invalid bulk length",
        ),
    ] {
        let mut conn = guarded.raw();
        expect_protocol_error(&mut conn, &bytes, reason);
    }
    let mut authed = guarded.raw();
    assert_eq!(authed.cmd(&["AUTH", "secret"]), Resp::Simple("OK".into()));
    authed.send(b"*11\r\n$4\r\nECHO\r\n$1\r\nx\r\n");
    // Authenticated, 11 arguments are fine: the request is only incomplete (ECHO's arity
    // error comes once it is complete).
    authed.send(&b"$1\r\nx\r\n".repeat(9));
    assert!(authed.read_reply().expect("reply").is_error());

    let rss_after = rss_mib(net_daemon);
    eprintln!(
        "malformed lengths: {} cases; net-daemon VmRSS {rss_before:.1} -> {rss_after:.1} MiB",
        cases.len()
    );
    assert!(
        rss_after - rss_before < 64.0,
        "declared lengths reserved memory: {rss_before:.1} -> {rss_after:.1} MiB"
    );
}
