//! The supervisor: the process tree it starts, `shoal status`, restarts of dead
//! children, and giving up when a child keeps dying.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::{
    cmdline, describe, find_process, parent_pid, process_alive, run_with_timeout, signal, Resp,
    Server,
};

#[test]
fn status_shows_every_process_of_the_tree() {
    let server = Server::start("workers = 3\n[storage]\npartitions = 30\n");
    let status = server.status_json().expect("shoal status --json");
    assert_eq!(status["running"], true, "{status}");
    assert_eq!(
        status["supervisor_pid"].as_i64(),
        Some(i64::from(server.pid())),
        "{status}"
    );
    assert_eq!(status["workers"], 3, "{status}");
    assert_eq!(status["partitions"], 30, "{status}");
    let data_dir = std::path::PathBuf::from(status["data_dir"].as_str().expect("data_dir"));
    assert_eq!(
        data_dir.canonicalize().ok(),
        server.data_dir.canonicalize().ok(),
        "{status}"
    );

    let processes = status["processes"].as_array().expect("processes");
    assert_eq!(processes.len(), 4, "3 workers and a net-daemon: {status}");
    let mut pids = BTreeSet::new();
    let mut owned = Vec::new();
    for index in 0..3u64 {
        let worker = find_process(&status, "shard-worker", index)
            .unwrap_or_else(|| panic!("worker {index}: {status}"));
        assert_eq!(worker["state"], "ready", "{worker}");
        assert_eq!(worker["restarts"], 0, "{worker}");
        let pid = worker["pid"].as_i64().expect("pid") as i32;
        assert!(process_alive(pid), "worker {index} pid {pid} is alive");
        assert_eq!(
            parent_pid(pid),
            Some(server.pid()),
            "workers are children of the supervisor"
        );
        let args = cmdline(pid);
        assert!(
            args.contains("shard-worker")
                && args.contains("--index")
                && args.ends_with(&index.to_string()),
            "{args}"
        );
        assert!(
            server
                .data_dir
                .join(format!("shard-{index}"))
                .join("data.mdb")
                .exists(),
            "LMDB env of worker {index}"
        );
        pids.insert(pid);
        let partitions: Vec<u64> = worker["partitions"]
            .as_array()
            .expect("partitions")
            .iter()
            .filter_map(|p| p.as_u64())
            .collect();
        assert_eq!(
            partitions,
            (0..30).filter(|p| p % 3 == index).collect::<Vec<u64>>(),
            "worker {index}"
        );
        owned.extend(partitions);
        assert!(worker["last_commit_id"].as_u64().is_some(), "{worker}");
        assert!(worker["ops"].as_u64().is_some(), "{worker}");
    }
    owned.sort_unstable();
    assert_eq!(
        owned,
        (0..30).collect::<Vec<u64>>(),
        "every partition has exactly one worker"
    );

    let net =
        find_process(&status, "net-daemon", 0).unwrap_or_else(|| panic!("net-daemon: {status}"));
    assert_eq!(net["state"], "ready", "{net}");
    let net_pid = net["pid"].as_i64().expect("pid") as i32;
    assert!(process_alive(net_pid));
    assert_eq!(parent_pid(net_pid), Some(server.pid()));
    assert!(
        cmdline(net_pid).contains("net-daemon"),
        "{}",
        cmdline(net_pid)
    );
    assert!(pids.insert(net_pid), "distinct pids");
    assert!(
        !server.data_dir.join("shard-3").exists(),
        "no environment beyond the configured workers"
    );

    // Writes move the counters of the worker that owns the key.
    let mut con = server.conn();
    let key = server.keys_on_worker("counted:", 2, 1).remove(0);
    for i in 0..5 {
        let _: () = redis::cmd("SET")
            .arg(&key)
            .arg(i)
            .query(&mut con)
            .expect("SET");
    }
    let worker = server.process_status("shard-worker", 2);
    assert!(
        worker["last_commit_id"].as_u64().unwrap_or(0) >= 5,
        "{worker}"
    );
    assert!(worker["ops"].as_u64().unwrap_or(0) >= 5, "{worker}");

    // The human-readable table names every process.
    let mut command = server.command();
    command
        .args(["status", "--config"])
        .arg(&server.config_path);
    let output = run_with_timeout(command, Duration::from_secs(10)).expect("shoal status");
    assert!(output.status.success(), "shoal status: {:?}", output);
    let table = String::from_utf8_lossy(&output.stdout);
    for pid in &pids {
        assert!(table.contains(&pid.to_string()), "pid {pid} in:\n{table}");
    }
    assert!(
        table.contains("net-daemon") && table.matches("ready").count() >= 4,
        "{table}"
    );

    // The config path may come from SHOAL_CONFIG.
    let mut command = std::process::Command::new(common::SHOAL);
    command
        .env("SHOAL_CONFIG", &server.config_path)
        .args(["status", "--json"]);
    let output = run_with_timeout(command, Duration::from_secs(10)).expect("shoal status");
    let from_env: serde_json::Value = serde_json::from_slice(&output.stdout).expect("JSON");
    assert_eq!(from_env["supervisor_pid"], status["supervisor_pid"]);
}

#[test]
fn status_of_a_stopped_server_says_so() {
    let mut server = Server::start("");
    let status = server.stop();
    assert_eq!(status.code(), Some(0), "{}", describe(&status));
    let mut command = server.command();
    command
        .args(["status", "--json", "--config"])
        .arg(&server.config_path);
    let output = run_with_timeout(command, Duration::from_secs(10)).expect("shoal status");
    if output.status.success() {
        let json: serde_json::Value = serde_json::from_slice(&output.stdout).expect("JSON");
        assert_eq!(json["running"], false, "{json}");
    } else {
        assert!(!output.stderr.is_empty(), "a failing shoal status says why");
    }
}

#[test]
fn a_killed_net_daemon_is_restarted_and_data_is_intact() {
    let server = Server::start("");
    let mut raw = server.raw();
    assert_eq!(raw.cmd(&["SET", "k", "v"]), Resp::Simple("OK".into()));
    let net = server.process_status("net-daemon", 0);
    let old_pid = net["pid"].as_i64().expect("pid") as i32;
    signal(old_pid, libc::SIGKILL);
    raw.expect_closed()
        .expect("client connections of the dead net-daemon close");

    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let reply = std::net::TcpStream::connect(("127.0.0.1", server.port))
            .ok()
            .and_then(|_| {
                let mut raw = server.raw();
                raw.send(&common::encode_command(&[b"GET", b"k"]));
                raw.read_reply().ok()
            });
        if let Some(reply) = reply {
            assert_eq!(reply, Resp::Bulk(b"v".to_vec()));
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the net-daemon did not come back within 15 s\n{}",
            server.logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let net = server.process_status("net-daemon", 0);
    assert_ne!(net["pid"].as_i64(), Some(i64::from(old_pid)), "{net}");
    assert!(net["restarts"].as_u64().unwrap_or(0) >= 1, "{net}");
    for index in 0..2 {
        assert_eq!(
            server.process_status("shard-worker", index)["restarts"],
            0,
            "workers were left running"
        );
    }
}

#[test]
fn a_worker_that_keeps_dying_makes_the_supervisor_give_up() {
    let mut server = Server::start("[supervisor]\nmax_restarts = 2\nrestart_window_ms = 60000\n");
    let supervisor = server.pid();
    let mut killed = BTreeSet::new();
    let mut last_status = serde_json::Value::Null;
    let deadline = Instant::now() + Duration::from_secs(30);
    let exit = loop {
        if let Some(status) = server.try_exit_status() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the supervisor kept restarting after {} kills: {last_status}",
            killed.len()
        );
        if let Ok(status) = server.status_json() {
            if let Some(pid) =
                find_process(&status, "shard-worker", 0).and_then(|w| w["pid"].as_i64())
            {
                let pid = pid as i32;
                if pid > 0 && !killed.contains(&pid) && process_alive(pid) {
                    signal(pid, libc::SIGKILL);
                    killed.insert(pid);
                }
            }
            last_status = status;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(
        !exit.success(),
        "the supervisor gives up with a non-zero exit, got {}",
        describe(&exit)
    );
    assert_eq!(
        killed.len(),
        3,
        "it gives up on the 3rd death with max_restarts = 2 (killed {killed:?})"
    );

    // It stopped everything it started.
    let deadline = Instant::now() + Duration::from_secs(5);
    while common::group_alive(supervisor) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        !common::group_alive(supervisor),
        "children left running after the supervisor gave up"
    );
    let stderr = server.last_stderr();
    assert!(
        !stderr.trim().is_empty(),
        "the supervisor says why it gave up"
    );
}

#[test]
fn children_exit_when_the_supervisor_is_killed() {
    let mut server = Server::start("");
    let mut con = server.conn();
    let _: () = redis::cmd("SET")
        .arg("k")
        .arg("v")
        .query(&mut con)
        .expect("SET");
    let status = server.status_json().expect("status");
    let children: Vec<i32> = status["processes"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["pid"].as_i64())
        .map(|p| p as i32)
        .collect();
    // SIGKILL to the supervisor alone: the children must not linger as orphans that
    // still hold the data dir.
    signal(server.pid(), libc::SIGKILL);
    let exit = server
        .wait_exit(Duration::from_secs(5))
        .expect("supervisor reaped");
    assert_eq!(exit.code(), None, "{}", describe(&exit));
    let deadline = Instant::now() + Duration::from_secs(10);
    while children.iter().any(|&pid| process_alive(pid)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let alive: Vec<i32> = children
        .iter()
        .copied()
        .filter(|&pid| process_alive(pid))
        .collect();
    assert!(
        alive.is_empty(),
        "children still running 10 s after the supervisor died: {alive:?}"
    );

    server.restart();
    let value: Option<String> = redis::cmd("GET")
        .arg("k")
        .query(&mut server.conn())
        .expect("GET");
    assert_eq!(value.as_deref(), Some("v"));
}

#[test]
fn the_example_config_starts_and_every_key_is_documented() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf();
    let example: toml::Table = toml::from_str(
        &std::fs::read_to_string(root.join("deploy/shoal.toml")).expect("deploy/shoal.toml"),
    )
    .expect("deploy/shoal.toml is valid TOML");
    let docs = std::fs::read_to_string(root.join("docs/config.md")).expect("docs/config.md");
    let mut keys = Vec::new();
    for (key, value) in &example {
        match value {
            toml::Value::Table(section) => {
                assert!(
                    docs.contains(&format!("## `[{key}]`")),
                    "docs/config.md has a [{key}] section"
                );
                keys.extend(section.keys().cloned());
            }
            _ => keys.push(key.clone()),
        }
    }
    for key in &keys {
        assert!(
            docs.contains(&format!("| `{key}` |")),
            "docs/config.md documents {key}"
        );
    }

    // The example, with this test's paths and port, starts as it is.
    let mut config = example.clone();
    config.remove("data_dir");
    config.insert("workers".into(), 2.into());
    let client = config["client"].as_table_mut().expect("[client]");
    client.remove("listen");
    client.remove("unix_socket");
    let server = Server::start(&toml::to_string(&config).expect("toml"));
    assert_eq!(server.raw().cmd(&["PING"]), Resp::Simple("PONG".into()));
    assert!(server.unix_socket().exists());
}
