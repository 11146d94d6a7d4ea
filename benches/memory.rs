//! Memory (not a test): `deploy/bench.sh memory` or `cargo bench --bench memory -- [MEMBERSHIPS]`.
//!
//! 1. The model's own size: builds a `roster::model::Model` through its public API with
//!    100,000 memberships (200 rooms x 500 users) and measures the heap it holds with a
//!    counting global allocator (bytes requested and still live; the allocator's own
//!    per-block overhead is not included, so live blocks are shown beside it). Built twice:
//!    from pushed events (`preview` + `commit`, as transactions arrive; this also fills the
//!    bounded window of recent event ids) and from stored rows (`restore`, as at start-up).
//! 2. roster the process: RSS with 200 agents provisioned (in-process stand-in homeserver),
//!    then after 100,000 memberships pushed as transactions into those agent rooms.

#[path = "../tests/support/mod.rs"]
mod support;

#[path = "common/mod.rs"]
mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicI64, Ordering};

use common::*;
use roster::model::{MemberDetail, MemberEvent, Membership, Model};
use ruma::{OwnedEventId, OwnedRoomId, OwnedUserId};
use support::*;

/// Counts the bytes and blocks the program holds.
struct Counting;

static LIVE_BYTES: AtomicI64 = AtomicI64::new(0);
static LIVE_BLOCKS: AtomicI64 = AtomicI64::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            LIVE_BYTES.fetch_add(layout.size() as i64, Ordering::Relaxed);
            LIVE_BLOCKS.fetch_add(1, Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE_BYTES.fetch_sub(layout.size() as i64, Ordering::Relaxed);
        LIVE_BLOCKS.fetch_sub(1, Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            LIVE_BYTES.fetch_add(new_size as i64 - layout.size() as i64, Ordering::Relaxed);
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn live() -> (i64, i64) {
    (
        LIVE_BYTES.load(Ordering::SeqCst),
        LIVE_BLOCKS.load(Ordering::SeqCst),
    )
}

const ROOMS: usize = 200;
const PER_TXN: usize = 50;

/// A Synapse-shaped room id (18 random-looking characters).
fn room_id(r: usize) -> OwnedRoomId {
    OwnedRoomId::try_from(format!("!bEnChRoOm{r:08}:{SERVER_NAME}")).unwrap()
}

fn user_id(n: usize) -> OwnedUserId {
    OwnedUserId::try_from(format!("@person_{n}:{SERVER_NAME}")).unwrap()
}

fn event_id(n: usize) -> OwnedEventId {
    OwnedEventId::try_from(format!(
        "$bench{n:08}-AbCdEfGhIjKlMnOpQrStUvWxYz0123456789ab"
    ))
    .unwrap()
}

struct Built {
    how: &'static str,
    memberships: usize,
    bytes: i64,
    blocks: i64,
}

/// Builds the model from pushed events, `PER_TXN` per transaction; measures what it holds.
fn from_events(memberships: usize) -> Built {
    let rooms: Vec<OwnedRoomId> = (0..ROOMS).map(room_id).collect();
    let (bytes0, blocks0) = live();
    let mut model = Model::new();
    for start in (0..memberships).step_by(PER_TXN) {
        let batch: Vec<MemberEvent> = (start..(start + PER_TXN).min(memberships))
            .map(|n| MemberEvent {
                room_id: rooms[n % ROOMS].clone(),
                user_id: user_id(n),
                sender: user_id(n),
                membership: Membership::Join,
                displayname: Some(format!("Person {n}")),
                avatar_url: None,
                event_id: event_id(n),
                origin_server_ts: 1_700_000_000_000 + n as u64,
            })
            .collect();
        let changes = model.preview(&batch);
        model.commit(changes);
    }
    let (bytes1, blocks1) = live();
    assert_eq!(model.membership_count(), memberships);
    let built = Built {
        how: "pushed events (preview + commit)",
        memberships,
        bytes: bytes1 - bytes0,
        blocks: blocks1 - blocks0,
    };
    drop(rooms);
    drop(model);
    built
}

/// Builds the model from stored rows, as start-up does; measures what it holds.
fn from_store(memberships: usize) -> Built {
    let rooms: Vec<OwnedRoomId> = (0..ROOMS).map(room_id).collect();
    let (bytes0, blocks0) = live();
    let mut model = Model::new();
    for n in 0..memberships {
        let detail = MemberDetail {
            event_id: Some(event_id(n)),
            sender: user_id(n),
            displayname: Some(format!("Person {n}")),
            avatar_url: None,
        };
        let state = detail.state(Membership::Join, n as u64 + 1, 1_700_000_000_000);
        drop(detail);
        model.restore(rooms[n % ROOMS].clone(), user_id(n), state);
    }
    let (bytes1, blocks1) = live();
    assert_eq!(model.membership_count(), memberships);
    Built {
        how: "stored rows (restore, as at start-up)",
        memberships,
        bytes: bytes1 - bytes0,
        blocks: blocks1 - blocks0,
    }
}

#[tokio::main]
async fn main() {
    let memberships: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(100_000);
    let built = [from_events(memberships), from_store(memberships)];

    let scratch = Scratch::new("bench-memory");
    let provisioned = provision(scratch.path(), ROOMS, "", std::time::Duration::ZERO).await;
    let roster = &provisioned.roster;
    let pid = roster.pid();
    // Let start-up settle (sweep, listing) before reading memory.
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    let rss_agents = proc_memory(pid, "VmRSS");
    let hwm_agents = proc_memory(pid, "VmHWM");
    let store_agents = store_bytes(roster);
    let bodies = member_transactions(&provisioned.rooms, memberships.div_ceil(PER_TXN), PER_TXN);
    let http = reqwest::Client::new();
    let wall = feed(
        &http,
        &roster.appservice_url(""),
        &roster.hs_token,
        "mem",
        &bodies,
        |_| {},
    )
    .await;
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    let rss_members = proc_memory(pid, "VmRSS");
    let hwm_members = proc_memory(pid, "VmHWM");
    let store_members = store_bytes(roster);
    let recorded = roster.metric("roster_member_transitions_total", &[]).await;

    println!("The model's own heap (counting allocator), {ROOMS} rooms");
    println!();
    println!(
        "| model built from | memberships | model heap | bytes/membership | live blocks/membership |"
    );
    println!("|---|---|---|---|---|");
    for b in &built {
        println!(
            "| {} | {} | {} | {:.1} | {:.2} |",
            b.how,
            b.memberships,
            mib(b.bytes as u64),
            b.bytes as f64 / b.memberships as f64,
            b.blocks as f64 / b.memberships as f64
        );
    }
    println!();
    println!("roster the process (in-process stand-in homeserver)");
    println!();
    println!("| roster state | VmRSS | VmHWM | store (db + wal) |");
    println!("|---|---|---|---|");
    println!(
        "| {ROOMS} agents provisioned, converged | {} | {} | {} |",
        mib(rss_agents),
        mib(hwm_agents),
        mib(store_agents)
    );
    println!(
        "| + {recorded} memberships pushed ({} transactions in {:.1} s) | {} | {} | {} |",
        bodies.len(),
        wall.as_secs_f64(),
        mib(rss_members),
        mib(hwm_members),
        mib(store_members)
    );
    println!();
    println!(
        "RSS growth per membership: {:.0} bytes. Machine: {}",
        (rss_members as f64 - rss_agents as f64) / recorded.max(1) as f64,
        machine()
    );
}
