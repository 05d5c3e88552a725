//! Every client command of a single-host Shoal, checked against Redis semantics
//! through the `redis` crate and, where the exact bytes matter, a raw socket.

mod common;

use common::{call, call_str, connect, error_text, key_partition, Resp, Server};
use redis::Value;

fn bulk(text: &str) -> Value {
    Value::BulkString(text.as_bytes().to_vec())
}

fn get(con: &mut redis::Connection, key: &str) -> Option<String> {
    redis::cmd("GET").arg(key).query(con).expect("GET")
}

#[test]
fn ping_echo_and_quit() {
    let server = Server::start("");
    let mut con = server.conn();
    assert_eq!(
        call_str(&mut con, &["PING"]),
        Value::SimpleString("PONG".into())
    );
    assert_eq!(
        call_str(&mut con, &["PING", "hello there"]),
        bulk("hello there")
    );
    assert_eq!(call_str(&mut con, &["ECHO", "a\r\nb"]), bulk("a\r\nb"));
    assert_eq!(
        call_str(&mut con, &["ping"]),
        Value::SimpleString("PONG".into()),
        "command names are case-insensitive"
    );

    let mut raw = server.raw();
    assert_eq!(raw.cmd(&["PING"]), Resp::Simple("PONG".into()));
    assert_eq!(raw.cmd(&["QUIT"]), Resp::Simple("OK".into()));
    raw.expect_closed().expect("QUIT closes the connection");
}

#[test]
fn set_and_get_with_options() {
    let server = Server::start("");
    let mut con = server.conn();
    assert_eq!(get(&mut con, "missing"), None);
    assert_eq!(call_str(&mut con, &["SET", "k", "v1"]), Value::Okay);
    assert_eq!(get(&mut con, "k").as_deref(), Some("v1"));
    assert_eq!(
        call_str(&mut con, &["SET", "k", "v2"]),
        Value::Okay,
        "SET overwrites"
    );
    assert_eq!(get(&mut con, "k").as_deref(), Some("v2"));

    // NX: only if absent.
    assert_eq!(call_str(&mut con, &["SET", "k", "nx", "NX"]), Value::Nil);
    assert_eq!(get(&mut con, "k").as_deref(), Some("v2"));
    assert_eq!(
        call_str(&mut con, &["SET", "fresh", "nx", "nx"]),
        Value::Okay
    );
    assert_eq!(get(&mut con, "fresh").as_deref(), Some("nx"));

    // XX: only if present.
    assert_eq!(
        call_str(&mut con, &["SET", "absent", "xx", "XX"]),
        Value::Nil
    );
    assert_eq!(get(&mut con, "absent"), None);
    assert_eq!(call_str(&mut con, &["SET", "k", "xx", "XX"]), Value::Okay);
    assert_eq!(get(&mut con, "k").as_deref(), Some("xx"));

    // GET: returns the old value (or nil) and sets.
    assert_eq!(call_str(&mut con, &["SET", "k", "v3", "GET"]), bulk("xx"));
    assert_eq!(get(&mut con, "k").as_deref(), Some("v3"));
    assert_eq!(
        call_str(&mut con, &["SET", "new-with-get", "v", "GET"]),
        Value::Nil
    );
    assert_eq!(get(&mut con, "new-with-get").as_deref(), Some("v"));
    assert_eq!(
        call_str(&mut con, &["SET", "k", "v4", "XX", "GET"]),
        bulk("v3")
    );
    assert_eq!(get(&mut con, "k").as_deref(), Some("v4"));

    // Conflicting or unknown options.
    assert_eq!(
        error_text(&call_str(&mut con, &["SET", "k", "v", "NX", "XX"])),
        "ERR syntax error"
    );
    assert_eq!(
        error_text(&call_str(&mut con, &["SET", "k", "v", "BOGUS"])),
        "ERR syntax error"
    );
    assert_eq!(
        get(&mut con, "k").as_deref(),
        Some("v4"),
        "a rejected SET changes nothing"
    );

    // Binary-safe keys and values, and the empty value.
    let key: &[u8] = b"bin\x00key\r\n";
    let value: &[u8] = b"\x00\x01\xff\r\n\x00";
    assert_eq!(call(&mut con, &[b"SET", key, value]), Value::Okay);
    assert_eq!(
        call(&mut con, &[b"GET", key]),
        Value::BulkString(value.to_vec())
    );
    assert_eq!(call_str(&mut con, &["SET", "empty", ""]), Value::Okay);
    assert_eq!(
        call_str(&mut con, &["GET", "empty"]),
        bulk(""),
        "an empty value is not nil"
    );
    assert_eq!(call_str(&mut con, &["EXISTS", "empty"]), Value::Int(1));
}

#[test]
fn large_values_round_trip() {
    let server = Server::start("");
    let mut con = server.conn();
    for size in [64 * 1024, 1024 * 1024, 8 * 1024 * 1024] {
        let value: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
        assert_eq!(
            call(&mut con, &[b"SET", b"large", &value]),
            Value::Okay,
            "{size} bytes"
        );
        assert_eq!(
            call(&mut con, &[b"GET", b"large"]),
            Value::BulkString(value),
            "{size} bytes"
        );
        assert_eq!(
            call_str(&mut con, &["STRLEN", "large"]),
            Value::Int(size as i64)
        );
    }
}

#[test]
fn setnx_getset_getdel_del_unlink_exists_mget() {
    let server = Server::start("");
    let mut con = server.conn();
    assert_eq!(call_str(&mut con, &["SETNX", "a", "1"]), Value::Int(1));
    assert_eq!(call_str(&mut con, &["SETNX", "a", "2"]), Value::Int(0));
    assert_eq!(get(&mut con, "a").as_deref(), Some("1"));

    assert_eq!(call_str(&mut con, &["GETSET", "a", "3"]), bulk("1"));
    assert_eq!(call_str(&mut con, &["GETSET", "b", "x"]), Value::Nil);
    assert_eq!(get(&mut con, "a").as_deref(), Some("3"));
    assert_eq!(get(&mut con, "b").as_deref(), Some("x"));

    assert_eq!(call_str(&mut con, &["GETDEL", "b"]), bulk("x"));
    assert_eq!(call_str(&mut con, &["GETDEL", "b"]), Value::Nil);
    assert_eq!(get(&mut con, "b"), None);

    // Multi-key commands span partitions and workers.
    let keys: Vec<String> = (0..20).map(|i| format!("multi:{i}")).collect();
    assert!(keys.iter().any(|k| server.worker_of(k.as_bytes()) == 0));
    assert!(keys.iter().any(|k| server.worker_of(k.as_bytes()) == 1));
    for (i, key) in keys.iter().enumerate() {
        assert_eq!(
            call_str(&mut con, &["SET", key, &format!("value-{i}")]),
            Value::Okay
        );
    }
    let mut mget = vec!["MGET"];
    mget.extend(keys.iter().map(String::as_str));
    mget.insert(3, "no-such-key");
    let mut expected: Vec<Value> = (0..20).map(|i| bulk(&format!("value-{i}"))).collect();
    expected.insert(2, Value::Nil);
    assert_eq!(call_str(&mut con, &mget), Value::Array(expected));

    let mut exists = vec!["EXISTS", "no-such-key"];
    exists.extend(keys.iter().map(String::as_str));
    exists.push(keys[0].as_str()); // duplicates count twice, as in Redis
    assert_eq!(call_str(&mut con, &exists), Value::Int(21));

    let mut del = vec!["DEL", "no-such-key"];
    del.extend(keys[..10].iter().map(String::as_str));
    assert_eq!(call_str(&mut con, &del), Value::Int(10));
    let mut unlink = vec!["UNLINK"];
    unlink.extend(keys[5..15].iter().map(String::as_str));
    assert_eq!(
        call_str(&mut con, &unlink),
        Value::Int(5),
        "only the 5 keys still present count"
    );
    for (i, key) in keys.iter().enumerate() {
        let expected = (i >= 15).then(|| format!("value-{i}"));
        assert_eq!(get(&mut con, key), expected, "{key}");
    }
    assert_eq!(call_str(&mut con, &["DEL", "no-such-key"]), Value::Int(0));
}

#[test]
fn counters() {
    let server = Server::start("");
    let mut con = server.conn();
    assert_eq!(call_str(&mut con, &["INCR", "n"]), Value::Int(1));
    assert_eq!(call_str(&mut con, &["INCRBY", "n", "10"]), Value::Int(11));
    assert_eq!(call_str(&mut con, &["DECR", "n"]), Value::Int(10));
    assert_eq!(call_str(&mut con, &["DECRBY", "n", "4"]), Value::Int(6));
    assert_eq!(call_str(&mut con, &["INCRBY", "n", "-10"]), Value::Int(-4));
    assert_eq!(call_str(&mut con, &["DECR", "fresh"]), Value::Int(-1));
    assert_eq!(
        get(&mut con, "n").as_deref(),
        Some("-4"),
        "counters are stored as decimal strings"
    );

    assert_eq!(call_str(&mut con, &["SET", "s", "41"]), Value::Okay);
    assert_eq!(call_str(&mut con, &["INCR", "s"]), Value::Int(42));

    let not_integer = "ERR value is not an integer or out of range";
    for bad in ["abc", "1.5", " 1", "99999999999999999999", ""] {
        assert_eq!(call_str(&mut con, &["SET", "bad", bad]), Value::Okay);
        assert_eq!(
            error_text(&call_str(&mut con, &["INCR", "bad"])),
            not_integer,
            "INCR on {bad:?}"
        );
        assert_eq!(
            get(&mut con, "bad").as_deref(),
            Some(bad),
            "a failed INCR leaves {bad:?} alone"
        );
    }
    assert_eq!(
        error_text(&call_str(&mut con, &["INCRBY", "n", "ten"])),
        not_integer
    );
    assert_eq!(
        error_text(&call_str(&mut con, &["DECRBY", "n", "1.0"])),
        not_integer
    );

    assert_eq!(
        call_str(&mut con, &["SET", "max", &i64::MAX.to_string()]),
        Value::Okay
    );
    assert_eq!(
        error_text(&call_str(&mut con, &["INCR", "max"])),
        "ERR increment or decrement would overflow"
    );
    assert_eq!(
        call_str(&mut con, &["SET", "min", &i64::MIN.to_string()]),
        Value::Okay
    );
    assert_eq!(
        error_text(&call_str(&mut con, &["DECR", "min"])),
        "ERR increment or decrement would overflow"
    );
    assert_eq!(get(&mut con, "max"), Some(i64::MAX.to_string()));

    // INCRBYFLOAT, with the examples from the Redis documentation.
    assert_eq!(call_str(&mut con, &["SET", "f", "10.50"]), Value::Okay);
    assert_eq!(
        call_str(&mut con, &["INCRBYFLOAT", "f", "0.1"]),
        bulk("10.6")
    );
    assert_eq!(call_str(&mut con, &["INCRBYFLOAT", "f", "-5"]), bulk("5.6"));
    assert_eq!(get(&mut con, "f").as_deref(), Some("5.6"));
    assert_eq!(call_str(&mut con, &["SET", "g", "5.0e3"]), Value::Okay);
    assert_eq!(
        call_str(&mut con, &["INCRBYFLOAT", "g", "2.0e2"]),
        bulk("5200")
    );
    assert_eq!(
        call_str(&mut con, &["INCRBYFLOAT", "new-float", "3"]),
        bulk("3")
    );
    assert_eq!(
        call_str(&mut con, &["INCRBYFLOAT", "n", "1.5"]),
        bulk("-2.5"),
        "integers are valid floats"
    );
    assert_eq!(
        error_text(&call_str(&mut con, &["INCRBYFLOAT", "f", "abc"])),
        "ERR value is not a valid float"
    );
    assert_eq!(call_str(&mut con, &["SET", "word", "abc"]), Value::Okay);
    assert_eq!(
        error_text(&call_str(&mut con, &["INCRBYFLOAT", "word", "1"])),
        "ERR value is not a valid float"
    );
}

#[test]
fn append_and_strlen() {
    let server = Server::start("");
    let mut con = server.conn();
    assert_eq!(call_str(&mut con, &["STRLEN", "a"]), Value::Int(0));
    assert_eq!(call_str(&mut con, &["APPEND", "a", "Hello"]), Value::Int(5));
    assert_eq!(
        call_str(&mut con, &["APPEND", "a", " World"]),
        Value::Int(11)
    );
    assert_eq!(get(&mut con, "a").as_deref(), Some("Hello World"));
    assert_eq!(call_str(&mut con, &["STRLEN", "a"]), Value::Int(11));
    assert_eq!(call_str(&mut con, &["APPEND", "a", ""]), Value::Int(11));
    assert_eq!(
        call(&mut con, &[b"APPEND", b"b", b"\x00\xff"]),
        Value::Int(2)
    );
    assert_eq!(call(&mut con, &[b"STRLEN", b"b"]), Value::Int(2));

    // APPEND and INCR work on the same string.
    assert_eq!(call_str(&mut con, &["INCR", "c"]), Value::Int(1));
    assert_eq!(call_str(&mut con, &["APPEND", "c", "0"]), Value::Int(2));
    assert_eq!(call_str(&mut con, &["INCR", "c"]), Value::Int(11));
}

#[test]
fn dbsize_and_select_isolate_collections() {
    let server = Server::start("");
    let mut con = server.conn();
    assert_eq!(call_str(&mut con, &["DBSIZE"]), Value::Int(0));
    for i in 0..20 {
        assert_eq!(
            call_str(&mut con, &["SET", &format!("k{i}"), "zero"]),
            Value::Okay
        );
    }
    assert_eq!(
        call_str(&mut con, &["SET", "k0", "again"]),
        Value::Okay,
        "an overwrite adds no key"
    );
    assert_eq!(call_str(&mut con, &["DBSIZE"]), Value::Int(20));
    assert_eq!(
        call_str(&mut con, &["DEL", "k0", "k1", "k2", "k3", "k4"]),
        Value::Int(5)
    );
    assert_eq!(call_str(&mut con, &["DBSIZE"]), Value::Int(15));

    assert_eq!(call_str(&mut con, &["SELECT", "1"]), Value::Okay);
    assert_eq!(call_str(&mut con, &["DBSIZE"]), Value::Int(0));
    assert_eq!(
        get(&mut con, "k10"),
        None,
        "collection 1 does not see collection 0"
    );
    assert_eq!(call_str(&mut con, &["SET", "k10", "one"]), Value::Okay);
    assert_eq!(
        call_str(&mut con, &["SET", "only-in-1", "one"]),
        Value::Okay
    );
    assert_eq!(call_str(&mut con, &["DBSIZE"]), Value::Int(2));
    assert_eq!(call_str(&mut con, &["SELECT", "0"]), Value::Okay);
    assert_eq!(get(&mut con, "k10").as_deref(), Some("zero"));
    assert_eq!(get(&mut con, "only-in-1"), None);
    assert_eq!(call_str(&mut con, &["DEL", "k10"]), Value::Int(1));
    assert_eq!(call_str(&mut con, &["DBSIZE"]), Value::Int(14));

    // The selected collection belongs to the connection.
    let mut other = connect(&redis::Client::open(server.url("1")).expect("client"));
    assert_eq!(
        get(&mut other, "k10").as_deref(),
        Some("one"),
        "deleting in collection 0 left collection 1 alone"
    );
    assert_eq!(call_str(&mut other, &["DBSIZE"]), Value::Int(2));
    assert_eq!(get(&mut con, "k10"), None);

    assert_eq!(
        call_str(&mut con, &["SELECT", "15"]),
        Value::Okay,
        "16 collections by default"
    );
    assert_eq!(
        error_text(&call_str(&mut con, &["SELECT", "16"])),
        "ERR DB index is out of range"
    );
    assert_eq!(
        error_text(&call_str(&mut con, &["SELECT", "-1"])),
        "ERR DB index is out of range"
    );
    assert_eq!(
        error_text(&call_str(&mut con, &["SELECT", "one"])),
        "ERR value is not an integer or out of range"
    );
    assert_eq!(
        call_str(&mut con, &["DBSIZE"]),
        Value::Int(0),
        "a failed SELECT keeps collection 15"
    );
}

#[test]
fn client_commands() {
    let server = Server::start("");
    let mut con = server.conn();
    assert_eq!(call_str(&mut con, &["CLIENT", "GETNAME"]), Value::Nil);
    assert_eq!(
        call_str(&mut con, &["CLIENT", "SETNAME", "worker-7"]),
        Value::Okay
    );
    assert_eq!(call_str(&mut con, &["CLIENT", "GETNAME"]), bulk("worker-7"));
    assert_eq!(
        call_str(&mut con, &["CLIENT", "SETINFO", "LIB-NAME", "shoal-tests"]),
        Value::Okay
    );
    assert_eq!(
        call_str(&mut con, &["CLIENT", "SETINFO", "LIB-VER", "1.0"]),
        Value::Okay
    );
    let Value::Int(id1) = call_str(&mut con, &["CLIENT", "ID"]) else {
        panic!("CLIENT ID is an integer")
    };
    let mut other = server.conn();
    let Value::Int(id2) = call_str(&mut other, &["CLIENT", "ID"]) else {
        panic!("CLIENT ID is an integer")
    };
    assert!(id1 > 0 && id2 > 0 && id1 != id2, "ids {id1} and {id2}");
    assert_eq!(
        call_str(&mut con, &["CLIENT", "ID"]),
        Value::Int(id1),
        "the id is stable"
    );
    assert_eq!(
        call_str(&mut other, &["CLIENT", "GETNAME"]),
        Value::Nil,
        "names are per connection"
    );
}

#[test]
fn wait_readonly_and_readwrite_on_a_host_on_its_own() {
    let server = Server::start("");
    let mut con = server.conn();
    assert_eq!(call_str(&mut con, &["SET", "k", "v"]), Value::Okay);
    // No replicas: none holds the write; asking for none answers at once.
    assert_eq!(call_str(&mut con, &["WAIT", "0", "0"]), Value::Int(0));
    let started = std::time::Instant::now();
    assert_eq!(call_str(&mut con, &["WAIT", "1", "150"]), Value::Int(0));
    assert!(
        started.elapsed() >= std::time::Duration::from_millis(150),
        "WAIT for more replicas than there are waits out its timeout"
    );
    let negative = call_str(&mut con, &["WAIT", "1", "-5"]);
    assert_eq!(error_text(&negative), "ERR timeout is negative");
    let not_number = call_str(&mut con, &["WAIT", "x", "10"]);
    assert!(
        error_text(&not_number).contains("not an integer"),
        "{not_number:?}"
    );
    // READONLY changes nothing on one host: reads go to the only copy.
    assert_eq!(call_str(&mut con, &["READONLY"]), Value::Okay);
    assert_eq!(get(&mut con, "k").as_deref(), Some("v"));
    assert_eq!(call_str(&mut con, &["READWRITE"]), Value::Okay);
    assert_eq!(get(&mut con, "k").as_deref(), Some("v"));
}

#[test]
fn hello_switches_between_resp2_and_resp3() {
    let server = Server::start("");
    let mut raw = server.raw();
    assert_eq!(
        raw.cmd(&["GET", "missing"]),
        Resp::NilBulk,
        "RESP2 nil is $-1"
    );

    // HELLO with no version answers in the current protocol (a flat array in RESP2).
    let hello = raw.cmd(&["HELLO"]);
    let fields = hello.array();
    let proto = fields
        .chunks(2)
        .find(|pair| pair[0] == Resp::Bulk(b"proto".to_vec()));
    assert_eq!(
        proto.map(|pair| pair[1].clone()),
        Some(Resp::Int(2)),
        "{hello:?}"
    );

    let hello3 = raw.cmd(&["HELLO", "3", "SETNAME", "resp3-client"]);
    let Resp::Map(pairs) = &hello3 else {
        panic!("HELLO 3 replies with a map, got {hello3:?}")
    };
    let field = |name: &str| {
        pairs
            .iter()
            .find(|(k, _)| k.bytes() == name.as_bytes())
            .map(|(_, v)| v.clone())
    };
    assert_eq!(field("proto"), Some(Resp::Int(3)));
    assert!(
        matches!(field("id"), Some(Resp::Int(id)) if id > 0),
        "{hello3:?}"
    );
    assert!(field("server").is_some(), "{hello3:?}");
    assert_eq!(raw.cmd(&["GET", "missing"]), Resp::Null, "RESP3 nil is _");
    assert_eq!(
        raw.cmd(&["CLIENT", "GETNAME"]),
        Resp::Bulk(b"resp3-client".to_vec())
    );
    assert_eq!(raw.cmd(&["SET", "k", "v"]), Resp::Simple("OK".into()));
    assert_eq!(
        raw.cmd(&["MGET", "k", "missing"]),
        Resp::Array(vec![Resp::Bulk(b"v".to_vec()), Resp::Null])
    );
    assert_eq!(raw.cmd(&["INCR", "n"]), Resp::Int(1));

    assert!(
        raw.cmd(&["HELLO", "4"]).is_error(),
        "unsupported protocol versions are refused"
    );
    assert_eq!(
        raw.cmd(&["GET", "missing"]),
        Resp::Null,
        "a refused HELLO keeps RESP3"
    );
    assert!(matches!(raw.cmd(&["HELLO", "2"]), Resp::Array(_)));
    assert_eq!(raw.cmd(&["GET", "missing"]), Resp::NilBulk, "back to RESP2");

    // The redis crate in RESP3 mode.
    let client = redis::Client::open(server.url("?protocol=resp3")).expect("client");
    let mut con = connect(&client);
    let Value::Map(pairs) = call_str(&mut con, &["HELLO", "3"]) else {
        panic!("HELLO 3 is a map")
    };
    assert!(pairs.contains(&(bulk("proto"), Value::Int(3))), "{pairs:?}");
    assert_eq!(get(&mut con, "missing"), None);
    assert_eq!(call_str(&mut con, &["GET", "missing"]), Value::Nil);
    assert_eq!(get(&mut con, "k").as_deref(), Some("v"));
    let values: Vec<Option<String>> = redis::cmd("MGET")
        .arg("k")
        .arg("missing")
        .query(&mut con)
        .expect("MGET");
    assert_eq!(values, vec![Some("v".to_string()), None]);
}

#[test]
fn auth_with_requirepass() {
    let server = Server::start("[client]\nrequirepass = \"s3cret\"\n");
    let mut raw = server.raw();
    assert_eq!(
        raw.cmd(&["GET", "k"]).error(),
        "NOAUTH Authentication required."
    );
    assert_eq!(
        raw.cmd(&["SET", "k", "v"]).error(),
        "NOAUTH Authentication required."
    );
    let wrongpass = "WRONGPASS invalid username-password pair or user is disabled.";
    assert_eq!(raw.cmd(&["AUTH", "nope"]).error(), wrongpass);
    assert_eq!(raw.cmd(&["AUTH", "default", "nope"]).error(), wrongpass);
    assert_eq!(
        raw.cmd(&["GET", "k"]).error(),
        "NOAUTH Authentication required."
    );
    assert_eq!(raw.cmd(&["AUTH", "s3cret"]), Resp::Simple("OK".into()));
    assert_eq!(raw.cmd(&["SET", "k", "v"]), Resp::Simple("OK".into()));
    assert_eq!(raw.cmd(&["GET", "k"]), Resp::Bulk(b"v".to_vec()));

    let mut raw2 = server.raw();
    assert_eq!(
        raw2.cmd(&["AUTH", "default", "s3cret"]),
        Resp::Simple("OK".into())
    );
    assert_eq!(raw2.cmd(&["GET", "k"]), Resp::Bulk(b"v".to_vec()));

    let mut raw3 = server.raw();
    assert!(raw3
        .cmd(&["HELLO", "3", "AUTH", "default", "nope"])
        .error()
        .starts_with("WRONGPASS"));
    assert_eq!(
        raw3.cmd(&["GET", "k"]).error(),
        "NOAUTH Authentication required."
    );
    assert!(matches!(
        raw3.cmd(&["HELLO", "3", "AUTH", "default", "s3cret"]),
        Resp::Map(_)
    ));
    assert_eq!(raw3.cmd(&["GET", "k"]), Resp::Bulk(b"v".to_vec()));

    // The Unix socket asks for the password too.
    let mut unix = common::RawConn::unix(&server.unix_socket());
    assert_eq!(
        unix.cmd(&["GET", "k"]).error(),
        "NOAUTH Authentication required."
    );

    // The redis crate, with and without the password in the URL.
    let mut con = connect(
        &redis::Client::open(format!("redis://:s3cret@127.0.0.1:{}/", server.port))
            .expect("client"),
    );
    assert_eq!(get(&mut con, "k").as_deref(), Some("v"));
    let mut con = connect(
        &redis::Client::open(format!(
            "redis://default:s3cret@127.0.0.1:{}/?protocol=resp3",
            server.port
        ))
        .expect("client"),
    );
    assert_eq!(get(&mut con, "k").as_deref(), Some("v"));
    let mut anonymous = server.conn();
    assert!(error_text(&call_str(&mut anonymous, &["GET", "k"])).starts_with("NOAUTH"));
}

#[test]
fn command_lists_and_describes_every_command() {
    let server = Server::start("");
    let mut con = server.conn();

    // COMMAND, enough for redis-cli and client libraries.
    let Value::Int(count) = call_str(&mut con, &["COMMAND", "COUNT"]) else {
        panic!("COMMAND COUNT is an integer")
    };
    let Value::Array(all) = call_str(&mut con, &["COMMAND"]) else {
        panic!("COMMAND is an array")
    };
    assert_eq!(all.len() as i64, count);
    let names: Vec<String> = all
        .iter()
        .map(|entry| match entry {
            Value::Array(fields) => match &fields[0] {
                Value::BulkString(name) => String::from_utf8_lossy(name).to_lowercase(),
                other => panic!("command name {other:?}"),
            },
            other => panic!("COMMAND entry {other:?}"),
        })
        .collect();
    for name in [
        "ping",
        "echo",
        "hello",
        "auth",
        "select",
        "client",
        "quit",
        "command",
        "config",
        "info",
        "dbsize",
        "get",
        "set",
        "setnx",
        "getset",
        "getdel",
        "del",
        "unlink",
        "exists",
        "mget",
        "incr",
        "decr",
        "incrby",
        "decrby",
        "incrbyfloat",
        "append",
        "strlen",
        "shoal.log",
        "shoal.partition",
    ] {
        assert!(
            names.iter().any(|n| n == name),
            "COMMAND lacks {name}: {names:?}"
        );
    }
    let Value::Array(info) = call_str(
        &mut con,
        &["COMMAND", "INFO", "get", "set", "no-such-command"],
    ) else {
        panic!("COMMAND INFO is an array")
    };
    assert_eq!(info.len(), 3);
    let head = |entry: &Value| match entry {
        Value::Array(fields) => (fields[0].clone(), fields[1].clone()),
        other => panic!("COMMAND INFO entry {other:?}"),
    };
    assert_eq!(head(&info[0]), (bulk("get"), Value::Int(2)));
    assert_eq!(head(&info[1]), (bulk("set"), Value::Int(-3)));
    assert_eq!(info[2], Value::Nil);
    let docs = call_str(&mut con, &["COMMAND", "DOCS", "get"]);
    assert!(
        format!("{docs:?}").contains("get"),
        "COMMAND DOCS get: {docs:?}"
    );
    assert!(
        !matches!(docs, Value::ServerError(_)),
        "COMMAND DOCS get: {docs:?}"
    );
}

#[test]
fn config_get_answers_and_config_set_changes_what_can_change_at_run_time() {
    let server = Server::start("");
    let mut con = server.conn();
    let config_get = |con: &mut redis::Connection, pattern: &str| -> Vec<(String, String)> {
        let flat: Vec<String> = redis::cmd("CONFIG")
            .arg("GET")
            .arg(pattern)
            .query(con)
            .expect("CONFIG GET");
        flat.chunks(2)
            .map(|pair| (pair[0].clone(), pair[1].clone()))
            .collect()
    };
    assert_eq!(
        config_get(&mut con, "save"),
        vec![("save".to_string(), String::new())]
    );
    assert_eq!(
        config_get(&mut con, "maxclients"),
        vec![("maxclients".to_string(), "10000".to_string())]
    );
    assert_eq!(
        config_get(&mut con, "databases"),
        vec![("databases".to_string(), "16".to_string())]
    );
    assert!(config_get(&mut con, "max*")
        .iter()
        .any(|(k, _)| k == "maxclients"));
    let everything: Vec<String> = config_get(&mut con, "*")
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    for name in ["save", "appendonly", "maxclients", "databases"] {
        assert!(
            everything.iter().any(|k| k == name),
            "CONFIG GET * lacks {name}: {everything:?}"
        );
    }
    assert!(config_get(&mut con, "no-such-parameter").is_empty());
    // A setting fixed at startup is refused unless "set" to its value; an unknown one
    // gets Redis's error; several pairs are all or nothing.
    let refused = call_str(&mut con, &["CONFIG", "SET", "maxclients", "1"]);
    assert!(error_text(&refused).contains("restart"), "{refused:?}");
    assert_eq!(
        call_str(
            &mut con,
            &["CONFIG", "SET", "save", "", "appendonly", "yes"]
        ),
        Value::Okay
    );
    let unknown = call_str(&mut con, &["CONFIG", "SET", "no-such-parameter", "1"]);
    assert!(error_text(&unknown).contains("Unknown option"));
    let odd = call_str(&mut con, &["CONFIG", "SET", "save"]);
    assert!(error_text(&odd).contains("wrong number of arguments"));
    let mixed = call_str(
        &mut con,
        &["CONFIG", "SET", "requirepass", "s3", "maxclients", "1"],
    );
    assert!(matches!(mixed, Value::ServerError(_)));
    assert_eq!(
        config_get(&mut con, "requirepass"),
        vec![("requirepass".to_string(), String::new())],
        "a refused CONFIG SET changes nothing"
    );
    // requirepass changes at run time: new connections must AUTH, this one stays in.
    assert_eq!(
        call_str(&mut con, &["CONFIG", "SET", "requirepass", "s3cret"]),
        Value::Okay
    );
    let mut fresh = server.raw();
    assert!(matches!(fresh.cmd(&["GET", "k"]), Resp::Error(text) if text.starts_with("NOAUTH")));
    assert_eq!(fresh.cmd(&["AUTH", "s3cret"]), Resp::Simple("OK".into()));
    assert_eq!(
        call_str(&mut con, &["PING"]),
        Value::SimpleString("PONG".into())
    );
    assert_eq!(
        call_str(&mut con, &["CONFIG", "SET", "requirepass", ""]),
        Value::Okay
    );
    let mut open = server.raw();
    assert_eq!(open.cmd(&["PING"]), Resp::Simple("PONG".into()));
    // Shoal has no AOF, but with durability = "fsync" every acknowledged write is synced:
    // the Redis settings that mean the same are reported.
    assert_eq!(
        config_get(&mut con, "appendonly"),
        vec![("appendonly".to_string(), "yes".to_string())]
    );
    assert_eq!(
        config_get(&mut con, "appendfsync"),
        vec![("appendfsync".to_string(), "always".to_string())]
    );
}

#[test]
fn info_sections() {
    let server = Server::start("");
    let mut con = server.conn();
    let _second = server.conn();
    for i in 0..3 {
        assert_eq!(
            call_str(&mut con, &["SET", &format!("info-key-{i}"), "v"]),
            Value::Okay
        );
    }
    let info: String = redis::cmd("INFO").query(&mut con).expect("INFO");
    let headers: Vec<String> = info
        .lines()
        .filter(|l| l.starts_with("# "))
        .map(|l| l[2..].trim().to_lowercase())
        .collect();
    for section in ["server", "clients", "persistence", "keyspace", "shards"] {
        assert!(
            headers.iter().any(|h| h == section),
            "INFO lacks section {section}: {headers:?}"
        );
    }
    let keyspace: String = redis::cmd("INFO")
        .arg("keyspace")
        .query(&mut con)
        .expect("INFO keyspace");
    let db0 = keyspace
        .lines()
        .find(|l| l.starts_with("db0:"))
        .unwrap_or_else(|| panic!("no db0 line in {keyspace}"));
    assert!(
        db0.starts_with("db0:keys=3,") || db0 == "db0:keys=3",
        "{db0}"
    );
    assert!(
        !keyspace.contains("# Server"),
        "INFO keyspace shows only that section: {keyspace}"
    );
    let field = |text: &str, name: &str| -> Option<String> {
        text.lines().find_map(|l| {
            l.strip_prefix(&format!("{name}:"))
                .map(|v| v.trim().to_string())
        })
    };
    let clients: String = redis::cmd("INFO")
        .arg("clients")
        .query(&mut con)
        .expect("INFO clients");
    let connected: u64 = field(&clients, "connected_clients")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert!(connected >= 2, "two connections are open: {clients}");
    let server_section: String = redis::cmd("INFO")
        .arg("server")
        .query(&mut con)
        .expect("INFO server");
    assert_eq!(
        field(&server_section, "tcp_port"),
        Some(server.port.to_string()),
        "{server_section}"
    );
    let persistence: String = redis::cmd("INFO")
        .arg("persistence")
        .query(&mut con)
        .expect("INFO persistence");
    assert!(persistence.contains("# Persistence"), "{persistence}");

    let shards: String = redis::cmd("INFO")
        .arg("shards")
        .query(&mut con)
        .expect("INFO shards");
    let status = server.status_json().expect("status");
    for index in 0..2u64 {
        let line = shards
            .lines()
            .find(|l| l.starts_with(&format!("shard{index}:")))
            .unwrap_or_else(|| panic!("no shard{index} line in {shards}"));
        let fields: std::collections::HashMap<&str, &str> = line
            .split_once(':')
            .unwrap()
            .1
            .trim()
            .split(',')
            .filter_map(|f| f.split_once('='))
            .collect();
        let pid = common::find_process(&status, "shard-worker", index).expect("worker in status")
            ["pid"]
            .as_i64();
        assert_eq!(
            fields.get("pid").and_then(|p| p.parse::<i64>().ok()),
            pid,
            "{line}"
        );
        assert_eq!(fields.get("state"), Some(&"ready"), "{line}");
        assert_eq!(fields.get("restarts"), Some(&"0"), "{line}");
        assert_eq!(
            fields.get("partitions"),
            Some(&"128"),
            "256 partitions over 2 workers: {line}"
        );
        assert!(
            fields
                .get("last_commit_id")
                .and_then(|c| c.parse::<u64>().ok())
                .is_some(),
            "{line}"
        );
    }
}

#[test]
fn pipeline_of_1000_commands_replies_in_order() {
    let server = Server::start("");
    let mut con = server.conn();
    let mut pipe = redis::pipe();
    for i in 0..333 {
        pipe.cmd("SET")
            .arg(format!("pipe:{i}"))
            .arg(format!("value-{i}"));
        pipe.cmd("GET").arg(format!("pipe:{i}"));
        pipe.cmd("INCR").arg("pipe:counter");
    }
    pipe.cmd("GET").arg("pipe:counter");
    let replies: Vec<Value> = pipe.query(&mut con).expect("pipeline");
    assert_eq!(replies.len(), 1000);
    for i in 0..333 {
        assert_eq!(replies[3 * i], Value::Okay, "reply {}", 3 * i);
        assert_eq!(
            replies[3 * i + 1],
            bulk(&format!("value-{i}")),
            "reply {}",
            3 * i + 1
        );
        assert_eq!(
            replies[3 * i + 2],
            Value::Int(i as i64 + 1),
            "reply {}",
            3 * i + 2
        );
    }
    assert_eq!(replies[999], bulk("333"));

    // The same on a raw socket, written in one go: 1000 replies, in order, across both workers.
    let mut raw = server.raw();
    let mut bytes = Vec::new();
    for i in 0..1000 {
        let key = format!("raw:{i}");
        if i % 2 == 0 {
            bytes.extend(common::encode_command(&[
                b"SET",
                key.as_bytes(),
                format!("{i}").as_bytes(),
            ]));
        } else {
            bytes.extend(common::encode_command(&[
                b"GET",
                format!("pipe:{}", i % 333).as_bytes(),
            ]));
        }
    }
    raw.send(&bytes);
    for i in 0..1000 {
        let reply = raw.read_reply().expect("pipelined reply");
        if i % 2 == 0 {
            assert_eq!(reply, Resp::Simple("OK".into()), "reply {i}");
        } else {
            assert_eq!(
                reply,
                Resp::Bulk(format!("value-{}", i % 333).into_bytes()),
                "reply {i}"
            );
        }
    }
    assert_eq!(raw.cmd(&["GET", "raw:998"]), Resp::Bulk(b"998".to_vec()));
}

#[test]
fn unix_socket_serves_the_same_data() {
    let server = Server::start("");
    let socket = server.unix_socket();
    assert!(
        socket.exists(),
        "default Unix socket {} exists",
        socket.display()
    );
    let mut unix = common::RawConn::unix(&socket);
    assert_eq!(unix.cmd(&["PING"]), Resp::Simple("PONG".into()));
    assert_eq!(
        unix.cmd(&["SET", "via-unix", "1"]),
        Resp::Simple("OK".into())
    );
    let mut tcp = server.conn();
    assert_eq!(get(&mut tcp, "via-unix").as_deref(), Some("1"));
    assert_eq!(call_str(&mut tcp, &["SET", "via-tcp", "2"]), Value::Okay);

    let client =
        redis::Client::open(format!("redis+unix://{}", socket.display())).expect("unix client");
    let mut con = connect(&client);
    assert_eq!(get(&mut con, "via-tcp").as_deref(), Some("2"));
    assert_eq!(call_str(&mut con, &["INCR", "via-unix"]), Value::Int(2));
}

#[test]
fn custom_unix_socket_path_and_disabled_socket() {
    let dir = tempfile::tempdir().expect("temp dir");
    let socket = dir.path().join("custom.sock");
    let server = Server::start(&format!(
        "[client]\nunix_socket = {:?}\n",
        socket.display().to_string()
    ));
    let mut unix = common::RawConn::unix(&socket);
    assert_eq!(unix.cmd(&["PING"]), Resp::Simple("PONG".into()));
    assert!(
        !server.unix_socket().exists(),
        "no socket at the default path when another is configured"
    );

    let server = Server::start("[client]\nunix_socket = \"\"\n");
    assert!(
        !server.unix_socket().exists(),
        "unix_socket = \"\" disables the socket"
    );
    assert_eq!(server.raw().cmd(&["PING"]), Resp::Simple("PONG".into()));
}

#[test]
fn partitions_follow_redis_cluster_slots() {
    let server = Server::start("[storage]\npartitions = 64\n");
    let mut con = server.conn();
    let mut keys: Vec<Vec<u8>> = [
        "foo",
        "bar",
        "123456789",
        "{user1000}.following",
        "user1000",
        "a{}b",
        "{}",
        "x{y}z",
    ]
    .iter()
    .map(|k| k.as_bytes().to_vec())
    .collect();
    keys.extend((0..200).map(|i| format!("key:{i}").into_bytes()));
    for key in &keys {
        let expected = key_partition(key, 64);
        assert_eq!(
            call(&mut con, &[b"SHOAL.PARTITION", key]),
            Value::Int(i64::from(expected)),
            "{:?}",
            String::from_utf8_lossy(key)
        );
    }
    // Keys with the same hash tag share a partition.
    let a = call_str(&mut con, &["SHOAL.PARTITION", "{user1000}.following"]);
    let b = call_str(&mut con, &["SHOAL.PARTITION", "{user1000}.followers"]);
    assert_eq!(a, b);

    // Each worker owns the partitions p with p mod workers = its index.
    let status = server.status_json().expect("status");
    assert_eq!(status["partitions"], 64);
    for index in 0..2u64 {
        let worker = common::find_process(&status, "shard-worker", index).expect("worker");
        let owned: Vec<u64> = worker["partitions"]
            .as_array()
            .expect("partitions")
            .iter()
            .filter_map(|p| p.as_u64())
            .collect();
        let expected: Vec<u64> = (0..64).filter(|p| p % 2 == index).collect();
        assert_eq!(owned, expected, "worker {index}");
    }
}

#[test]
fn time_lastsave_reset_function_debug_and_resetstat() {
    let server = Server::start("");
    let mut con = server.conn();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    // TIME: seconds and microseconds, as bulk strings.
    let Value::Array(parts) = call_str(&mut con, &["TIME"]) else {
        panic!("TIME is an array")
    };
    let number = |v: &Value| match v {
        Value::BulkString(bytes) => String::from_utf8_lossy(bytes).parse::<i64>().unwrap(),
        other => panic!("not a bulk number: {other:?}"),
    };
    assert!((number(&parts[0]) - now).abs() <= 2, "{parts:?}");
    assert!((0..1_000_000).contains(&number(&parts[1])));
    // LASTSAVE: the server's start, in the past.
    let Value::Int(saved) = call_str(&mut con, &["LASTSAVE"]) else {
        panic!("LASTSAVE is an integer")
    };
    assert!(
        saved <= now + 1 && saved > now - 300,
        "LASTSAVE {saved}, now {now}"
    );
    // RESET: back to RESP2, collection 0, no name, READWRITE.
    assert_eq!(call_str(&mut con, &["SELECT", "1"]), Value::Okay);
    assert_eq!(call_str(&mut con, &["SET", "in-1", "x"]), Value::Okay);
    assert_eq!(call_str(&mut con, &["CLIENT", "SETNAME", "n"]), Value::Okay);
    assert_eq!(call_str(&mut con, &["READONLY"]), Value::Okay);
    assert_eq!(
        call_str(&mut con, &["RESET"]),
        Value::SimpleString("RESET".into())
    );
    assert_eq!(get(&mut con, "in-1"), None, "back in collection 0");
    assert_eq!(call_str(&mut con, &["CLIENT", "GETNAME"]), Value::Nil);
    // FUNCTION: nothing to flush or list. DEBUG SLEEP 0 answers at once.
    assert_eq!(call_str(&mut con, &["FUNCTION", "FLUSH"]), Value::Okay);
    assert_eq!(
        call_str(&mut con, &["FUNCTION", "LIST"]),
        Value::Array(vec![])
    );
    assert_eq!(call_str(&mut con, &["DEBUG", "SLEEP", "0"]), Value::Okay);
    let unsupported = call_str(&mut con, &["DEBUG", "OBJECT", "k"]);
    assert!(
        error_text(&unsupported).contains("not supported"),
        "{unsupported:?}"
    );
    // CONFIG RESETSTAT clears INFO commandstats.
    let stats = |con: &mut redis::Connection| -> String {
        match call_str(con, &["INFO", "commandstats"]) {
            Value::BulkString(text) => String::from_utf8_lossy(&text).into_owned(),
            Value::VerbatimString { text, .. } => text,
            other => panic!("INFO: {other:?}"),
        }
    };
    assert!(stats(&mut con).contains("cmdstat_select"));
    assert_eq!(call_str(&mut con, &["CONFIG", "RESETSTAT"]), Value::Okay);
    assert!(
        !stats(&mut con).contains("cmdstat_select"),
        "{}",
        stats(&mut con)
    );
}

#[test]
fn shutdown_stops_the_host_and_keeps_its_data() {
    let mut server = Server::start("[client]\nrequirepass = \"sesame\"\n");
    let mut raw = server.raw();
    // Without AUTH, SHUTDOWN is refused like any command.
    assert!(matches!(raw.cmd(&["SHUTDOWN"]), Resp::Error(e) if e.starts_with("NOAUTH")));
    assert_eq!(raw.cmd(&["AUTH", "sesame"]), Resp::Simple("OK".into()));
    assert_eq!(raw.cmd(&["SET", "kept", "yes"]), Resp::Simple("OK".into()));
    assert_eq!(
        raw.cmd(&["SHUTDOWN", "ABORT"]),
        Resp::Error("ERR No shutdown in progress.".into())
    );
    assert_eq!(
        raw.cmd(&["SHUTDOWN", "LATER"]),
        Resp::Error("ERR syntax error".into())
    );
    // SHUTDOWN answers nothing: the connection closes and the host stops cleanly.
    raw.send(b"*2\r\n$8\r\nSHUTDOWN\r\n$6\r\nNOSAVE\r\n");
    assert!(raw.read_reply().is_err(), "SHUTDOWN must not reply");
    let status = server
        .wait_exit(std::time::Duration::from_secs(30))
        .expect("the host stops after SHUTDOWN");
    assert!(status.success(), "exit status {status:?}");
    server.restart();
    let mut raw = server.raw();
    assert_eq!(raw.cmd(&["AUTH", "sesame"]), Resp::Simple("OK".into()));
    assert_eq!(raw.cmd(&["GET", "kept"]), Resp::Bulk(b"yes".to_vec()));
}

#[test]
fn dump_and_restore_with_shoals_payload() {
    let server = Server::start("");
    let mut con = server.conn();
    let value = "bin\u{0}ary SH\u{1} value";
    assert_eq!(call_str(&mut con, &["SET", "src", value]), Value::Okay);
    assert_eq!(call_str(&mut con, &["DUMP", "missing"]), Value::Nil);
    let Value::BulkString(payload) = call_str(&mut con, &["DUMP", "src"]) else {
        panic!("DUMP answers a bulk string")
    };
    let restore =
        |con: &mut redis::Connection, key: &str, ttl: &str, payload: &[u8], options: &[&str]| {
            let mut args: Vec<&[u8]> = vec![b"RESTORE", key.as_bytes(), ttl.as_bytes(), payload];
            args.extend(options.iter().map(|option| option.as_bytes()));
            call(con, &args)
        };
    assert_eq!(restore(&mut con, "dst", "0", &payload, &[]), Value::Okay);
    assert_eq!(get(&mut con, "dst").as_deref(), Some(value));
    assert_eq!(call_str(&mut con, &["TTL", "dst"]), Value::Int(-1));
    // An existing key needs REPLACE; the TTL is relative unless ABSTTL.
    let busy = restore(&mut con, "dst", "0", &payload, &[]);
    assert_eq!(error_text(&busy), "BUSYKEY Target key name already exists.");
    assert_eq!(
        restore(&mut con, "dst", "5000", &payload, &["REPLACE"]),
        Value::Okay
    );
    let Value::Int(pttl) = call_str(&mut con, &["PTTL", "dst"]) else {
        panic!("PTTL is an integer")
    };
    assert!((1..=5000).contains(&pttl), "PTTL {pttl}");
    // An absolute TTL in the past stores nothing.
    assert_eq!(
        restore(&mut con, "gone", "1", &payload, &["ABSTTL"]),
        Value::Okay
    );
    assert_eq!(call_str(&mut con, &["EXISTS", "gone"]), Value::Int(0));
    // Errors, as Redis words them.
    let mut changed = payload.clone();
    changed[1] ^= 1;
    let wrong = restore(&mut con, "other", "0", &changed, &[]);
    assert_eq!(
        error_text(&wrong),
        "ERR DUMP payload version or checksum are wrong"
    );
    let redis_payload = b"\x00\x03bar\n\x00\xa8\xe3\x1b\xf4\xb4\xd2\x88\xe9";
    let foreign = restore(&mut con, "other", "0", redis_payload, &[]);
    assert_eq!(
        error_text(&foreign),
        "ERR DUMP payload version or checksum are wrong"
    );
    let negative = restore(&mut con, "other", "-1", &payload, &[]);
    assert_eq!(error_text(&negative), "ERR Invalid TTL value, must be >= 0");
    let idle = restore(&mut con, "other", "0", &payload, &["IDLETIME", "-1"]);
    assert_eq!(
        error_text(&idle),
        "ERR Invalid IDLETIME value, must be >= 0"
    );
    let freq = restore(&mut con, "other", "0", &payload, &["FREQ", "256"]);
    assert_eq!(
        error_text(&freq),
        "ERR Invalid FREQ value, must be >= 0 and <= 255"
    );
    let option = restore(&mut con, "other", "0", &payload, &["SOMETIME"]);
    assert_eq!(error_text(&option), "ERR syntax error");
    assert_eq!(call_str(&mut con, &["EXISTS", "other"]), Value::Int(0));
    // MOVE takes the key, with its TTL, to another collection.
    assert_eq!(call_str(&mut con, &["MOVE", "dst", "1"]), Value::Int(1));
    assert_eq!(call_str(&mut con, &["MOVE", "dst", "1"]), Value::Int(0));
    assert_eq!(call_str(&mut con, &["SELECT", "1"]), Value::Okay);
    assert_eq!(get(&mut con, "dst").as_deref(), Some(value));
    let Value::Int(pttl) = call_str(&mut con, &["PTTL", "dst"]) else {
        panic!("PTTL is an integer")
    };
    assert!((1..=5000).contains(&pttl), "the TTL moved too: {pttl}");
}

#[test]
fn client_list_info_and_kill() {
    let server = Server::start("");
    let mut me = server.conn();
    let mut other = server.conn();
    assert_eq!(call_str(&mut me, &["CLIENT", "SETNAME", "me"]), Value::Okay);
    assert_eq!(
        call_str(&mut me, &["CLIENT", "SETINFO", "LIB-NAME", "tests"]),
        Value::Okay
    );
    assert_eq!(call_str(&mut other, &["SELECT", "1"]), Value::Okay);
    let text = |value: Value| match value {
        Value::BulkString(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        Value::VerbatimString { text, .. } => text,
        other => panic!("not text: {other:?}"),
    };
    let Value::Int(other_id) = call_str(&mut other, &["CLIENT", "ID"]) else {
        panic!("CLIENT ID is an integer")
    };
    let list = text(call_str(&mut me, &["CLIENT", "LIST"]));
    let lines: Vec<&str> = list.lines().collect();
    assert_eq!(lines.len(), 2, "{list}");
    let mine = lines
        .iter()
        .find(|l| l.contains(" name=me "))
        .expect("my line");
    assert!(
        mine.contains(" lib-name=tests") && mine.contains(" cmd=client"),
        "{mine}"
    );
    let theirs = lines
        .iter()
        .find(|l| l.starts_with(&format!("id={other_id} ")))
        .expect("the other line");
    assert!(
        theirs.contains(" db=1 ") && theirs.contains(" addr=127.0.0.1:"),
        "{theirs}"
    );
    // CLIENT INFO: this connection's line only, showing CLIENT as its command even
    // right after another one.
    assert_eq!(
        call_str(&mut me, &["PING"]),
        Value::SimpleString("PONG".into())
    );
    let info = text(call_str(&mut me, &["CLIENT", "INFO"]));
    assert!(
        info.contains(" name=me ") && info.contains(" cmd=client ") && info.lines().count() == 1,
        "{info}"
    );
    let only = text(call_str(
        &mut me,
        &["CLIENT", "LIST", "ID", &other_id.to_string()],
    ));
    assert_eq!(only.lines().count(), 1, "{only}");
    assert_eq!(
        text(call_str(&mut me, &["CLIENT", "LIST", "TYPE", "pubsub"])),
        ""
    );
    // CLIENT KILL: by id, skipping the caller unless told; then the other is gone.
    assert_eq!(
        call_str(&mut me, &["CLIENT", "KILL", "ADDR", "10.9.9.9:1"]),
        Value::Int(0)
    );
    assert_eq!(
        call_str(&mut me, &["CLIENT", "KILL", "ID", &other_id.to_string()]),
        Value::Int(1)
    );
    let closed = redis::cmd("PING").query::<String>(&mut other);
    assert!(
        closed.is_err(),
        "the killed connection still answers: {closed:?}"
    );
    let list = text(call_str(&mut me, &["CLIENT", "LIST"]));
    assert_eq!(list.lines().count(), 1, "{list}");
    let missing = call_str(&mut me, &["CLIENT", "KILL", "10.9.9.9:1"]);
    assert_eq!(error_text(&missing), "ERR No such client");
    assert_eq!(
        call_str(&mut me, &["CLIENT", "NO-EVICT", "on"]),
        Value::Okay
    );
    assert_eq!(
        call_str(&mut me, &["CLIENT", "KILL", "SKIPME", "yes"]),
        Value::Int(0)
    );
}

#[test]
fn randomkey_memory_usage_and_object_freq() {
    let server = Server::start("");
    let mut con = server.conn();
    assert_eq!(
        call_str(&mut con, &["RANDOMKEY"]),
        Value::Nil,
        "empty collection"
    );
    for i in 0..50 {
        assert_eq!(
            call_str(&mut con, &["SET", &format!("key:{i}"), "v"]),
            Value::Okay
        );
    }
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..30 {
        let Value::BulkString(key) = call_str(&mut con, &["RANDOMKEY"]) else {
            panic!("RANDOMKEY of a non-empty collection is a key")
        };
        let key = String::from_utf8(key).unwrap();
        assert_eq!(
            call_str(&mut con, &["EXISTS", &key]),
            Value::Int(1),
            "{key}"
        );
        seen.insert(key);
    }
    assert!(seen.len() > 3, "RANDOMKEY keeps answering {seen:?}");
    // MEMORY USAGE: at least the key and the value.
    let value = "x".repeat(1000);
    assert_eq!(call_str(&mut con, &["SET", "big", &value]), Value::Okay);
    let Value::Int(bytes) = call_str(&mut con, &["MEMORY", "USAGE", "big", "SAMPLES", "5"]) else {
        panic!("MEMORY USAGE is an integer")
    };
    assert!((1003..1100).contains(&bytes), "{bytes}");
    assert_eq!(
        call_str(&mut con, &["MEMORY", "USAGE", "missing"]),
        Value::Nil
    );
    // OBJECT FREQ: Shoal counts no accesses, as Redis without an LFU policy.
    assert!(error_text(&call_str(&mut con, &["OBJECT", "FREQ", "big"])).contains("LFU"));
    assert_eq!(
        call_str(&mut con, &["OBJECT", "FREQ", "missing"]),
        Value::Nil
    );
}

#[test]
fn bitfield_incrby_is_atomic_under_concurrent_clients() {
    let server = Server::start("");
    const CLIENTS: usize = 8;
    const ROUNDS: usize = 150;
    let mut con = server.conn();
    // A TTL that the increments must keep.
    assert_eq!(
        call_str(&mut con, &["SET", "counters", "", "EX", "1000"]),
        Value::Okay
    );
    let workers: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let mut con = server.conn();
            std::thread::spawn(move || {
                let mut seen = Vec::with_capacity(ROUNDS);
                for _ in 0..ROUNDS {
                    // Two fields in one request: each reply must see both changed together.
                    let reply = call_str(
                        &mut con,
                        &[
                            "BITFIELD", "counters", "INCRBY", "u32", "#0", "1", "INCRBY", "u32",
                            "#1", "2",
                        ],
                    );
                    let Value::Array(items) = reply else {
                        panic!("BITFIELD answers an array: {reply:?}")
                    };
                    match items.as_slice() {
                        [Value::Int(one), Value::Int(two)] => {
                            assert_eq!(*two, 2 * one, "a request saw half of another");
                            seen.push(*one);
                        }
                        other => panic!("BITFIELD INCRBY answers two integers: {other:?}"),
                    }
                }
                seen
            })
        })
        .collect();
    let mut all: Vec<i64> = workers
        .into_iter()
        .flat_map(|worker| worker.join().expect("client thread"))
        .collect();
    all.sort_unstable();
    let total = (CLIENTS * ROUNDS) as i64;
    assert_eq!(
        all,
        (1..=total).collect::<Vec<_>>(),
        "every increment answers a value no other increment answered"
    );
    assert_eq!(
        call_str(
            &mut con,
            &[
                "BITFIELD_RO",
                "counters",
                "GET",
                "u32",
                "0",
                "GET",
                "u32",
                "32"
            ]
        ),
        Value::Array(vec![Value::Int(total), Value::Int(2 * total)])
    );
    let Value::Int(ttl) = call_str(&mut con, &["TTL", "counters"]) else {
        panic!("TTL is an integer")
    };
    assert!((900..=1000).contains(&ttl), "BITFIELD keeps the TTL: {ttl}");
}

#[test]
fn bitfield_bitop_and_sort_answer_redis_errors() {
    let server = Server::start("[client]\nmax_value_bytes = 1024\n");
    let mut con = server.conn();
    let err = |con: &mut redis::Connection, args: &[&str]| error_text(&call_str(con, args));
    assert_eq!(
        call_str(&mut con, &["RPUSH", "list", "3", "1", "2"]),
        Value::Int(3)
    );
    assert_eq!(
        call_str(&mut con, &["HSET", "hash", "f", "v"]),
        Value::Int(1)
    );
    assert_eq!(call_str(&mut con, &["SET", "string", "abc"]), Value::Okay);
    let wrong_type = "WRONGTYPE Operation against a key holding the wrong kind of value";

    // BITFIELD and BITFIELD_RO.
    assert_eq!(
        err(&mut con, &["BITFIELD", "b", "GET", "u64", "0"]),
        "ERR Invalid bitfield type. Use something like i16 u8. Note that u64 is not supported but i64 is."
    );
    assert_eq!(
        err(&mut con, &["BITFIELD", "b", "GET", "u8", "-1"]),
        "ERR bit offset is not an integer or out of range"
    );
    assert_eq!(
        err(&mut con, &["BITFIELD", "b", "OVERFLOW", "nope"]),
        "ERR Invalid OVERFLOW type specified"
    );
    assert_eq!(err(&mut con, &["BITFIELD", "b", "FOO"]), "ERR syntax error");
    assert_eq!(
        err(&mut con, &["BITFIELD", "b", "SET", "u8", "0", "x"]),
        "ERR value is not an integer or out of range"
    );
    assert_eq!(
        err(
            &mut con,
            &[
                "BITFIELD_RO",
                "hash",
                "GET",
                "u8",
                "0",
                "SET",
                "u8",
                "0",
                "1"
            ]
        ),
        "ERR BITFIELD_RO only supports the GET subcommand"
    );
    assert_eq!(err(&mut con, &["BITFIELD", "list"]), wrong_type);
    assert_eq!(
        err(&mut con, &["BITFIELD", "list", "SET", "u8", "0", "1"]),
        wrong_type
    );
    assert_eq!(
        err(&mut con, &["BITFIELD_RO", "hash", "GET", "u8", "0"]),
        wrong_type
    );
    assert_eq!(
        err(&mut con, &["BITFIELD"]),
        "ERR wrong number of arguments for 'bitfield' command"
    );
    assert_eq!(
        call_str(&mut con, &["BITFIELD", "b"]),
        Value::Array(Vec::new()),
        "no ops: an empty answer"
    );
    // A write past max_value_bytes is refused and creates nothing.
    assert!(
        err(&mut con, &["BITFIELD", "b", "SET", "u8", "#1024", "1"]).contains("max_value_bytes")
    );
    assert_eq!(call_str(&mut con, &["EXISTS", "b"]), Value::Int(0));
    // OVERFLOW FAIL refuses the write but, as in Redis, the key is made to hold the field.
    assert_eq!(
        call_str(
            &mut con,
            &["BITFIELD", "b", "OVERFLOW", "FAIL", "SET", "u8", "#3", "999"]
        ),
        Value::Array(vec![Value::Nil])
    );
    assert_eq!(call_str(&mut con, &["STRLEN", "b"]), Value::Int(4));
    assert_eq!(
        call_str(
            &mut con,
            &["BITFIELD", "string", "GET", "u8", "0", "SET", "i8", "#1", "-1", "GET", "u16", "8"]
        ),
        Value::Array(vec![Value::Int(97), Value::Int(98), Value::Int(0xff63)])
    );
    assert_eq!(
        call_str(&mut con, &["GET", "string"]),
        Value::BulkString(b"a\xffc".to_vec())
    );

    // BITOP.
    assert_eq!(
        err(&mut con, &["BITOP", "NAND", "d", "string"]),
        "ERR syntax error"
    );
    assert_eq!(
        err(&mut con, &["BITOP", "NOT", "d", "string", "b"]),
        "ERR BITOP NOT must be called with a single source key."
    );
    assert_eq!(
        err(&mut con, &["BITOP", "AND", "d"]),
        "ERR wrong number of arguments for 'bitop' command"
    );
    assert_eq!(
        err(&mut con, &["BITOP", "OR", "d", "string", "list"]),
        wrong_type
    );
    assert_eq!(
        call_str(&mut con, &["EXISTS", "d"]),
        Value::Int(0),
        "nothing stored"
    );
    // Sources and destination on several workers; the destination may be of any type.
    let sources = ["x1", "x2", "x3", "x4"];
    for (i, key) in sources.iter().enumerate() {
        let value = "\u{1}".repeat(i + 1);
        assert_eq!(call_str(&mut con, &["SET", key, &value]), Value::Okay);
    }
    assert_eq!(
        call_str(
            &mut con,
            &["BITOP", "XOR", "hash", "x1", "x2", "x3", "x4", "missing"]
        ),
        Value::Int(4)
    );
    assert_eq!(get(&mut con, "hash").as_deref(), Some("\0\u{1}\0\u{1}"));
    assert_eq!(
        call_str(&mut con, &["BITOP", "AND", "hash", "x1", "x4"]),
        Value::Int(4)
    );
    assert_eq!(get(&mut con, "hash").as_deref(), Some("\u{1}\0\0\0"));
    assert_eq!(
        call_str(&mut con, &["BITOP", "OR", "hash", "missing", "missing2"]),
        Value::Int(0)
    );
    assert_eq!(
        call_str(&mut con, &["EXISTS", "hash"]),
        Value::Int(0),
        "an empty result deletes"
    );

    // SORT and SORT_RO.
    assert_eq!(
        err(&mut con, &["SORT", "list", "LIMIT", "1"]),
        "ERR syntax error"
    );
    assert_eq!(
        err(&mut con, &["SORT", "list", "LIMIT", "x", "1"]),
        "ERR value is not an integer or out of range"
    );
    assert_eq!(
        err(&mut con, &["SORT_RO", "list", "STORE", "d"]),
        "ERR syntax error"
    );
    assert_eq!(err(&mut con, &["SORT", "string"]), wrong_type);
    assert_eq!(err(&mut con, &["SORT", "b", "ALPHA"]), wrong_type);
    let unsupported = "ERR SORT BY and GET patterns that read other keys are not supported";
    assert_eq!(err(&mut con, &["SORT", "list", "BY", "w_*"]), unsupported);
    assert_eq!(
        err(&mut con, &["SORT", "list", "GET", "#", "GET", "h_*->f"]),
        unsupported
    );
    assert_eq!(
        call_str(&mut con, &["RPUSH", "words", "b", "a", "10"]),
        Value::Int(3)
    );
    assert_eq!(
        err(&mut con, &["SORT", "words"]),
        "ERR One or more scores can't be converted into double"
    );
    assert_eq!(
        call_str(
            &mut con,
            &["SORT", "words", "ALPHA", "DESC", "LIMIT", "0", "2"]
        ),
        Value::Array(vec![bulk("b"), bulk("a")])
    );
    assert_eq!(
        call_str(
            &mut con,
            &["SORT", "list", "BY", "nosort", "GET", "#", "GET", "nokey"]
        ),
        Value::Array(vec![
            bulk("3"),
            Value::Nil,
            bulk("1"),
            Value::Nil,
            bulk("2"),
            Value::Nil
        ])
    );
    // STORE replaces a destination of any type (on any worker) with a list.
    for dest in ["string", "x1", "x2", "x3"] {
        assert_eq!(
            call_str(&mut con, &["SORT", "list", "DESC", "STORE", dest]),
            Value::Int(3)
        );
        assert_eq!(
            call_str(&mut con, &["LRANGE", dest, "0", "-1"]),
            Value::Array(vec![bulk("3"), bulk("2"), bulk("1")])
        );
    }
    assert_eq!(
        call_str(
            &mut con,
            &["SORT", "list", "LIMIT", "5", "1", "STORE", "x1"]
        ),
        Value::Int(0)
    );
    assert_eq!(
        call_str(&mut con, &["EXISTS", "x1"]),
        Value::Int(0),
        "an empty result deletes"
    );
    assert_eq!(
        call_str(&mut con, &["SORT_RO", "missing"]),
        Value::Array(Vec::new())
    );
}
