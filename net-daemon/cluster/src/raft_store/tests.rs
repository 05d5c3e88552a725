//! Tests of the metadata store: openraft's conformance suite and durability across a
//! reopen, for both the LMDB store and the in-memory one; then, for LMDB, corrupt data
//! and map growth; and a three-node in-process cluster.

use std::collections::BTreeMap;
use std::error::Error;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use openraft::error::{InstallSnapshotError, RPCError, RaftError, RemoteError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::storage::RaftLogStorageExt;
use openraft::testing::{log_id, StoreBuilder, Suite};
use openraft::{Membership, ServerState};
use serde::{Deserialize, Serialize};
use tempfile::TempDir;

use super::memory::{MemoryLogStore, MemoryMetaStore, MemoryStateMachine};
use super::*;

/// A stand-in for the NI: hosts and their addresses, versioned.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct TestInfo {
    version: u64,
    hosts: BTreeMap<u64, String>,
    /// The log index of the last command applied.
    last_index: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
enum TestCommand {
    Join { host_id: u64, addr: String },
    SetAddress { host_id: u64, addr: String },
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct TestOutcome {
    version: u64,
}

impl MetadataState for TestInfo {
    type Command = TestCommand;
    type Outcome = TestOutcome;

    fn apply(&mut self, command: &TestCommand, log_index: u64) -> TestOutcome {
        match command {
            TestCommand::Join { host_id, addr } | TestCommand::SetAddress { host_id, addr } => {
                self.hosts.insert(*host_id, addr.clone());
            }
        }
        self.version += 1;
        self.last_index = log_index;
        TestOutcome {
            version: self.version,
        }
    }
}

type Types = MetaTypes<TestInfo>;
type LogStore = MetaLogStore<TestInfo>;
type StateMachine = MetaStateMachine<TestInfo>;

fn join(host_id: u64) -> TestCommand {
    TestCommand::Join {
        host_id,
        addr: format!("10.0.0.{host_id}:7000"),
    }
}

fn command_entry(term: u64, index: u64, command: TestCommand) -> Entry<Types> {
    Entry {
        log_id: log_id(term, 1, index),
        payload: EntryPayload::Normal(command),
    }
}

fn membership_entry(term: u64, index: u64, voters: &[u64]) -> Entry<Types> {
    let voters = voters.iter().copied().collect();
    Entry {
        log_id: log_id(term, 1, index),
        payload: EntryPayload::Membership(Membership::new(vec![voters], None)),
    }
}

fn open(dir: &Path) -> (LogStore, StateMachine) {
    open_meta_store(dir, &MetaStoreOptions::default()).expect("open the metadata store")
}

/// Builds a fresh store in a temporary directory for each case of the suite.
struct TempStoreBuilder;

impl StoreBuilder<Types, LogStore, StateMachine, TempDir> for TempStoreBuilder {
    async fn build(&self) -> Result<(TempDir, LogStore, StateMachine), StorageError<NodeId>> {
        let dir = tempfile::tempdir().map_err(|error| StorageIOError::write(&error))?;
        let (log_store, state_machine) = open_meta_store(dir.path(), &MetaStoreOptions::default())
            .map_err(|error| StorageIOError::write(&error))?;
        Ok((dir, log_store, state_machine))
    }
}

/// Builds a fresh in-memory store for each case of the suite.
struct MemoryStoreBuilder;

impl StoreBuilder<Types, MemoryLogStore<TestInfo>, MemoryStateMachine<TestInfo>, ()>
    for MemoryStoreBuilder
{
    async fn build(
        &self,
    ) -> Result<((), MemoryLogStore<TestInfo>, MemoryStateMachine<TestInfo>), StorageError<NodeId>>
    {
        let (log_store, state_machine) = MemoryMetaStore::new().open();
        Ok(((), log_store, state_machine))
    }
}

#[test]
fn passes_openraft_storage_suite() {
    Suite::test_all(TempStoreBuilder).expect("openraft storage suite");
}

#[test]
fn memory_store_passes_openraft_storage_suite() {
    Suite::test_all(MemoryStoreBuilder).expect("openraft storage suite");
}

/// A store that can be opened again, as the tests below need: the same checks run on
/// the LMDB store and on the in-memory one.
trait Reopenable {
    type Log: RaftLogStorage<Types> + RaftLogReader<Types>;
    type Machine: RaftStateMachine<Types>;

    fn open(&self) -> (Self::Log, Self::Machine);
    fn applied(machine: &Self::Machine) -> AppliedState<TestInfo>;
    fn subscribe(machine: &Self::Machine) -> watch::Receiver<AppliedState<TestInfo>>;
}

/// The LMDB store in a directory of its own.
struct LmdbDir(TempDir);

impl LmdbDir {
    fn new() -> LmdbDir {
        LmdbDir(tempfile::tempdir().unwrap())
    }
}

impl Reopenable for LmdbDir {
    type Log = LogStore;
    type Machine = StateMachine;

    fn open(&self) -> (LogStore, StateMachine) {
        open(self.0.path())
    }

    fn applied(machine: &StateMachine) -> AppliedState<TestInfo> {
        machine.applied().clone()
    }

    fn subscribe(machine: &StateMachine) -> watch::Receiver<AppliedState<TestInfo>> {
        machine.subscribe()
    }
}

impl Reopenable for MemoryMetaStore<TestInfo> {
    type Log = MemoryLogStore<TestInfo>;
    type Machine = MemoryStateMachine<TestInfo>;

    fn open(&self) -> (Self::Log, Self::Machine) {
        MemoryMetaStore::open(self)
    }

    fn applied(machine: &Self::Machine) -> AppliedState<TestInfo> {
        machine.applied().clone()
    }

    fn subscribe(machine: &Self::Machine) -> watch::Receiver<AppliedState<TestInfo>> {
        machine.subscribe()
    }
}

#[tokio::test]
async fn log_vote_and_state_survive_a_reopen() {
    log_vote_and_state_survive_a_reopen_of(LmdbDir::new()).await;
}

#[tokio::test]
async fn memory_log_vote_and_state_survive_a_reopen() {
    log_vote_and_state_survive_a_reopen_of(MemoryMetaStore::new()).await;
}

async fn log_vote_and_state_survive_a_reopen_of<T: Reopenable>(store: T) {
    let mut entries = vec![membership_entry(3, 1, &[1, 2, 3])];
    entries.extend((2..=10).map(|index| command_entry(3, index, join(index))));
    let expected_state = {
        let mut state = TestInfo::default();
        for index in 2..=8 {
            state.apply(&join(index), index);
        }
        state
    };
    {
        let (mut log_store, mut state_machine) = store.open();
        log_store.save_vote(&Vote::new(3, 1)).await.unwrap();
        log_store.blocking_append(entries.clone()).await.unwrap();
        log_store
            .save_committed(Some(log_id(3, 1, 8)))
            .await
            .unwrap();
        let outcomes = state_machine.apply(entries[..8].to_vec()).await.unwrap();
        assert_eq!(outcomes.len(), 8);
        assert_eq!(outcomes[0], TestOutcome::default(), "membership entry");
        assert_eq!(outcomes[7], TestOutcome { version: 7 });
        let snapshot = state_machine
            .get_snapshot_builder()
            .await
            .build_snapshot()
            .await
            .unwrap();
        assert_eq!(snapshot.meta.last_log_id, Some(log_id(3, 1, 8)));
        log_store.purge(log_id(3, 1, 4)).await.unwrap();
        log_store.truncate(log_id(3, 1, 10)).await.unwrap();
    }

    let (mut log_store, mut state_machine) = store.open();
    let state = log_store.get_log_state().await.unwrap();
    assert_eq!(state.last_purged_log_id, Some(log_id(3, 1, 4)));
    assert_eq!(state.last_log_id, Some(log_id(3, 1, 9)));
    let stored = log_store.try_get_log_entries(0..100).await.unwrap();
    assert_eq!(stored, entries[4..9].to_vec(), "entries 5..=9 remain");
    assert_eq!(log_store.read_vote().await.unwrap(), Some(Vote::new(3, 1)));
    assert_eq!(
        log_store.read_committed().await.unwrap(),
        Some(log_id(3, 1, 8))
    );

    let (applied, membership) = state_machine.applied_state().await.unwrap();
    assert_eq!(applied, Some(log_id(3, 1, 8)));
    assert_eq!(membership.log_id(), &Some(log_id(3, 1, 1)));
    assert_eq!(*T::applied(&state_machine).state, expected_state);
    assert_eq!(T::subscribe(&state_machine).borrow().state.version, 7);

    let snapshot = state_machine
        .get_current_snapshot()
        .await
        .unwrap()
        .expect("the snapshot was kept");
    assert_eq!(snapshot.meta.last_log_id, Some(log_id(3, 1, 8)));
    let restored: TestInfo = decode_snapshot(snapshot.snapshot.get_ref()).unwrap();
    assert_eq!(restored, expected_state);

    // Purging everything leaves the last purged id as the last log id.
    log_store.purge(log_id(3, 1, 9)).await.unwrap();
    let state = log_store.get_log_state().await.unwrap();
    assert_eq!(state.last_log_id, Some(log_id(3, 1, 9)));
    assert!(log_store.try_get_log_entries(..).await.unwrap().is_empty());
}

#[tokio::test]
async fn installed_snapshot_replaces_the_state() {
    installed_snapshot_replaces_the_state_of(LmdbDir::new(), LmdbDir::new()).await;
}

#[tokio::test]
async fn memory_installed_snapshot_replaces_the_state() {
    installed_snapshot_replaces_the_state_of(MemoryMetaStore::new(), MemoryMetaStore::new()).await;
}

/// Snapshots travel between the two kinds of store.
#[tokio::test]
async fn snapshots_travel_between_lmdb_and_memory() {
    installed_snapshot_replaces_the_state_of(LmdbDir::new(), MemoryMetaStore::new()).await;
    installed_snapshot_replaces_the_state_of(MemoryMetaStore::new(), LmdbDir::new()).await;
}

async fn installed_snapshot_replaces_the_state_of<A: Reopenable, B: Reopenable>(
    source_store: A,
    target_store: B,
) {
    let (_, mut source) = source_store.open();
    source
        .apply(vec![
            membership_entry(1, 1, &[1]),
            command_entry(1, 2, join(2)),
            command_entry(1, 3, join(3)),
        ])
        .await
        .unwrap();
    let snapshot = source
        .get_snapshot_builder()
        .await
        .build_snapshot()
        .await
        .unwrap();
    let source_state = A::applied(&source).state;
    {
        let (_, mut target) = target_store.open();
        target
            .apply(vec![command_entry(1, 1, join(9))])
            .await
            .unwrap();
        let watch = B::subscribe(&target);
        target
            .install_snapshot(&snapshot.meta, snapshot.snapshot.clone())
            .await
            .unwrap();
        assert_eq!(*watch.borrow().state, *source_state);
        // Bytes that are not a snapshot are refused, and the state stays.
        let garbage = Box::new(Cursor::new(vec![SNAPSHOT_FORMAT, 0xff, 0xff, 0xff]));
        assert!(target
            .install_snapshot(&snapshot.meta, garbage)
            .await
            .is_err());
        assert_eq!(*B::applied(&target).state, *source_state);
    }
    let (_, mut target) = target_store.open();
    assert_eq!(*B::applied(&target).state, *source_state);
    assert_eq!(
        target.applied_state().await.unwrap().0,
        Some(log_id(1, 1, 3))
    );
    let current = target.get_current_snapshot().await.unwrap().unwrap();
    assert_eq!(current.meta, snapshot.meta);
}

#[tokio::test]
async fn corrupt_records_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (mut log_store, _) = open(dir.path());
        log_store
            .blocking_append(vec![
                command_entry(1, 1, join(1)),
                command_entry(1, 2, join(2)),
            ])
            .await
            .unwrap();
        let mut trailing = encode(&command_entry(1, 3, join(3)), "log entry").unwrap();
        trailing.push(0);
        let misplaced = encode(&command_entry(1, 9, join(9)), "log entry").unwrap();
        log_store
            .db
            .write(move |db, txn| {
                db.log.put(txn, &3, &trailing)?;
                db.log.put(txn, &4, &misplaced)?;
                db.log.put(txn, &5, &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff])?;
                db.raft.put(txn, VOTE_KEY, &[0xfe])?;
                Ok(())
            })
            .unwrap();
        assert!(log_store.try_get_log_entries(1..3).await.is_ok());
        for index in 3..=5 {
            let error = log_store.try_get_log_entries(index..index + 1).await;
            assert!(error.is_err(), "entry {index} is corrupt");
        }
        assert!(
            log_store.get_log_state().await.is_err(),
            "last entry is corrupt"
        );
        assert!(log_store.read_vote().await.is_err());
        log_store
            .db
            .write(|db, txn| Ok(db.machine.put(txn, STATE_KEY, &[1, 2, 3])?))
            .unwrap();
    }
    match open_meta_store::<TestInfo>(dir.path(), &MetaStoreOptions::default()) {
        Err(MetaStoreError::Corrupt { what, .. }) => assert_eq!(what, "state machine"),
        Err(other) => panic!("unexpected error {other}"),
        Ok(_) => panic!("a corrupt state machine opened"),
    }
}

#[tokio::test]
async fn map_grows_when_full_up_to_its_maximum() {
    let big_entries = |count: u64| -> Vec<Entry<Types>> {
        (1..=count)
            .map(|index| {
                command_entry(
                    1,
                    index,
                    TestCommand::SetAddress {
                        host_id: index,
                        addr: "x".repeat(64 << 10),
                    },
                )
            })
            .collect()
    };
    let small = MetaStoreOptions {
        map_size_bytes: 256 << 10,
        max_map_size_bytes: 16 << 20,
    };
    let dir = tempfile::tempdir().unwrap();
    let (mut log_store, _) = open_meta_store::<TestInfo>(dir.path(), &small).unwrap();
    log_store.blocking_append(big_entries(40)).await.unwrap();
    assert!(log_store.db.env.info().map_size > small.map_size_bytes);
    assert_eq!(log_store.try_get_log_entries(..).await.unwrap().len(), 40);

    let capped = MetaStoreOptions {
        map_size_bytes: 256 << 10,
        max_map_size_bytes: 1 << 20,
    };
    let dir = tempfile::tempdir().unwrap();
    let (mut log_store, _) = open_meta_store::<TestInfo>(dir.path(), &capped).unwrap();
    let error = log_store
        .blocking_append(big_entries(40))
        .await
        .expect_err("the entries do not fit the capped map");
    assert!(error.to_string().contains("map is full"), "{error}");
    assert!(log_store.try_get_log_entries(..).await.unwrap().is_empty());
}

// ---------------------------------------------------------------------------------------
// A three-node cluster in one runtime, its RPCs routed straight to the Raft handles.

#[derive(Clone, Default)]
struct Router {
    nodes: Arc<Mutex<BTreeMap<NodeId, MetaRaft<TestInfo>>>>,
}

impl Router {
    fn get(&self, id: NodeId) -> Option<MetaRaft<TestInfo>> {
        self.nodes.lock().unwrap().get(&id).cloned()
    }

    fn insert(&self, id: NodeId, raft: MetaRaft<TestInfo>) {
        self.nodes.lock().unwrap().insert(id, raft);
    }

    fn remove(&self, id: NodeId) -> Option<MetaRaft<TestInfo>> {
        self.nodes.lock().unwrap().remove(&id)
    }
}

struct Link {
    router: Router,
    target: NodeId,
}

impl Link {
    /// The target's Raft handle; `None` while it is down.
    fn target(&self) -> Option<MetaRaft<TestInfo>> {
        self.router.get(self.target)
    }

    fn unreachable<E: Error>(&self) -> RPCError<NodeId, BasicNode, E> {
        let down = std::io::Error::other(format!("node {} is down", self.target));
        RPCError::Unreachable(Unreachable::new(&down))
    }

    fn remote<E: Error>(&self, error: E) -> RPCError<NodeId, BasicNode, E> {
        RPCError::RemoteError(RemoteError::new(self.target, error))
    }
}

impl RaftNetworkFactory<Types> for Router {
    type Network = Link;

    async fn new_client(&mut self, target: NodeId, _node: &BasicNode) -> Link {
        Link {
            router: self.clone(),
            target,
        }
    }
}

impl RaftNetwork<Types> for Link {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<Types>,
        _option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        let Some(raft) = self.target() else {
            return Err(self.unreachable());
        };
        raft.append_entries(rpc)
            .await
            .map_err(|error| self.remote(error))
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<Types>,
        _option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, BasicNode, RaftError<NodeId, InstallSnapshotError>>,
    > {
        let Some(raft) = self.target() else {
            return Err(self.unreachable());
        };
        raft.install_snapshot(rpc)
            .await
            .map_err(|error| self.remote(error))
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        _option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        let Some(raft) = self.target() else {
            return Err(self.unreachable());
        };
        raft.vote(rpc).await.map_err(|error| self.remote(error))
    }
}

const WAIT: Duration = Duration::from_secs(10);

fn test_config() -> Arc<openraft::Config> {
    let config = openraft::Config {
        cluster_name: "shoal-meta-test".to_string(),
        heartbeat_interval: 50,
        election_timeout_min: 200,
        election_timeout_max: 400,
        max_in_snapshot_log_to_keep: 0,
        ..Default::default()
    };
    Arc::new(config.validate().expect("valid raft config"))
}

/// Opens the store in `dir`, waiting while a node shut down a moment ago still holds it.
async fn reopen(dir: &Path) -> (LogStore, StateMachine) {
    let deadline = Instant::now() + WAIT;
    loop {
        match open_meta_store(dir, &MetaStoreOptions::default()) {
            Ok(halves) => return halves,
            Err(MetaStoreError::Lmdb(heed::Error::EnvAlreadyOpened))
                if Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(error) => panic!("reopen {}: {error}", dir.display()),
        }
    }
}

async fn start_node(
    router: &Router,
    id: NodeId,
    dir: &Path,
) -> (MetaRaft<TestInfo>, watch::Receiver<AppliedState<TestInfo>>) {
    let (log_store, state_machine) = reopen(dir).await;
    let applied = state_machine.subscribe();
    let raft = MetaRaft::new(id, test_config(), router.clone(), log_store, state_machine)
        .await
        .expect("start raft");
    router.insert(id, raft.clone());
    (raft, applied)
}

async fn wait_version(
    applied: &mut watch::Receiver<AppliedState<TestInfo>>,
    version: u64,
) -> AppliedState<TestInfo> {
    tokio::time::timeout(WAIT, applied.wait_for(|a| a.state.version >= version))
        .await
        .unwrap_or_else(|_| panic!("state machine did not reach version {version}"))
        .expect("state machine alive")
        .clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_node_cluster_replicates_and_fails_over() {
    let started = Instant::now();
    let router = Router::default();
    let dirs: BTreeMap<NodeId, TempDir> = (1..=3)
        .map(|id| (id, tempfile::tempdir().unwrap()))
        .collect();
    let mut nodes = BTreeMap::new();
    for (&id, dir) in &dirs {
        nodes.insert(id, start_node(&router, id, dir.path()).await);
    }
    let members: BTreeMap<NodeId, BasicNode> = (1..=3)
        .map(|id| (id, BasicNode::new(format!("node-{id}"))))
        .collect();
    nodes[&1].0.initialize(members).await.expect("initialize");

    let leader = nodes[&1]
        .0
        .wait(Some(WAIT))
        .metrics(|m| m.current_leader.is_some(), "a leader is elected")
        .await
        .expect("a leader")
        .current_leader
        .expect("a leader");
    for host_id in 1..=5 {
        let response = nodes[&leader]
            .0
            .client_write(join(host_id))
            .await
            .expect("write through the leader");
        assert_eq!(response.data, TestOutcome { version: host_id });
    }
    let mut converged = Vec::new();
    for (_, applied) in nodes.values_mut() {
        converged.push(wait_version(applied, 5).await);
    }
    for applied in &converged[1..] {
        assert_eq!(applied.state, converged[0].state, "replicas agree");
        assert_eq!(applied.last_applied, converged[0].last_applied);
    }
    assert_eq!(converged[0].state.hosts.len(), 5);

    // The leader goes away; the other two elect a new one and accept writes.
    router.remove(leader);
    let (old_leader, _) = nodes.remove(&leader).unwrap();
    old_leader.shutdown().await.expect("shut down the leader");
    drop(old_leader);
    let survivor = *nodes.keys().next().unwrap();
    let new_leader = nodes[&survivor]
        .0
        .wait(Some(WAIT))
        .metrics(
            |m| m.current_leader.is_some_and(|l| l != leader) && m.state != ServerState::Candidate,
            "a new leader is elected",
        )
        .await
        .expect("a new leader")
        .current_leader
        .expect("a new leader");
    assert_ne!(new_leader, leader);
    let response = nodes[&new_leader]
        .0
        .client_write(join(6))
        .await
        .expect("write through the new leader");
    assert_eq!(response.data, TestOutcome { version: 6 });
    let write_index = response.log_id.index;
    for (_, applied) in nodes.values_mut() {
        wait_version(applied, 6).await;
    }

    // The new leader snapshots and purges its log, so the old leader, restarted from its
    // own durable state, must catch up from a snapshot.
    let new_leader_raft = nodes[&new_leader].0.clone();
    let applied_index = new_leader_raft
        .metrics()
        .borrow()
        .last_applied
        .expect("applied")
        .index;
    new_leader_raft.trigger().snapshot().await.unwrap();
    new_leader_raft
        .wait(Some(WAIT))
        .metrics(
            |m| m.snapshot.is_some_and(|s| s.index >= applied_index),
            "the new leader built a snapshot",
        )
        .await
        .expect("a snapshot");
    new_leader_raft
        .trigger()
        .purge_log(applied_index)
        .await
        .unwrap();
    new_leader_raft
        .wait(Some(WAIT))
        .metrics(
            |m| m.purged.is_some_and(|p| p.index >= applied_index),
            "the new leader purged its log",
        )
        .await
        .expect("purged");

    let leader_dir = dirs[&leader].path();
    {
        let (_, state_machine) = reopen(leader_dir).await;
        assert_eq!(
            state_machine.applied().state.version,
            5,
            "the old leader's applied state is durable"
        );
    }
    let (restarted, mut applied) = start_node(&router, leader, leader_dir).await;
    let caught_up = wait_version(&mut applied, 6).await;
    let expected = (*converged[0].state).clone().tap_join(6, write_index);
    assert_eq!(*caught_up.state, expected);
    restarted
        .wait(Some(WAIT))
        .metrics(
            |m| m.snapshot.is_some(),
            "the restarted node installed the snapshot",
        )
        .await
        .expect("snapshot installed");

    for raft in nodes.values().map(|(raft, _)| raft).chain([&restarted]) {
        raft.shutdown().await.expect("shut down");
    }
    eprintln!("three-node cluster test took {:?}", started.elapsed());
}

impl TestInfo {
    /// This state after `join(host_id)` applied at `log_index`.
    fn tap_join(mut self, host_id: u64, log_index: u64) -> TestInfo {
        self.apply(&join(host_id), log_index);
        self
    }
}
