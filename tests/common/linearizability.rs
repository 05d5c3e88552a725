//! A linearizability checker for single-key histories: the Wing–Gong–Lowe
//! search (as in Lowe, "Testing for linearizability", 2017, and porcupine),
//! with the memoization of (linearized set, state) pairs.
//!
//! The model is one key that is a register and a counter at once: GET reads it,
//! SET writes a value, DEL removes it, INCR adds one to an integer (a missing
//! key counts as 0) and returns the new value. Each operation carries its
//! invoke and complete instants, taken by the client, and one outcome:
//!
//! - `Ok(output)`: the client saw the reply;
//! - `Fail`: a definite error reply, so the operation never took effect (it
//!   is left out of the search);
//! - `Unknown` ("info" in Jepsen's terms): the reply was lost or ambiguous, so
//!   the operation may have taken effect at any instant after its invoke, or
//!   never.
//!
//! A history is linearizable when some order of its operations respects real
//! time (an operation that completed before another was invoked comes first),
//! gives every `Ok` operation the output it saw, and includes every `Ok`
//! operation. Histories of different keys are independent (linearizability is
//! compositional), so a multi-key test checks each key's history alone.
//!
//! Two reductions keep the search small when many replies were lost (each
//! unknown operation may take effect anywhere after its invoke, or never, so
//! each one alone could double the configurations to visit):
//!
//! - An unknown SET whose value nobody observed is left out. If it took effect,
//!   only unknown INCRs (no output) can sit between it and the next SET or DEL
//!   of some valid order, since any GET or acknowledged INCR there would return
//!   its value plus at most the number of INCRs in the history; dropping it and
//!   those INCRs leaves a valid order.
//! - Unknown INCRs are interchangeable, and so are unknown DELs: any valid
//!   order can place them in invoke order (the earlier-invoked one may take the
//!   later one's place, as it was invoked first and no reply bounds either), so
//!   the search tries only that order.
//!
//! This module owns only the pure search; it never talks to a server. The
//! tests that record histories live in `tests/linearizability.rs`.

use std::collections::HashSet;
use std::fmt;
use std::time::Instant;

/// What a client asked.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Op {
    Get,
    Set(Vec<u8>),
    Del,
    Incr,
}

/// What a client was told, for an operation that completed.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Output {
    /// SET's OK, DEL's count (not checked).
    Done,
    /// GET's value; `None` is nil.
    Value(Option<Vec<u8>>),
    /// INCR's new value.
    Integer(i64),
}

/// How an operation ended.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Outcome {
    Ok(Output),
    /// A definite error: the operation did not take effect.
    Fail,
    /// The reply was lost: the operation may take effect at any point after its invoke, or never.
    Unknown,
}

/// One operation of a history.
#[derive(Debug, Clone)]
pub struct Operation {
    pub client: usize,
    pub op: Op,
    pub invoke: Instant,
    /// When the reply arrived; ignored for `Unknown` (whose effect may come at any later time).
    pub complete: Instant,
    pub outcome: Outcome,
}

/// The value of the key: `None` when it does not exist.
pub type State = Option<Vec<u8>>;

/// Applies `op` to `state`. Returns the new state if the operation, applied there, could have
/// given `output` (`None`: any output, for operations whose reply was lost).
pub fn step(state: &State, op: &Op, output: Option<&Output>) -> Option<State> {
    match op {
        Op::Get => match output {
            None => Some(state.clone()),
            Some(Output::Value(seen)) if seen == state => Some(state.clone()),
            Some(_) => None,
        },
        Op::Set(value) => Some(Some(value.clone())),
        Op::Del => Some(None),
        Op::Incr => {
            let current: i64 = match state {
                None => 0,
                Some(bytes) => std::str::from_utf8(bytes).ok()?.parse().ok()?,
            };
            let next = current.checked_add(1)?;
            match output {
                None => Some(Some(next.to_string().into_bytes())),
                Some(Output::Integer(returned)) if *returned == next => {
                    Some(Some(next.to_string().into_bytes()))
                }
                Some(_) => None,
            }
        }
    }
}

/// Why a history is not linearizable, with enough context to read it.
#[derive(Debug, Clone)]
pub struct Violation {
    /// The most operations any order could linearize, and the state after them.
    pub linearized: usize,
    pub state_then: State,
    /// Operations still to be placed at that point (at most a handful, oldest invoke first).
    pub stuck_at: Vec<Operation>,
    /// The whole history, sorted by invoke.
    pub history: Vec<Operation>,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let origin = self.history.first().map(|o| o.invoke);
        let at = |instant: Instant| {
            origin.map_or(0.0, |o| {
                instant.saturating_duration_since(o).as_secs_f64() * 1e3
            })
        };
        writeln!(
            f,
            "not linearizable: at most {} of {} operations fit one order; the state then was {}; it could \
             not continue with any of:",
            self.linearized,
            self.history.len(),
            show_state(&self.state_then)
        )?;
        for op in &self.stuck_at {
            writeln!(f, "  {}", show_operation(op, &at))?;
        }
        // The operations around the point where the search got stuck; the whole history can be long.
        let around = self
            .stuck_at
            .first()
            .and_then(|stuck| self.history.iter().position(|o| o.invoke >= stuck.invoke))
            .unwrap_or(0);
        let (from, to) = (
            around.saturating_sub(30),
            (around + 15).min(self.history.len()),
        );
        writeln!(
            f,
            "history, operations {from}..{to} of {} by invoke (times in ms from the first invoke):",
            self.history.len()
        )?;
        for op in &self.history[from..to] {
            writeln!(f, "  {}", show_operation(op, &at))?;
        }
        Ok(())
    }
}

fn show_state(state: &State) -> String {
    match state {
        None => "nil".into(),
        Some(bytes) => format!("{:?}", String::from_utf8_lossy(bytes)),
    }
}

fn show_operation(op: &Operation, at: &dyn Fn(Instant) -> f64) -> String {
    let what = match &op.op {
        Op::Get => "GET".to_string(),
        Op::Set(v) => format!("SET {:?}", String::from_utf8_lossy(v)),
        Op::Del => "DEL".into(),
        Op::Incr => "INCR".into(),
    };
    let outcome = match &op.outcome {
        Outcome::Ok(Output::Done) => "ok".to_string(),
        Outcome::Ok(Output::Value(v)) => format!("ok {}", show_state(v)),
        Outcome::Ok(Output::Integer(n)) => format!("ok {n}"),
        Outcome::Fail => "fail".into(),
        Outcome::Unknown => "unknown".into(),
    };
    let complete = match op.outcome {
        Outcome::Unknown => "…".to_string(),
        _ => format!("{:.3}", at(op.complete)),
    };
    format!(
        "[{:.3} .. {complete}] client {} {what} -> {outcome}",
        at(op.invoke),
        op.client
    )
}

/// The check could not finish within its step budget.
#[derive(Debug, Clone)]
pub struct Inconclusive {
    pub steps: u64,
    pub operations: usize,
}

/// The result of checking one history.
#[derive(Debug)]
pub enum Verdict {
    Linearizable,
    NotLinearizable(Box<Violation>),
    Inconclusive(Inconclusive),
}

/// Default search budget: far more than a history of a few thousand operations needs.
pub const DEFAULT_STEP_BUDGET: u64 = 50_000_000;

/// One call or return event in the doubly linked list of the search.
#[derive(Clone, Copy)]
struct Event {
    /// Index into the operations being searched.
    op: usize,
    is_call: bool,
    /// For a call: the index of its return event.
    partner: usize,
    prev: usize,
    next: usize,
}

/// Checks one key's history, starting from `initial` (usually `None`: the key did not exist).
pub fn check(history: &[Operation], initial: State) -> Verdict {
    check_with_budget(history, initial, DEFAULT_STEP_BUDGET)
}

pub fn check_with_budget(history: &[Operation], initial: State, budget: u64) -> Verdict {
    let mut sorted: Vec<Operation> = history.to_vec();
    sorted.sort_by_key(|o| o.invoke);
    // Failed operations never took effect; unknown reads tell nothing.
    let ops: Vec<&Operation> = sorted
        .iter()
        .filter(|o| {
            !matches!(
                (&o.outcome, &o.op),
                (Outcome::Fail, _) | (Outcome::Unknown, Op::Get)
            )
        })
        .collect();
    let ops = without_unobserved_unknown_sets(ops);
    let n = ops.len();
    if n == 0 {
        return Verdict::Linearizable;
    }
    // Unknown INCRs and DELs are placed in invoke order: each one's rank among its
    // kind, and how many of each kind the current order holds.
    let interchangeable = |op: &Operation| match (&op.outcome, &op.op) {
        (Outcome::Unknown, Op::Incr) => Some(0),
        (Outcome::Unknown, Op::Del) => Some(1),
        _ => None,
    };
    let mut seen_of_kind = [0usize; 2];
    let rank: Vec<Option<(usize, usize)>> = ops
        .iter()
        .map(|op| {
            interchangeable(op).map(|kind| {
                seen_of_kind[kind] += 1;
                (kind, seen_of_kind[kind] - 1)
            })
        })
        .collect();
    let mut placed_of_kind = [0usize; 2];

    // Events in time order: calls at invoke, returns at complete, unknown returns at the end.
    // At equal instants a call sorts before a return, so the two operations count as concurrent.
    // `None` as the time of an unknown return sorts after every instant.
    let mut order: Vec<(Option<Instant>, bool, usize)> = Vec::with_capacity(2 * n);
    for (i, op) in ops.iter().enumerate() {
        order.push((Some(op.invoke), true, i));
        let complete = match op.outcome {
            Outcome::Unknown => None,
            _ => Some(op.complete.max(op.invoke)),
        };
        order.push((complete, false, i));
    }
    order.sort_by(|a, b| {
        let time = match (a.0, b.0) {
            (Some(x), Some(y)) => x.cmp(&y),
            (Some(_), None) => std::cmp::Ordering::Less,
            (None, Some(_)) => std::cmp::Ordering::Greater,
            (None, None) => std::cmp::Ordering::Equal,
        };
        // Calls (true) before returns (false) at the same time; then by operation for stability.
        time.then(b.1.cmp(&a.1)).then(a.2.cmp(&b.2))
    });

    // Node 0 is the list head; events are nodes 1..=2n.
    let head = 0;
    let mut events: Vec<Event> = Vec::with_capacity(2 * n + 1);
    events.push(Event {
        op: usize::MAX,
        is_call: false,
        partner: usize::MAX,
        prev: usize::MAX,
        next: 1,
    });
    let mut return_node = vec![0usize; n];
    for (position, (_, is_call, op)) in order.iter().enumerate() {
        let node = position + 1;
        events.push(Event {
            op: *op,
            is_call: *is_call,
            partner: usize::MAX,
            prev: node - 1,
            next: if position + 1 < order.len() {
                node + 1
            } else {
                usize::MAX
            },
        });
        if !is_call {
            return_node[*op] = node;
        }
    }
    for node in 1..events.len() {
        if events[node].is_call {
            events[node].partner = return_node[events[node].op];
        }
    }
    let unknown: Vec<bool> = ops.iter().map(|o| o.outcome == Outcome::Unknown).collect();

    let words = n.div_ceil(64);
    let mut linearized = vec![0u64; words];
    let mut cache: HashSet<(Vec<u64>, State)> = HashSet::new();
    let mut calls: Vec<(usize, State)> = Vec::new();
    let mut state = initial;
    let mut entry = events[head].next;
    let mut steps: u64 = 0;
    let mut best = (0usize, state.clone(), frontier(&events, head));

    let lift = |events: &mut Vec<Event>, call: usize| {
        let ret = events[call].partner;
        let (p, nx) = (events[call].prev, events[call].next);
        events[p].next = nx;
        if nx != usize::MAX {
            events[nx].prev = p;
        }
        let (p, nx) = (events[ret].prev, events[ret].next);
        events[p].next = nx;
        if nx != usize::MAX {
            events[nx].prev = p;
        }
    };
    let unlift = |events: &mut Vec<Event>, call: usize| {
        let ret = events[call].partner;
        let (p, nx) = (events[ret].prev, events[ret].next);
        events[p].next = ret;
        if nx != usize::MAX {
            events[nx].prev = ret;
        }
        let (p, nx) = (events[call].prev, events[call].next);
        events[p].next = call;
        if nx != usize::MAX {
            events[nx].prev = call;
        }
    };

    loop {
        // Everything placed, or only unknown operations left (they may never have happened).
        if entry == usize::MAX || (!events[entry].is_call && unknown[events[entry].op]) {
            return Verdict::Linearizable;
        }
        steps += 1;
        if steps > budget {
            return Verdict::Inconclusive(Inconclusive {
                steps,
                operations: n,
            });
        }
        let event = events[entry];
        if event.is_call {
            if rank[event.op].is_some_and(|(kind, rank)| rank != placed_of_kind[kind]) {
                entry = event.next;
                continue;
            }
            let op = ops[event.op];
            let output = match &op.outcome {
                Outcome::Ok(output) => Some(output),
                _ => None,
            };
            if let Some(next_state) = step(&state, &op.op, output) {
                let mut next_linearized = linearized.clone();
                next_linearized[event.op / 64] |= 1 << (event.op % 64);
                if cache.insert((next_linearized.clone(), next_state.clone())) {
                    calls.push((entry, std::mem::replace(&mut state, next_state)));
                    linearized = next_linearized;
                    if let Some((kind, _)) = rank[event.op] {
                        placed_of_kind[kind] += 1;
                    }
                    lift(&mut events, entry);
                    if calls.len() > best.0 {
                        best = (calls.len(), state.clone(), frontier(&events, head));
                    }
                    entry = events[head].next;
                    continue;
                }
            }
            entry = event.next;
        } else {
            // A return whose operation is not placed: undo the last choice.
            let Some((call, previous)) = calls.pop() else {
                return Verdict::NotLinearizable(Box::new(violation(&ops, best)));
            };
            state = previous;
            let op = events[call].op;
            linearized[op / 64] &= !(1 << (op % 64));
            if let Some((kind, _)) = rank[op] {
                placed_of_kind[kind] -= 1;
            }
            unlift(&mut events, call);
            entry = events[call].next;
        }
    }
}

/// `ops` without the unknown SETs whose value no acknowledged GET or INCR could have
/// seen, directly or through the history's INCRs (see the module's comment).
fn without_unobserved_unknown_sets(ops: Vec<&Operation>) -> Vec<&Operation> {
    let incrs = ops.iter().filter(|o| o.op == Op::Incr).count() as i64;
    let as_integer = |bytes: &[u8]| std::str::from_utf8(bytes).ok()?.parse::<i64>().ok();
    let mut read: HashSet<&[u8]> = HashSet::new();
    let mut integers: Vec<i64> = Vec::new();
    for op in &ops {
        match &op.outcome {
            Outcome::Ok(Output::Value(Some(bytes))) => {
                read.insert(bytes);
                integers.extend(as_integer(bytes));
            }
            Outcome::Ok(Output::Integer(n)) => integers.push(*n),
            _ => {}
        }
    }
    integers.sort_unstable();
    let observed = |value: &[u8]| {
        read.contains(value)
            || as_integer(value).is_some_and(|n| {
                let first = integers.partition_point(|&i| i < n);
                integers
                    .get(first)
                    .is_some_and(|&i| i <= n.saturating_add(incrs))
            })
    };
    ops.into_iter()
        .filter(|o| match (&o.outcome, &o.op) {
            (Outcome::Unknown, Op::Set(value)) => observed(value),
            _ => true,
        })
        .collect()
}

/// The operations that could be placed next: the calls listed before the first return, and the
/// operation of that return (which must be placed before anything invoked after it).
fn frontier(events: &[Event], head: usize) -> Vec<usize> {
    let mut found = Vec::new();
    let mut node = events[head].next;
    while node != usize::MAX && found.len() < 8 {
        found.push(events[node].op);
        if !events[node].is_call {
            break;
        }
        node = events[node].next;
    }
    found
}

/// Describes the deepest point the search reached.
fn violation(ops: &[&Operation], best: (usize, State, Vec<usize>)) -> Violation {
    let (linearized, state_then, frontier) = best;
    let mut seen = Vec::new();
    for op in frontier {
        if !seen.contains(&op) {
            seen.push(op);
        }
    }
    let stuck_at = seen.into_iter().map(|op| ops[op].clone()).collect();
    Violation {
        linearized,
        state_then,
        stuck_at,
        history: ops.iter().map(|o| (*o).clone()).collect(),
    }
}
