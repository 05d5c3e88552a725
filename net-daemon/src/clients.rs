//! The client connections open on this host, as CLIENT LIST, CLIENT INFO and CLIENT
//! KILL see them.
//!
//! Each connection registers a [`Client`] when it opens and removes it when it closes;
//! after each request it records what it ran ([`Client::ran`]). CLIENT KILL marks a
//! client killed and wakes it; its connection then closes ([`Client::killed`]). The
//! registry holds no socket and decides nothing about a connection.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use shoal_shared::lock;
use tokio::sync::Notify;

/// The connections open now.
#[derive(Default)]
pub struct Clients {
    open: Mutex<BTreeMap<u64, Arc<Client>>>,
}

/// One connection, as the other connections may see it.
pub struct Client {
    pub id: u64,
    /// The client's address (`ip:port`, or the socket path for a Unix socket).
    pub addr: String,
    /// This host's address the client connected to.
    pub laddr: String,
    opened: Instant,
    state: Mutex<State>,
    killed: AtomicBool,
    kill: Notify,
    /// Milliseconds since `opened` of the last request.
    last_request_ms: AtomicU64,
}

/// What a connection last reported of itself.
#[derive(Default, Clone)]
pub struct State {
    pub name: Option<Bytes>,
    pub lib_name: Option<Bytes>,
    pub lib_ver: Option<Bytes>,
    pub db: u16,
    pub resp: u8,
    /// Channel, pattern and shard channel subscriptions.
    pub subscriptions: (usize, usize, usize),
    /// The last command, in CLIENT LIST's form (`client|list`).
    pub command: &'static str,
}

impl Clients {
    /// Registers a new connection.
    pub fn open(&self, id: u64, addr: String, laddr: String) -> Arc<Client> {
        let client = Arc::new(Client {
            id,
            addr,
            laddr,
            opened: Instant::now(),
            state: Mutex::new(State {
                resp: 2,
                command: "NULL",
                ..State::default()
            }),
            killed: AtomicBool::new(false),
            kill: Notify::new(),
            last_request_ms: AtomicU64::new(0),
        });
        lock(&self.open).insert(id, Arc::clone(&client));
        client
    }

    /// Forgets a connection that closed.
    pub fn close(&self, id: u64) {
        lock(&self.open).remove(&id);
    }

    /// Every open connection, by id.
    pub fn all(&self) -> Vec<Arc<Client>> {
        lock(&self.open).values().cloned().collect()
    }

    /// The connection with this id, if open.
    pub fn get(&self, id: u64) -> Option<Arc<Client>> {
        lock(&self.open).get(&id).cloned()
    }
}

impl Client {
    /// Records a request and the connection's state after it.
    pub fn ran(&self, state: State) {
        let ms = self.opened.elapsed().as_millis() as u64;
        self.last_request_ms.store(ms, Ordering::Relaxed);
        *lock(&self.state) = state;
    }

    /// The state last recorded.
    pub fn state(&self) -> State {
        lock(&self.state).clone()
    }

    /// Seconds since the connection opened.
    pub fn age_secs(&self) -> u64 {
        self.opened.elapsed().as_secs()
    }

    /// Seconds since its last request.
    pub fn idle_secs(&self) -> u64 {
        let ms = self.opened.elapsed().as_millis() as u64;
        ms.saturating_sub(self.last_request_ms.load(Ordering::Relaxed)) / 1000
    }

    /// Marks the connection killed and wakes it.
    pub fn kill(&self) {
        self.killed.store(true, Ordering::Relaxed);
        self.kill.notify_one();
    }

    /// Whether CLIENT KILL closed it.
    pub fn is_killed(&self) -> bool {
        self.killed.load(Ordering::Relaxed)
    }

    /// Waits until the connection is killed.
    pub async fn killed(&self) {
        while !self.is_killed() {
            self.kill.notified().await;
        }
    }

    /// The connection in CLIENT LIST's format (one line, no line break).
    pub fn line(&self) -> String {
        let state = self.state();
        let text = |bytes: &Option<Bytes>| {
            bytes
                .as_ref()
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .unwrap_or_default()
        };
        let (sub, psub, ssub) = state.subscriptions;
        let flags = if sub + psub + ssub > 0 { "P" } else { "N" };
        let mut line = String::new();
        let _ = write!(
            line,
            "id={} addr={} laddr={} fd=-1 name={} age={} idle={} flags={flags} db={} \
             sub={sub} psub={psub} ssub={ssub} multi=-1 qbuf=0 qbuf-free=0 argv-mem=0 \
             multi-mem=0 rbs=0 rbp=0 obl=0 oll=0 omem=0 tot-mem=0 events=r cmd={} \
             user=default redir=-1 resp={} lib-name={} lib-ver={}",
            self.id,
            self.addr,
            self.laddr,
            text(&state.name),
            self.age_secs(),
            self.idle_secs(),
            state.db,
            state.command,
            state.resp,
            text(&state.lib_name),
            text(&state.lib_ver),
        );
        line
    }
}
