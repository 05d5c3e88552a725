//! Off-the-shelf Redis tools against Shoal: redis-cli, redis-benchmark, and the
//! inline (telnet-style) protocol.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{run_with_timeout, Resp, Server};

fn redis_cli(server: &Server, args: &[&str]) -> (bool, String, String) {
    let mut command = Command::new("redis-cli");
    command.arg("-p").arg(server.port.to_string()).args(args);
    let output = run_with_timeout(command, Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("redis-cli (apt-get install redis-tools): {e}"));
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn redis_cli_set_then_get() {
    let server = Server::start("");
    let (ok, out, err) = redis_cli(&server, &["set", "a", "b"]);
    assert!(ok, "redis-cli set failed: {out} {err}");
    assert_eq!(out.trim(), "OK");
    let (ok, out, err) = redis_cli(&server, &["get", "a"]);
    assert!(ok, "redis-cli get failed: {out} {err}");
    assert_eq!(out.trim(), "b");
    let (_, out, _) = redis_cli(&server, &["incr", "n"]);
    assert_eq!(out.trim(), "1");
    let (_, out, _) = redis_cli(&server, &["get", "missing"]);
    assert_eq!(
        out.trim(),
        "",
        "redis-cli prints nil as an empty line when not on a terminal"
    );
    let (_, out, _) = redis_cli(&server, &["incr", "a"]);
    assert!(
        out.contains("ERR value is not an integer or out of range"),
        "{out}"
    );

    // Over the Unix socket.
    let mut command = Command::new("redis-cli");
    command
        .arg("-s")
        .arg(server.unix_socket())
        .args(["get", "a"]);
    let output = run_with_timeout(command, Duration::from_secs(20)).expect("redis-cli -s");
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "b");
}

#[test]
fn redis_benchmark_runs_without_errors() {
    let server = Server::start("");
    let mut command = Command::new("redis-benchmark");
    command.args([
        "-p",
        &server.port.to_string(),
        "-t",
        "set,get",
        "-n",
        "20000",
        "-P",
        "16",
        "-q",
    ]);
    let output = run_with_timeout(command, Duration::from_secs(120))
        .unwrap_or_else(|e| panic!("redis-benchmark (apt-get install redis-tools): {e}"));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "redis-benchmark exited {:?}\nstdout: {stdout}\nstderr: {stderr}",
        output.status
    );
    // -q prints progress lines separated by \r, then one summary line per test.
    let text = format!("{stdout}\n{stderr}").replace('\r', "\n");
    let errors: Vec<&str> = text
        .lines()
        .filter(|l| l.to_lowercase().contains("err"))
        .collect();
    assert!(
        errors.is_empty(),
        "redis-benchmark reported errors: {errors:?}"
    );
    for test in ["SET", "GET"] {
        assert!(
            text.lines()
                .any(|l| l.starts_with(&format!("{test}: ")) && l.contains("requests per second")),
            "no {test} result in: {text}"
        );
    }
    // The benchmark's keys really are stored.
    let mut con = server.conn();
    let value: Option<String> = redis::cmd("GET")
        .arg("key:__rand_int__")
        .query(&mut con)
        .expect("GET");
    assert_eq!(
        value.map(|v| v.len()),
        Some(3),
        "redis-benchmark's SET stores a 3-byte value under key:__rand_int__"
    );
}

#[test]
fn inline_protocol() {
    let server = Server::start("");
    let mut raw = server.raw();
    raw.send(b"PING\r\n");
    assert_eq!(raw.read_exact_bytes(7).expect("reply"), b"+PONG\r\n");
    raw.send(b"SET inline-key inline-value\r\n");
    assert_eq!(raw.read_reply().expect("reply"), Resp::Simple("OK".into()));
    raw.send(b"GET inline-key\r\n");
    assert_eq!(
        raw.read_exact_bytes(19).expect("reply"),
        b"$12\r\ninline-value\r\n"
    );
    // Several inline commands in one write, and a bare LF line ending.
    raw.send(b"INCR inline-n\r\nINCR inline-n\nping\r\n");
    assert_eq!(raw.read_reply().expect("reply"), Resp::Int(1));
    assert_eq!(raw.read_reply().expect("reply"), Resp::Int(2));
    assert_eq!(
        raw.read_reply().expect("reply"),
        Resp::Simple("PONG".into())
    );
    // Inline and RESP requests mix on one connection.
    assert_eq!(raw.cmd(&["GET", "inline-n"]), Resp::Bulk(b"2".to_vec()));
    raw.send(b"ECHO \"hello world\"\r\n");
    assert_eq!(
        raw.read_reply().expect("reply"),
        Resp::Bulk(b"hello world".to_vec()),
        "quoted inline arguments"
    );
    // Blank lines are ignored, as in Redis.
    raw.send(b"\r\nPING\r\n");
    assert_eq!(
        raw.read_reply().expect("reply"),
        Resp::Simple("PONG".into())
    );
}
