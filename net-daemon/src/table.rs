//! The command table: every command Shoal knows, with its arity and key
//! positions (as COMMAND reports them) and a one-line summary (COMMAND DOCS).
//! The dispatcher checks arity here before a command runs. [`CommandStats`]
//! counts each command's calls, errors and latency, indexed like [`COMMANDS`],
//! for INFO commandstats and the Prometheus endpoint ([`crate::metrics`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// What COMMAND says about one command.
pub struct CommandSpec {
    /// Lower-case name.
    pub name: &'static str,
    /// Redis arity: exact count if positive, minimum count if negative (the name included).
    pub arity: i64,
    pub flags: &'static [&'static str],
    pub first_key: i64,
    pub last_key: i64,
    pub step: i64,
    pub group: &'static str,
    pub summary: &'static str,
}

impl CommandSpec {
    /// Whether `args` (the name included) has an acceptable length.
    pub fn arity_ok(&self, args: usize) -> bool {
        let args = args as i64;
        if self.arity >= 0 {
            args == self.arity
        } else {
            args >= -self.arity
        }
    }
}

const W: &[&str] = &["write", "denyoom"];
const R: &[&str] = &["readonly", "fast"];
const C: &[&str] = &["fast", "stale", "loading"];

macro_rules! spec {
    ($name:literal, $arity:expr, $flags:expr, $first:expr, $last:expr, $step:expr, $group:literal, $summary:literal) => {
        CommandSpec {
            name: $name,
            arity: $arity,
            flags: $flags,
            first_key: $first,
            last_key: $last,
            step: $step,
            group: $group,
            summary: $summary,
        }
    };
}

pub static COMMANDS: &[CommandSpec] = &[
    spec!(
        "append",
        3,
        W,
        1,
        1,
        1,
        "string",
        "Appends a string to the value of a key. Creates the key if it doesn't exist."
    ),
    spec!(
        "auth",
        -2,
        C,
        0,
        0,
        0,
        "connection",
        "Authenticates the connection."
    ),
    spec!(
        "bitcount",
        -2,
        R,
        1,
        1,
        1,
        "bitmap",
        "Counts the number of set bits (population counting) in a string."
    ),
    spec!(
        "bitfield",
        -2,
        W,
        1,
        1,
        1,
        "bitmap",
        "Performs arbitrary bitfield integer operations on strings."
    ),
    spec!(
        "bitfield_ro",
        -2,
        R,
        1,
        1,
        1,
        "bitmap",
        "Performs arbitrary read-only bitfield integer operations on strings."
    ),
    spec!(
        "bitop",
        -4,
        W,
        2,
        -1,
        1,
        "bitmap",
        "Performs bitwise operations on multiple strings, and stores the result."
    ),
    spec!(
        "bitpos",
        -3,
        R,
        1,
        1,
        1,
        "bitmap",
        "Finds the first set (1) or clear (0) bit in a string."
    ),
    spec!(
        "blmove",
        6,
        W,
        1,
        2,
        1,
        "list",
        "Pops an element from a list, pushes it to another list and returns it. Blocks until an element is available otherwise. Deletes the list if the last element was moved."
    ),
    spec!(
        "blmpop",
        -5,
        W,
        0,
        0,
        0,
        "list",
        "Pops the first element from one of multiple lists. Blocks until an element is available otherwise. Deletes the list if the last element was popped."
    ),
    spec!(
        "blpop",
        -3,
        W,
        1,
        -2,
        1,
        "list",
        "Removes and returns the first element in a list. Blocks until an element is available otherwise. Deletes the list if the last element was popped."
    ),
    spec!(
        "brpop",
        -3,
        W,
        1,
        -2,
        1,
        "list",
        "Removes and returns the last element in a list. Blocks until an element is available otherwise. Deletes the list if the last element was popped."
    ),
    spec!(
        "brpoplpush",
        4,
        W,
        1,
        2,
        1,
        "list",
        "Pops an element from a list, pushes it to another list and returns it. Block until an element is available otherwise. Deletes the list if the last element was popped."
    ),
    spec!(
        "bzmpop",
        -5,
        W,
        0,
        0,
        0,
        "sorted-set",
        "Removes and returns a member by score from one or more sorted sets. Blocks until a member is available otherwise. Deletes the sorted set if the last element was popped."
    ),
    spec!(
        "bzpopmax",
        -3,
        W,
        1,
        -2,
        1,
        "sorted-set",
        "Removes and returns the member with the highest score from one or more sorted sets. Blocks until a member available otherwise. Deletes the sorted set if the last element was popped."
    ),
    spec!(
        "bzpopmin",
        -3,
        W,
        1,
        -2,
        1,
        "sorted-set",
        "Removes and returns the member with the lowest score from one or more sorted sets. Blocks until a member is available otherwise. Deletes the sorted set if the last element was popped."
    ),
    spec!(
        "client",
        -2,
        C,
        0,
        0,
        0,
        "connection",
        "A container for client connection commands."
    ),
    spec!(
        "cluster",
        -2,
        C,
        0,
        0,
        0,
        "cluster",
        "A container for cluster commands (INFO, NODES, SLOTS, SHARDS, MYID, LEAVE)."
    ),
    spec!(
        "command",
        -1,
        C,
        0,
        0,
        0,
        "server",
        "Returns detailed information about all commands."
    ),
    spec!(
        "config",
        -2,
        C,
        0,
        0,
        0,
        "server",
        "A container for server configuration commands (GET only)."
    ),
    spec!(
        "copy",
        -3,
        W,
        1,
        2,
        1,
        "generic",
        "Copies the value of a key to a new key (DB, REPLACE)."
    ),
    spec!(
        "dbsize",
        1,
        R,
        0,
        0,
        0,
        "server",
        "Returns the number of keys in the selected collection."
    ),
    spec!(
        "debug",
        -2,
        &["admin", "noscript", "loading", "stale"],
        0,
        0,
        0,
        "server",
        "A container for debugging commands (Shoal has DEBUG SLEEP)."
    ),
    spec!(
        "decr",
        2,
        W,
        1,
        1,
        1,
        "string",
        "Decrements the integer value of a key by one."
    ),
    spec!(
        "decrby",
        3,
        W,
        1,
        1,
        1,
        "string",
        "Decrements a number from the integer value of a key."
    ),
    spec!(
        "del",
        -2,
        W,
        1,
        -1,
        1,
        "generic",
        "Deletes one or more keys."
    ),
    spec!(
        "discard",
        1,
        C,
        0,
        0,
        0,
        "transactions",
        "Discards a transaction."
    ),
    spec!(
        "dump",
        2,
        R,
        1,
        1,
        1,
        "keyspace",
        "Returns a serialized representation of the value stored at a key."
    ),
    spec!(
        "echo",
        2,
        C,
        0,
        0,
        0,
        "connection",
        "Returns the given string."
    ),
    spec!(
        "exec",
        1,
        C,
        0,
        0,
        0,
        "transactions",
        "Executes all commands in a transaction."
    ),
    spec!(
        "exists",
        -2,
        R,
        1,
        -1,
        1,
        "generic",
        "Determines whether one or more keys exist."
    ),
    spec!(
        "expire",
        -3,
        W,
        1,
        1,
        1,
        "generic",
        "Sets the expiration time of a key in seconds."
    ),
    spec!(
        "expireat",
        -3,
        W,
        1,
        1,
        1,
        "generic",
        "Sets the expiration time of a key to a Unix timestamp."
    ),
    spec!(
        "expiretime",
        2,
        R,
        1,
        1,
        1,
        "generic",
        "Returns the expiration time of a key as a Unix timestamp."
    ),
    spec!(
        "flushall",
        -1,
        W,
        0,
        0,
        0,
        "server",
        "Removes all keys from all collections."
    ),
    spec!(
        "flushdb",
        -1,
        W,
        0,
        0,
        0,
        "server",
        "Removes all keys from the selected collection."
    ),
    spec!(
        "function",
        -2,
        &["noscript"],
        0,
        0,
        0,
        "scripting",
        "A container for function commands (Shoal runs none: FLUSH and LIST only)."
    ),
    spec!(
        "get",
        2,
        R,
        1,
        1,
        1,
        "string",
        "Returns the string value of a key."
    ),
    spec!(
        "getbit",
        3,
        R,
        1,
        1,
        1,
        "bitmap",
        "Returns a bit value by offset."
    ),
    spec!(
        "getdel",
        2,
        W,
        1,
        1,
        1,
        "string",
        "Returns the string value of a key after deleting the key."
    ),
    spec!(
        "getex",
        -2,
        W,
        1,
        1,
        1,
        "string",
        "Returns the string value of a key after setting its expiration time."
    ),
    spec!(
        "getrange",
        4,
        R,
        1,
        1,
        1,
        "string",
        "Returns a substring of the string stored at a key."
    ),
    spec!(
        "getset",
        3,
        W,
        1,
        1,
        1,
        "string",
        "Returns the previous string value of a key after setting it to a new value."
    ),
    spec!(
        "hdel",
        -3,
        W,
        1,
        1,
        1,
        "hash",
        "Deletes one or more fields and their values from a hash. Deletes the hash if no fields remain."
    ),
    spec!(
        "hello",
        -1,
        C,
        0,
        0,
        0,
        "connection",
        "Handshakes with the server (protocol version, AUTH, SETNAME)."
    ),
    spec!(
        "hexists",
        3,
        R,
        1,
        1,
        1,
        "hash",
        "Determines whether a field exists in a hash."
    ),
    spec!(
        "hget",
        3,
        R,
        1,
        1,
        1,
        "hash",
        "Returns the value of a field in a hash."
    ),
    spec!(
        "hgetall",
        2,
        R,
        1,
        1,
        1,
        "hash",
        "Returns all fields and values in a hash."
    ),
    spec!(
        "hincrby",
        4,
        W,
        1,
        1,
        1,
        "hash",
        "Increments the integer value of a field in a hash by a number. Uses 0 as initial value if the field doesn't exist."
    ),
    spec!(
        "hincrbyfloat",
        4,
        W,
        1,
        1,
        1,
        "hash",
        "Increments the floating point value of a field by a number. Uses 0 as initial value if the field doesn't exist."
    ),
    spec!(
        "hkeys",
        2,
        R,
        1,
        1,
        1,
        "hash",
        "Returns all fields in a hash."
    ),
    spec!(
        "hlen",
        2,
        R,
        1,
        1,
        1,
        "hash",
        "Returns the number of fields in a hash."
    ),
    spec!(
        "hmget",
        -3,
        R,
        1,
        1,
        1,
        "hash",
        "Returns the values of all fields in a hash."
    ),
    spec!(
        "hmset",
        -4,
        W,
        1,
        1,
        1,
        "hash",
        "Sets the values of multiple fields."
    ),
    spec!(
        "hrandfield",
        -2,
        R,
        1,
        1,
        1,
        "hash",
        "Returns one or more random fields from a hash."
    ),
    spec!(
        "hscan",
        -3,
        R,
        1,
        1,
        1,
        "hash",
        "Iterates over fields and values of a hash."
    ),
    spec!(
        "hset",
        -4,
        W,
        1,
        1,
        1,
        "hash",
        "Creates or modifies the value of a field in a hash."
    ),
    spec!(
        "hsetnx",
        4,
        W,
        1,
        1,
        1,
        "hash",
        "Sets the value of a field in a hash only when the field doesn't exist."
    ),
    spec!(
        "hstrlen",
        3,
        R,
        1,
        1,
        1,
        "hash",
        "Returns the length of the value of a field."
    ),
    spec!(
        "hvals",
        2,
        R,
        1,
        1,
        1,
        "hash",
        "Returns all values in a hash."
    ),
    spec!(
        "id.new",
        -1,
        W,
        0,
        0,
        0,
        "shoal",
        "Returns new 64-bit ids, unique for the life of the data."
    ),
    spec!(
        "incr",
        2,
        W,
        1,
        1,
        1,
        "string",
        "Increments the integer value of a key by one."
    ),
    spec!(
        "incrby",
        3,
        W,
        1,
        1,
        1,
        "string",
        "Increments the integer value of a key by a number."
    ),
    spec!(
        "incrbyfloat",
        3,
        W,
        1,
        1,
        1,
        "string",
        "Increments the floating point value of a key by a number."
    ),
    spec!(
        "info",
        -1,
        C,
        0,
        0,
        0,
        "server",
        "Returns information and statistics about the server."
    ),
    spec!(
        "keys",
        2,
        &["readonly"],
        0,
        0,
        0,
        "generic",
        "Returns all key names that match a pattern."
    ),
    spec!(
        "lastsave",
        1,
        &["fast", "loading", "stale"],
        0,
        0,
        0,
        "server",
        "Returns the Unix timestamp of the last successful save to disk."
    ),
    spec!(
        "lcs",
        -3,
        R,
        1,
        2,
        1,
        "string",
        "Finds the longest common substring."
    ),
    spec!(
        "lindex",
        3,
        R,
        1,
        1,
        1,
        "list",
        "Returns an element from a list by its index."
    ),
    spec!(
        "linsert",
        5,
        W,
        1,
        1,
        1,
        "list",
        "Inserts an element before or after another element in a list."
    ),
    spec!(
        "llen",
        2,
        R,
        1,
        1,
        1,
        "list",
        "Returns the length of a list."
    ),
    spec!(
        "lmove",
        5,
        W,
        1,
        2,
        1,
        "list",
        "Returns an element after popping it from one list and pushing it to another. Deletes the list if the last element was moved."
    ),
    spec!(
        "lmpop",
        -4,
        W,
        0,
        0,
        0,
        "list",
        "Returns multiple elements from a list after removing them. Deletes the list if the last element was popped."
    ),
    spec!(
        "lpop",
        -2,
        W,
        1,
        1,
        1,
        "list",
        "Returns the first elements in a list after removing it. Deletes the list if the last element was popped."
    ),
    spec!(
        "lpos",
        -3,
        R,
        1,
        1,
        1,
        "list",
        "Returns the index of matching elements in a list."
    ),
    spec!(
        "lpush",
        -3,
        W,
        1,
        1,
        1,
        "list",
        "Prepends one or more elements to a list. Creates the key if it doesn't exist."
    ),
    spec!(
        "lpushx",
        -3,
        W,
        1,
        1,
        1,
        "list",
        "Prepends one or more elements to a list only when the list exists."
    ),
    spec!(
        "lrange",
        4,
        R,
        1,
        1,
        1,
        "list",
        "Returns a range of elements from a list."
    ),
    spec!(
        "lrem",
        4,
        W,
        1,
        1,
        1,
        "list",
        "Removes elements from a list. Deletes the list if the last element was removed."
    ),
    spec!(
        "lset",
        4,
        W,
        1,
        1,
        1,
        "list",
        "Sets the value of an element in a list by its index."
    ),
    spec!(
        "ltrim",
        4,
        W,
        1,
        1,
        1,
        "list",
        "Removes elements from both ends a list. Deletes the list if all elements were trimmed."
    ),
    spec!(
        "memory",
        -2,
        R,
        0,
        0,
        0,
        "server",
        "A container for memory diagnostics commands (Shoal has MEMORY USAGE)."
    ),
    spec!(
        "mget",
        -2,
        R,
        1,
        -1,
        1,
        "string",
        "Atomically returns the string values of one or more keys."
    ),
    spec!(
        "move",
        3,
        W,
        1,
        1,
        1,
        "keyspace",
        "Moves a key to another database."
    ),
    spec!(
        "mset",
        -3,
        W,
        1,
        -1,
        2,
        "string",
        "Atomically creates or modifies the string values of one or more keys."
    ),
    spec!(
        "msetnx",
        -3,
        W,
        1,
        -1,
        2,
        "string",
        "Atomically sets keys only when none of them exist."
    ),
    spec!(
        "multi",
        1,
        C,
        0,
        0,
        0,
        "transactions",
        "Starts a transaction."
    ),
    spec!(
        "object",
        -2,
        &["readonly"],
        2,
        2,
        1,
        "generic",
        "A container for object introspection commands (ENCODING)."
    ),
    spec!(
        "persist",
        2,
        W,
        1,
        1,
        1,
        "generic",
        "Removes the expiration time of a key."
    ),
    spec!(
        "pexpire",
        -3,
        W,
        1,
        1,
        1,
        "generic",
        "Sets the expiration time of a key in milliseconds."
    ),
    spec!(
        "pexpireat",
        -3,
        W,
        1,
        1,
        1,
        "generic",
        "Sets the expiration time of a key to a Unix milliseconds timestamp."
    ),
    spec!(
        "pexpiretime",
        2,
        R,
        1,
        1,
        1,
        "generic",
        "Returns the expiration time of a key as a Unix milliseconds timestamp."
    ),
    spec!(
        "ping",
        -1,
        C,
        0,
        0,
        0,
        "connection",
        "Returns the server's liveliness response."
    ),
    spec!(
        "psetex",
        4,
        W,
        1,
        1,
        1,
        "string",
        "Sets both string value and expiration time in milliseconds of a key. The key is created if it doesn't exist."
    ),
    spec!(
        "psubscribe",
        -2,
        &["pubsub", "noscript", "loading", "stale"],
        0,
        0,
        0,
        "pubsub",
        "Listens for messages published to channels that match one or more patterns."
    ),
    spec!(
        "pttl",
        2,
        R,
        1,
        1,
        1,
        "generic",
        "Returns the expiration time in milliseconds of a key."
    ),
    spec!(
        "publish",
        3,
        &["pubsub", "noscript", "loading", "stale"],
        0,
        0,
        0,
        "pubsub",
        "Posts a message to a channel."
    ),
    spec!(
        "pubsub",
        -2,
        &["pubsub", "noscript", "loading", "stale"],
        0,
        0,
        0,
        "pubsub",
        "A container for Pub/Sub commands."
    ),
    spec!(
        "punsubscribe",
        -1,
        &["pubsub", "noscript", "loading", "stale"],
        0,
        0,
        0,
        "pubsub",
        "Stops listening to messages published to channels that match one or more patterns."
    ),
    spec!(
        "quit",
        -1,
        C,
        0,
        0,
        0,
        "connection",
        "Closes the connection."
    ),
    spec!(
        "randomkey",
        1,
        &["readonly"],
        0,
        0,
        0,
        "keyspace",
        "Returns a random key name from the database."
    ),
    spec!(
        "readonly",
        1,
        C,
        0,
        0,
        0,
        "cluster",
        "Lets the connection's GET and MGET be served by the nearest in-sync replica."
    ),
    spec!(
        "readwrite",
        1,
        C,
        0,
        0,
        0,
        "cluster",
        "Sends the connection's reads to the primaries again (the default)."
    ),
    spec!(
        "rename",
        3,
        W,
        1,
        2,
        1,
        "generic",
        "Renames a key and overwrites the destination."
    ),
    spec!(
        "renamenx",
        3,
        W,
        1,
        2,
        1,
        "generic",
        "Renames a key only when the target key name doesn't exist."
    ),
    spec!(
        "reset",
        1,
        &["noscript", "loading", "stale", "fast"],
        0,
        0,
        0,
        "connection",
        "Resets the connection."
    ),
    spec!(
        "restore",
        -4,
        W,
        1,
        1,
        1,
        "keyspace",
        "Creates a key from the serialized representation of a value."
    ),
    spec!(
        "rpop",
        -2,
        W,
        1,
        1,
        1,
        "list",
        "Returns and removes the last elements of a list. Deletes the list if the last element was popped."
    ),
    spec!(
        "rpoplpush",
        3,
        W,
        1,
        2,
        1,
        "list",
        "Returns the last element of a list after removing and pushing it to another list. Deletes the list if the last element was popped."
    ),
    spec!(
        "rpush",
        -3,
        W,
        1,
        1,
        1,
        "list",
        "Appends one or more elements to a list. Creates the key if it doesn't exist."
    ),
    spec!(
        "rpushx",
        -3,
        W,
        1,
        1,
        1,
        "list",
        "Appends an element to a list only when the list exists."
    ),
    spec!(
        "sadd",
        -3,
        W,
        1,
        1,
        1,
        "set",
        "Adds one or more members to a set. Creates the key if it doesn't exist."
    ),
    spec!(
        "scan",
        -2,
        &["readonly"],
        0,
        0,
        0,
        "generic",
        "Iterates over the key names in the collection (MATCH, COUNT, TYPE)."
    ),
    spec!(
        "scard",
        2,
        R,
        1,
        1,
        1,
        "set",
        "Returns the number of members in a set."
    ),
    spec!(
        "sdiff",
        -2,
        R,
        1,
        -1,
        1,
        "set",
        "Returns the difference of multiple sets."
    ),
    spec!(
        "sdiffstore",
        -3,
        W,
        1,
        -1,
        1,
        "set",
        "Stores the difference of multiple sets in a key."
    ),
    spec!(
        "select",
        2,
        C,
        0,
        0,
        0,
        "connection",
        "Changes the selected collection."
    ),
    spec!(
        "set",
        -3,
        W,
        1,
        1,
        1,
        "string",
        "Sets the string value of a key (NX, XX, GET)."
    ),
    spec!(
        "setbit",
        4,
        W,
        1,
        1,
        1,
        "bitmap",
        "Sets or clears the bit at offset of the string value. Creates the key if it doesn't exist."
    ),
    spec!(
        "setex",
        4,
        W,
        1,
        1,
        1,
        "string",
        "Sets the string value and expiration time of a key. Creates the key if it doesn't exist."
    ),
    spec!(
        "setnx",
        3,
        W,
        1,
        1,
        1,
        "string",
        "Set the string value of a key only when the key doesn't exist."
    ),
    spec!(
        "setrange",
        4,
        W,
        1,
        1,
        1,
        "string",
        "Overwrites a part of a string value with another by an offset."
    ),
    spec!(
        "shoal.backup",
        2,
        &["admin"],
        0,
        0,
        0,
        "shoal",
        "Copies every shard to a directory on the server's host, with a manifest of commit ids."
    ),
    spec!(
        "shoal.digest",
        2,
        R,
        0,
        0,
        0,
        "shoal",
        "Returns this host's copy of a partition: last commit id, key count and checksum."
    ),
    spec!(
        "shoal.feed",
        -2,
        &["readonly"],
        0,
        0,
        0,
        "shoal",
        "Reads the change feed of every partition from a cursor (COUNT, BLOCK)."
    ),
    spec!(
        "shoal.hosts",
        1,
        C,
        0,
        0,
        0,
        "shoal",
        "Lists every host of the cluster: state, scores, round trips, coordinates, id ranges."
    ),
    spec!(
        "shoal.log",
        -3,
        &["readonly"],
        0,
        0,
        0,
        "shoal",
        "Reads a partition's commit log from a commit id."
    ),
    spec!(
        "shoal.partition",
        2,
        R,
        1,
        1,
        1,
        "shoal",
        "Returns the partition a key belongs to."
    ),
    spec!(
        "shoal.txns",
        1,
        R,
        0,
        0,
        0,
        "shoal",
        "Returns the number of multi-worker transactions still prepared."
    ),
    spec!(
        "shutdown",
        -1,
        &["admin", "noscript", "loading", "stale"],
        0,
        0,
        0,
        "server",
        "Synchronously saves the database(s) to disk and shuts down the Redis server."
    ),
    spec!(
        "sinter",
        -2,
        R,
        1,
        -1,
        1,
        "set",
        "Returns the intersect of multiple sets."
    ),
    spec!(
        "sintercard",
        -3,
        R,
        0,
        0,
        0,
        "set",
        "Returns the number of members of the intersect of multiple sets."
    ),
    spec!(
        "sinterstore",
        -3,
        W,
        1,
        -1,
        1,
        "set",
        "Stores the intersect of multiple sets in a key."
    ),
    spec!(
        "sismember",
        3,
        R,
        1,
        1,
        1,
        "set",
        "Determines whether a member belongs to a set."
    ),
    spec!(
        "smembers",
        2,
        R,
        1,
        1,
        1,
        "set",
        "Returns all members of a set."
    ),
    spec!(
        "smismember",
        -3,
        R,
        1,
        1,
        1,
        "set",
        "Determines whether multiple members belong to a set."
    ),
    spec!(
        "smove",
        4,
        W,
        1,
        2,
        1,
        "set",
        "Moves a member from one set to another."
    ),
    spec!(
        "sort",
        -2,
        W,
        1,
        1,
        1,
        "generic",
        "Sorts the elements in a list, a set, or a sorted set, optionally storing the result."
    ),
    spec!(
        "sort_ro",
        -2,
        &["readonly"],
        1,
        1,
        1,
        "generic",
        "Returns the sorted elements of a list, a set, or a sorted set."
    ),
    spec!(
        "spop",
        -2,
        W,
        1,
        1,
        1,
        "set",
        "Returns one or more random members from a set after removing them. Deletes the set if the last member was popped."
    ),
    spec!(
        "spublish",
        3,
        &["pubsub", "noscript", "loading", "stale"],
        1,
        1,
        1,
        "pubsub",
        "Post a message to a shard channel"
    ),
    spec!(
        "srandmember",
        -2,
        R,
        1,
        1,
        1,
        "set",
        "Get one or multiple random members from a set"
    ),
    spec!(
        "srem",
        -3,
        W,
        1,
        1,
        1,
        "set",
        "Removes one or more members from a set. Deletes the set if the last member was removed."
    ),
    spec!(
        "sscan",
        -3,
        R,
        1,
        1,
        1,
        "set",
        "Iterates over members of a set."
    ),
    spec!(
        "ssubscribe",
        -2,
        &["pubsub", "noscript", "loading", "stale"],
        1,
        -1,
        1,
        "pubsub",
        "Listens for messages published to shard channels."
    ),
    spec!(
        "strlen",
        2,
        R,
        1,
        1,
        1,
        "string",
        "Returns the length of a string value."
    ),
    spec!(
        "subscribe",
        -2,
        &["pubsub", "noscript", "loading", "stale"],
        0,
        0,
        0,
        "pubsub",
        "Listens for messages published to channels."
    ),
    spec!(
        "substr",
        4,
        R,
        1,
        1,
        1,
        "string",
        "Returns a substring from a string value."
    ),
    spec!(
        "sunion",
        -2,
        R,
        1,
        -1,
        1,
        "set",
        "Returns the union of multiple sets."
    ),
    spec!(
        "sunionstore",
        -3,
        W,
        1,
        -1,
        1,
        "set",
        "Stores the union of multiple sets in a key."
    ),
    spec!(
        "sunsubscribe",
        -1,
        &["pubsub", "noscript", "loading", "stale"],
        1,
        -1,
        1,
        "pubsub",
        "Stops listening to messages posted to shard channels."
    ),
    spec!(
        "swapdb",
        3,
        &["write", "fast"],
        0,
        0,
        0,
        "server",
        "Swaps two databases."
    ),
    spec!(
        "time",
        1,
        &["fast", "loading", "stale"],
        0,
        0,
        0,
        "server",
        "Returns the server time."
    ),
    spec!(
        "touch",
        -2,
        R,
        1,
        -1,
        1,
        "keyspace",
        "Returns the number of existing keys out of those specified after updating the time they were last accessed."
    ),
    spec!(
        "ttl",
        2,
        R,
        1,
        1,
        1,
        "generic",
        "Returns the expiration time in seconds of a key."
    ),
    spec!(
        "type",
        2,
        R,
        1,
        1,
        1,
        "generic",
        "Determines the type of value stored at a key."
    ),
    spec!(
        "unlink",
        -2,
        W,
        1,
        -1,
        1,
        "generic",
        "Deletes one or more keys."
    ),
    spec!(
        "unsubscribe",
        -1,
        &["pubsub", "noscript", "loading", "stale"],
        0,
        0,
        0,
        "pubsub",
        "Stops listening to messages posted to channels."
    ),
    spec!(
        "unwatch",
        1,
        C,
        0,
        0,
        0,
        "transactions",
        "Forgets about watched keys of a transaction."
    ),
    spec!(
        "wait",
        3,
        &[],
        0,
        0,
        0,
        "generic",
        "Blocks until the connection's writes are held by a number of replicas, or a timeout."
    ),
    spec!(
        "watch",
        -2,
        C,
        1,
        -1,
        1,
        "transactions",
        "Monitors changes to keys to determine the execution of a transaction."
    ),
    spec!(
        "zadd",
        -4,
        W,
        1,
        1,
        1,
        "sorted-set",
        "Adds one or more members to a sorted set, or updates their scores. Creates the key if it doesn't exist."
    ),
    spec!(
        "zcard",
        2,
        R,
        1,
        1,
        1,
        "sorted-set",
        "Returns the number of members in a sorted set."
    ),
    spec!(
        "zcount",
        4,
        R,
        1,
        1,
        1,
        "sorted-set",
        "Returns the count of members in a sorted set that have scores within a range."
    ),
    spec!(
        "zdiff",
        -3,
        R,
        0,
        0,
        0,
        "sorted-set",
        "Returns the difference between multiple sorted sets."
    ),
    spec!(
        "zdiffstore",
        -4,
        W,
        1,
        1,
        1,
        "sorted-set",
        "Stores the difference of multiple sorted sets in a key."
    ),
    spec!(
        "zincrby",
        4,
        W,
        1,
        1,
        1,
        "sorted-set",
        "Increments the score of a member in a sorted set."
    ),
    spec!(
        "zinter",
        -3,
        R,
        0,
        0,
        0,
        "sorted-set",
        "Returns the intersect of multiple sorted sets."
    ),
    spec!(
        "zintercard",
        -3,
        R,
        0,
        0,
        0,
        "sorted-set",
        "Returns the number of members of the intersect of multiple sorted sets."
    ),
    spec!(
        "zinterstore",
        -4,
        W,
        1,
        1,
        1,
        "sorted-set",
        "Stores the intersect of multiple sorted sets in a key."
    ),
    spec!(
        "zlexcount",
        4,
        R,
        1,
        1,
        1,
        "sorted-set",
        "Returns the number of members in a sorted set within a lexicographical range."
    ),
    spec!(
        "zmpop",
        -4,
        W,
        0,
        0,
        0,
        "sorted-set",
        "Returns the highest- or lowest-scoring members from one or more sorted sets after removing them. Deletes the sorted set if the last member was popped."
    ),
    spec!(
        "zmscore",
        -3,
        R,
        1,
        1,
        1,
        "sorted-set",
        "Returns the score of one or more members in a sorted set."
    ),
    spec!(
        "zpopmax",
        -2,
        W,
        1,
        1,
        1,
        "sorted-set",
        "Returns the highest-scoring members from a sorted set after removing them. Deletes the sorted set if the last member was popped."
    ),
    spec!(
        "zpopmin",
        -2,
        W,
        1,
        1,
        1,
        "sorted-set",
        "Returns the lowest-scoring members from a sorted set after removing them. Deletes the sorted set if the last member was popped."
    ),
    spec!(
        "zrandmember",
        -2,
        R,
        1,
        1,
        1,
        "sorted-set",
        "Returns one or more random members from a sorted set."
    ),
    spec!(
        "zrange",
        -4,
        R,
        1,
        1,
        1,
        "sorted-set",
        "Returns members in a sorted set within a range of indexes."
    ),
    spec!(
        "zrangebylex",
        -4,
        R,
        1,
        1,
        1,
        "sorted-set",
        "Returns members in a sorted set within a lexicographical range."
    ),
    spec!(
        "zrangebyscore",
        -4,
        R,
        1,
        1,
        1,
        "sorted-set",
        "Returns members in a sorted set within a range of scores."
    ),
    spec!(
        "zrangestore",
        -5,
        W,
        1,
        2,
        1,
        "sorted-set",
        "Stores a range of members from sorted set in a key."
    ),
    spec!(
        "zrank",
        3,
        R,
        1,
        1,
        1,
        "sorted-set",
        "Returns the index of a member in a sorted set ordered by ascending scores."
    ),
    spec!(
        "zrem",
        -3,
        W,
        1,
        1,
        1,
        "sorted-set",
        "Removes one or more members from a sorted set. Deletes the sorted set if all members were removed."
    ),
    spec!(
        "zremrangebylex",
        4,
        W,
        1,
        1,
        1,
        "sorted-set",
        "Removes members in a sorted set within a lexicographical range. Deletes the sorted set if all members were removed."
    ),
    spec!(
        "zremrangebyrank",
        4,
        W,
        1,
        1,
        1,
        "sorted-set",
        "Removes members in a sorted set within a range of indexes. Deletes the sorted set if all members were removed."
    ),
    spec!(
        "zremrangebyscore",
        4,
        W,
        1,
        1,
        1,
        "sorted-set",
        "Removes members in a sorted set within a range of scores. Deletes the sorted set if all members were removed."
    ),
    spec!(
        "zrevrange",
        -4,
        R,
        1,
        1,
        1,
        "sorted-set",
        "Returns members in a sorted set within a range of indexes in reverse order."
    ),
    spec!(
        "zrevrangebylex",
        -4,
        R,
        1,
        1,
        1,
        "sorted-set",
        "Returns members in a sorted set within a lexicographical range in reverse order."
    ),
    spec!(
        "zrevrangebyscore",
        -4,
        R,
        1,
        1,
        1,
        "sorted-set",
        "Returns members in a sorted set within a range of scores in reverse order."
    ),
    spec!(
        "zrevrank",
        3,
        R,
        1,
        1,
        1,
        "sorted-set",
        "Returns the index of a member in a sorted set ordered by descending scores."
    ),
    spec!(
        "zscan",
        -3,
        R,
        1,
        1,
        1,
        "sorted-set",
        "Iterates over members and scores of a sorted set."
    ),
    spec!(
        "zscore",
        3,
        R,
        1,
        1,
        1,
        "sorted-set",
        "Returns the score of a member in a sorted set."
    ),
    spec!(
        "zunion",
        -3,
        R,
        0,
        0,
        0,
        "sorted-set",
        "Returns the union of multiple sorted sets."
    ),
    spec!(
        "zunionstore",
        -4,
        W,
        1,
        1,
        1,
        "sorted-set",
        "Stores the union of multiple sorted sets in a key."
    ),
];

/// Looks up a command by its lower-case name.
#[cfg(test)]
fn lookup(name: &str) -> Option<&'static CommandSpec> {
    index_of(name).map(|index| &COMMANDS[index])
}

/// The position of a command in [`COMMANDS`], by its lower-case name.
pub fn index_of(name: &str) -> Option<usize> {
    COMMANDS.binary_search_by(|spec| spec.name.cmp(name)).ok()
}

/// The position of the command a request names, whatever its letter case.
pub fn index_of_request(name: &[u8]) -> Option<usize> {
    let mut lower = [0u8; 32];
    let lower = lower.get_mut(..name.len())?;
    lower.copy_from_slice(name);
    lower.make_ascii_lowercase();
    index_of(std::str::from_utf8(lower).ok()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_is_sorted_for_lookup() {
        assert!(COMMANDS.windows(2).all(|pair| pair[0].name < pair[1].name));
        assert!(lookup("get").is_some());
        assert!(lookup("nope").is_none());
        assert!(lookup("set").unwrap().arity_ok(3));
        assert!(!lookup("get").unwrap().arity_ok(3));
    }
}

/// Upper bounds of the command latency buckets, in microseconds.
pub(crate) const LATENCY_MICROS_BOUNDS: [u64; 10] =
    [50, 100, 250, 500, 1000, 2500, 5000, 10_000, 50_000, 250_000];
/// Counters of one command.
#[derive(Default)]
pub(crate) struct CommandCounters {
    pub(crate) calls: AtomicU64,
    pub(crate) errors: AtomicU64,
    pub(crate) micros_sum: AtomicU64,
    /// Per bucket of [`LATENCY_MICROS_BOUNDS`], plus +Inf.
    pub(crate) buckets: [AtomicU64; LATENCY_MICROS_BOUNDS.len() + 1],
}

/// Per-command statistics, indexed like [`COMMANDS`].
pub struct CommandStats {
    pub(crate) commands: Vec<CommandCounters>,
}

impl Default for CommandStats {
    fn default() -> Self {
        CommandStats {
            commands: COMMANDS
                .iter()
                .map(|_| CommandCounters::default())
                .collect(),
        }
    }
}

impl CommandStats {
    /// Records one call of command `index` that took `took` and did or did not fail.
    pub fn record(&self, index: usize, took: Duration, failed: bool) {
        let Some(counters) = self.commands.get(index) else {
            return;
        };
        let micros = took.as_micros() as u64;
        counters.calls.fetch_add(1, Ordering::Relaxed);
        counters
            .errors
            .fetch_add(u64::from(failed), Ordering::Relaxed);
        counters.micros_sum.fetch_add(micros, Ordering::Relaxed);
        let bucket = shoal_shared::status::bucket(&LATENCY_MICROS_BOUNDS, micros);
        counters.buckets[bucket].fetch_add(1, Ordering::Relaxed);
    }

    /// Sets every counter back to 0 (CONFIG RESETSTAT).
    pub fn reset(&self) {
        for counters in &self.commands {
            counters.calls.store(0, Ordering::Relaxed);
            counters.errors.store(0, Ordering::Relaxed);
            counters.micros_sum.store(0, Ordering::Relaxed);
            for bucket in &counters.buckets {
                bucket.store(0, Ordering::Relaxed);
            }
        }
    }

    /// `(name, calls, errors, micros)` of every command called at least once.
    pub fn summary(&self) -> Vec<(&'static str, u64, u64, u64)> {
        COMMANDS
            .iter()
            .zip(&self.commands)
            .map(|(spec, c)| {
                let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
                (
                    spec.name,
                    load(&c.calls),
                    load(&c.errors),
                    load(&c.micros_sum),
                )
            })
            .filter(|(_, calls, _, _)| *calls > 0)
            .collect()
    }
}
