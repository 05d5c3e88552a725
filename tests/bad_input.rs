//! Bad input gets a Redis-style error and never takes the server down: malformed
//! RESP, oversized keys and values, wrong arity, unknown commands, bad configs, a
//! second server on the same data dir, and too many connections.

mod common;

use std::time::{Duration, Instant};

use common::{run_with_timeout, Resp, Server};

#[test]
fn malformed_resp_closes_only_that_connection() {
    let server = Server::start("");
    let mut bystander = server.raw();
    assert_eq!(bystander.cmd(&["SET", "k", "v"]), Resp::Simple("OK".into()));

    // Each of these is a protocol error in Redis too.
    for garbage in [
        &b"*1\r\n$x\r\n"[..],
        b"*1\r\n+OK\r\n",
        b"*2\r\n$3\r\nGET\r\n$-5\r\n",
        b"*abc\r\n",
    ] {
        let mut bad = server.raw();
        // A good request first, so we know the connection itself worked.
        assert_eq!(bad.cmd(&["PING"]), Resp::Simple("PONG".into()));
        bad.send(garbage);
        let reply = bad
            .read_line()
            .unwrap_or_else(|e| panic!("no reply to {:?}: {e}", String::from_utf8_lossy(garbage)));
        assert!(
            reply.starts_with("-ERR Protocol error"),
            "reply to {:?}: {reply:?}",
            String::from_utf8_lossy(garbage)
        );
        bad.expect_closed()
            .unwrap_or_else(|e| panic!("after {:?}: {e}", String::from_utf8_lossy(garbage)));

        // Other connections are unaffected, and new ones are accepted.
        assert_eq!(bystander.cmd(&["GET", "k"]), Resp::Bulk(b"v".to_vec()));
        assert_eq!(server.raw().cmd(&["PING"]), Resp::Simple("PONG".into()));
    }
}

#[test]
fn key_over_the_limit_is_refused_and_nothing_is_stored() {
    let server = Server::start("");
    let mut raw = server.raw();
    let longest = "k".repeat(499);
    let too_long = "k".repeat(500);
    assert_eq!(
        raw.cmd(&["SET", &longest, "v"]),
        Resp::Simple("OK".into()),
        "a 499-byte key is accepted"
    );
    assert_eq!(raw.cmd(&["GET", &longest]), Resp::Bulk(b"v".to_vec()));
    assert_eq!(
        raw.cmd(&["SET", &longest, "v", "EX", "100"]),
        Resp::Simple("OK".into()),
        "the longest key may have a time to live (its expiry index entry fits LMDB)"
    );
    let reply = raw.cmd(&["SET", &too_long, "v"]);
    assert!(
        reply.is_error() && reply.error().contains("key is too long"),
        "SET with a 500-byte key: {reply:?}"
    );
    let huge = "k".repeat(100_000);
    let reply = raw.cmd(&["SET", &huge, "v"]);
    assert!(
        reply.is_error() && reply.error().contains("key is too long"),
        "SET with a 100 kB key: {reply:?}"
    );
    let reply = raw.cmd(&["INCR", &too_long]);
    assert!(
        reply.is_error() && reply.error().contains("key is too long"),
        "INCR with a 500-byte key: {reply:?}"
    );
    // The connection stays open and nothing was stored.
    assert_eq!(raw.cmd(&["DBSIZE"]), Resp::Int(1));
    assert_eq!(raw.cmd(&["PING"]), Resp::Simple("PONG".into()));
}

#[test]
fn value_over_max_value_bytes_is_refused_and_nothing_is_stored() {
    let server = Server::start("[client]\nmax_value_bytes = 1024\n");
    let mut raw = server.raw();
    let fits = "v".repeat(1024);
    let too_big = "v".repeat(1025);
    assert_eq!(raw.cmd(&["SET", "fits", &fits]), Resp::Simple("OK".into()));
    assert_eq!(
        raw.cmd(&["GET", "fits"]),
        Resp::Bulk(fits.clone().into_bytes())
    );
    for command in [
        vec!["SET", "big", too_big.as_str()],
        vec!["SETNX", "big", too_big.as_str()],
        vec!["GETSET", "big", too_big.as_str()],
    ] {
        let reply = raw.cmd(&command);
        assert!(
            reply.is_error() && reply.error().contains("max_value_bytes"),
            "{} with 1025 bytes: {reply:?}",
            command[0]
        );
        assert_eq!(
            raw.cmd(&["EXISTS", "big"]),
            Resp::Int(0),
            "nothing stored by {}",
            command[0]
        );
    }
    let reply = raw.cmd(&["SET", "fits", &too_big]);
    assert!(
        reply.is_error() && reply.error().contains("max_value_bytes"),
        "overwrite with 1025 bytes: {reply:?}"
    );
    assert_eq!(
        raw.cmd(&["GET", "fits"]),
        Resp::Bulk(fits.into_bytes()),
        "the old value is kept"
    );
    assert_eq!(
        raw.cmd(&["PING"]),
        Resp::Simple("PONG".into()),
        "the connection stays open"
    );
}

#[test]
fn append_past_max_value_bytes_is_refused() {
    let server = Server::start("[client]\nmax_value_bytes = 1024\n");
    let mut raw = server.raw();
    let start = "a".repeat(1000);
    assert_eq!(raw.cmd(&["SET", "grow", &start]), Resp::Simple("OK".into()));
    assert_eq!(
        raw.cmd(&["APPEND", "grow", &"b".repeat(24)]),
        Resp::Int(1024)
    );
    let reply = raw.cmd(&["APPEND", "grow", "c"]);
    assert!(
        reply.is_error() && reply.error().contains("max_value_bytes"),
        "APPEND to 1025 bytes: {reply:?}"
    );
    assert_eq!(raw.cmd(&["STRLEN", "grow"]), Resp::Int(1024));
}

#[test]
fn wrong_arity_unknown_command_and_bad_numbers_get_redis_errors() {
    let server = Server::start("");
    let mut raw = server.raw();
    for (args, name) in [
        (vec!["GET"], "get"),
        (vec!["GET", "a", "b"], "get"),
        (vec!["SET", "a"], "set"),
        (vec!["INCR"], "incr"),
        (vec!["INCRBY", "a"], "incrby"),
        (vec!["MGET"], "mget"),
        (vec!["DEL"], "del"),
        (vec!["EXISTS"], "exists"),
        (vec!["ECHO"], "echo"),
        (vec!["APPEND", "a"], "append"),
        (vec!["SELECT"], "select"),
        (vec!["GETDEL"], "getdel"),
    ] {
        assert_eq!(
            raw.cmd(&args),
            Resp::Error(format!(
                "ERR wrong number of arguments for '{name}' command"
            )),
            "{args:?}"
        );
    }
    assert_eq!(
        raw.cmd(&["foo", "a", "b"]).error(),
        "ERR unknown command 'foo', with args beginning with: 'a' 'b' "
    );
    assert_eq!(
        raw.cmd(&["foo"]).error(),
        "ERR unknown command 'foo', with args beginning with: "
    );
    raw.send(b"nosuchthing x\r\n");
    assert_eq!(
        raw.read_reply().unwrap().error(),
        "ERR unknown command 'nosuchthing', with args beginning with: 'x' "
    );

    assert_eq!(
        raw.cmd(&["SET", "word", "hello"]),
        Resp::Simple("OK".into())
    );
    assert_eq!(
        raw.cmd(&["INCR", "word"]).error(),
        "ERR value is not an integer or out of range"
    );
    assert_eq!(
        raw.cmd(&["DECRBY", "word", "1"]).error(),
        "ERR value is not an integer or out of range"
    );
    assert_eq!(
        raw.cmd(&["INCRBYFLOAT", "word", "1"]).error(),
        "ERR value is not a valid float"
    );
    assert_eq!(raw.cmd(&["GET", "word"]), Resp::Bulk(b"hello".to_vec()));
    assert_eq!(
        raw.cmd(&["PING"]),
        Resp::Simple("PONG".into()),
        "still connected after all those errors"
    );
}

/// Runs `shoal serve` on a config and expects it to refuse at once.
fn serve_refuses(config: &str) -> (Option<i32>, String, String) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("bad.toml");
    let data_dir = dir.path().join("data");
    std::fs::write(
        &path,
        format!("data_dir = {:?}\n{config}", data_dir.display().to_string()),
    )
    .expect("write config");
    let mut command = std::process::Command::new(common::SHOAL);
    command
        .env_remove("SHOAL_CONFIG")
        .current_dir(dir.path())
        .arg("serve")
        .arg("--config")
        .arg(&path);
    let started = Instant::now();
    let output = run_with_timeout(command, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("config {config:?}: {e}"));
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "refusing a bad config took {:?}",
        started.elapsed()
    );
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
        path.display().to_string(),
    )
}

#[test]
fn bad_config_exits_2_with_one_line_naming_file_and_key() {
    for (config, key) in [
        ("wokers = 2\n", "wokers"),
        (
            "[client]\nlisten_addr = \"127.0.0.1:1\"\n",
            "client.listen_addr",
        ),
        ("[storage]\npartitions = \"many\"\n", "storage.partitions"),
        ("workers = -1\n", "workers"),
        ("[client]\nlisten = \"nonsense\"\n", "client.listen"),
        (
            "[storage]\ndurability = \"sometimes\"\n",
            "storage.durability",
        ),
        ("[client]\nmax_connections = 0\n", "client.max_connections"),
        ("[storage]\npartitions = 0\n", "storage.partitions"),
        ("[supervisor]\nmax_restart = 3\n", "supervisor.max_restart"),
    ] {
        let (code, stderr, file) = serve_refuses(config);
        assert_eq!(code, Some(2), "exit code for {config:?}; stderr: {stderr}");
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(
            lines.len(),
            1,
            "exactly one line on stderr for {config:?}, got: {stderr:?}"
        );
        let prefix = format!("shoal: bad config {file}: key `{key}`: ");
        assert!(
            lines[0].starts_with(&prefix),
            "for {config:?}\n  expected a line starting {prefix:?}\n  got {:?}",
            lines[0]
        );
        assert!(
            lines[0].len() > prefix.len(),
            "the line says what is wrong: {:?}",
            lines[0]
        );
    }
}

#[test]
fn unparsable_or_missing_config_file_exits_2_with_one_line() {
    let (code, stderr, file) = serve_refuses("[client\nlisten = \n");
    assert_eq!(code, Some(2), "stderr: {stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{stderr:?}");
    assert!(
        lines[0].starts_with(&format!("shoal: bad config {file}: ")),
        "{stderr:?}"
    );

    let dir = tempfile::tempdir().expect("temp dir");
    let missing = dir.path().join("nope.toml");
    let mut command = std::process::Command::new(common::SHOAL);
    command
        .env_remove("SHOAL_CONFIG")
        .current_dir(dir.path())
        .arg("serve")
        .arg("--config")
        .arg(&missing);
    let output = run_with_timeout(command, Duration::from_secs(10)).expect("serve");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(
        output.status.code(),
        Some(2),
        "missing config file: {stderr}"
    );
    assert!(
        stderr
            .trim()
            .starts_with(&format!("shoal: bad config {}: ", missing.display())),
        "{stderr:?}"
    );
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr:?}");
}

#[test]
fn config_path_from_shoal_config_env() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("env.toml");
    std::fs::write(&path, "wokers = 2\n").expect("write");
    let mut command = std::process::Command::new(common::SHOAL);
    command
        .env("SHOAL_CONFIG", &path)
        .current_dir(dir.path())
        .arg("serve");
    let output = run_with_timeout(command, Duration::from_secs(10)).expect("serve");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(&format!("bad config {}: key `wokers`", path.display())),
        "SHOAL_CONFIG was read: {stderr}"
    );
}

#[test]
fn second_serve_on_the_same_data_dir_is_refused() {
    let server = Server::start("");
    // Same data dir, different TCP port and socket, so only the data dir clashes.
    let path = server.dir.path().join("second.toml");
    let mut table: toml::Table = toml::from_str(&server.config_text()).expect("config");
    let client = table["client"].as_table_mut().expect("[client]");
    client.insert(
        "listen".into(),
        format!("127.0.0.1:{}", common::free_port()).into(),
    );
    client.insert(
        "unix_socket".into(),
        server
            .dir
            .path()
            .join("second.sock")
            .display()
            .to_string()
            .into(),
    );
    std::fs::write(&path, toml::to_string(&table).expect("toml")).expect("write");

    let mut command = server.command();
    command.arg("serve").arg("--config").arg(&path);
    let started = Instant::now();
    let output =
        run_with_timeout(command, Duration::from_secs(10)).expect("second serve exits by itself");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success(),
        "second serve must fail; stderr: {stderr}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "refused at once, took {:?}",
        started.elapsed()
    );
    assert!(
        stderr.contains("already running"),
        "stderr names the reason: {stderr:?}"
    );

    // The first server is untouched.
    assert_eq!(server.raw().cmd(&["PING"]), Resp::Simple("PONG".into()));
    let status = server.status_json().expect("status");
    assert_eq!(
        status["supervisor_pid"].as_i64(),
        Some(i64::from(server.pid())),
        "{status}"
    );
    assert!(
        server.unix_socket().exists(),
        "the first server's socket was not removed"
    );
    assert_eq!(
        common::RawConn::unix(&server.unix_socket()).cmd(&["PING"]),
        Resp::Simple("PONG".into())
    );
}

/// Runs `shoal serve` on the server's config, which must refuse to start: its stderr.
fn refused_start(server: &Server, what: &str) -> String {
    let mut command = server.command();
    command
        .arg("serve")
        .arg("--config")
        .arg(&server.config_path);
    let output = run_with_timeout(command, Duration::from_secs(10)).expect("serve exits by itself");
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(!output.status.success(), "{what}; stderr: {stderr}");
    stderr
}

#[test]
fn a_data_dir_whose_databases_were_swapped_is_refused_in_a_cluster() {
    let mut server = Server::start("");
    let mut raw = server.raw();
    assert_eq!(raw.cmd(&["SET", "k", "v"]), Resp::Simple("OK".into()));
    assert_eq!(raw.cmd(&["SWAPDB", "0", "1"]), Resp::Simple("OK".into()));
    drop(raw);
    assert_eq!(server.stop().code(), Some(0));
    let peer = common::free_port();
    server.update_config(&format!(
        "[cluster]\ncluster_secret = \"a-secret-of-the-test-cluster\"\npeer_listen = \"127.0.0.1:{peer}\"\n"
    ));
    let stderr = refused_start(&server, "a swapped data dir joined a cluster");
    assert!(
        stderr.contains("SWAPDB") && stderr.contains("databases"),
        "the message says what to do: {stderr:?}"
    );
}

#[test]
fn changing_the_partition_count_of_an_existing_data_dir_is_refused() {
    let mut server = Server::start("");
    let mut raw = server.raw();
    assert_eq!(raw.cmd(&["SET", "k", "v"]), Resp::Simple("OK".into()));
    drop(raw);
    let status = server.stop();
    assert_eq!(status.code(), Some(0));
    // The partition count is fixed; the worker count may change (tests/rebalance.rs).
    server.update_config("[storage]\npartitions = 128\n");
    let stderr = refused_start(&server, "a new partition count must be refused");
    assert!(
        stderr.contains("partitions"),
        "the message names the key: {stderr:?}"
    );
    server.update_config("[storage]\npartitions = 256\n");
    // The original layout still starts, with the data intact.
    server.restart();
    assert_eq!(server.raw().cmd(&["GET", "k"]), Resp::Bulk(b"v".to_vec()));
}

#[test]
fn connections_beyond_max_connections_are_refused() {
    let server = Server::start("[client]\nmax_connections = 3\n");
    let mut open: Vec<common::RawConn> = (0..3).map(|_| server.raw()).collect();
    for conn in &mut open {
        assert_eq!(conn.cmd(&["PING"]), Resp::Simple("PONG".into()));
    }
    // The fourth is told why and closed, without sending anything.
    let mut extra = server.raw();
    extra.set_read_timeout(Duration::from_secs(5));
    let line = extra
        .read_line()
        .expect("an error for the connection over the limit");
    assert_eq!(line, "-ERR max number of clients reached");
    extra.expect_closed().expect("closed after the error");
    for conn in &mut open {
        assert_eq!(
            conn.cmd(&["PING"]),
            Resp::Simple("PONG".into()),
            "the open connections are unaffected"
        );
    }

    // Once one closes, a new connection is accepted again.
    drop(open.pop());
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut again = server.raw();
        again.set_read_timeout(Duration::from_millis(300));
        match again.read_line() {
            // Still counted full: the close has not been seen yet.
            Ok(line)
                if line.starts_with("-ERR max number of clients") && Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(50));
            }
            // Nothing sent: the connection was accepted.
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                again.set_read_timeout(Duration::from_secs(10));
                assert_eq!(again.cmd(&["PING"]), Resp::Simple("PONG".into()));
                break;
            }
            other => panic!("a connection after one closed: {other:?}"),
        }
    }
}
