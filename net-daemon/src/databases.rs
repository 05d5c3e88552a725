//! The database numbers clients see, and SWAPDB.
//!
//! A connection translates its database into a storage collection
//! ([`DatabaseMap`]) when it dispatches a command. It holds a [`Ticket`] (a read
//! lock of the map) from the first command of a batch until the last reply of the
//! batch is made; each pending reply keeps a share of it. SWAPDB takes the write lock:
//! it waits until every command dispatched under the old map has been answered, and no
//! command is dispatched until the new map is on disk. So SWAPDB is one instant between
//! the commands before it and the commands after it, on every worker at once.
//!
//! Work that may wait on other clients (a blocking pop) holds no ticket while it waits:
//! it takes one for each try and translates its database again, so a pop blocked on a
//! database that SWAPDB moved watches that database's new keys, as in Redis.

use std::path::PathBuf;
use std::sync::Arc;

use shoal_shared::databases::DatabaseMap;
use shoal_shared::resp::{parse_i64, Reply};
use tokio::sync::{OwnedRwLockReadGuard, RwLock};

use crate::errors;

/// A read lock of the database map: while any is held, no SWAPDB completes.
pub type Ticket = Arc<OwnedRwLockReadGuard<DatabaseMap>>;

/// This host's database map and where it is kept.
pub struct Databases {
    map: Arc<RwLock<DatabaseMap>>,
    data_dir: PathBuf,
}

impl Databases {
    /// The map `map`, read from `data_dir`.
    pub fn new(map: DatabaseMap, data_dir: PathBuf) -> Databases {
        Databases {
            map: Arc::new(RwLock::new(map)),
            data_dir,
        }
    }

    /// A ticket for a batch of commands (waits while a SWAPDB completes).
    pub async fn ticket(&self) -> Ticket {
        Arc::new(Arc::clone(&self.map).read_owned().await)
    }

    /// Exchanges databases `a` and `b`: waits for every command already dispatched,
    /// writes the new map durably, then lets commands go on under it. The caller must
    /// hold no ticket.
    pub async fn swap(&self, a: u16, b: u16) -> Result<(), String> {
        let mut map = self.map.write().await;
        let next = map.swapped(a, b);
        let data_dir = self.data_dir.clone();
        let stored = next.clone();
        tokio::task::spawn_blocking(move || stored.store(&data_dir))
            .await
            .map_err(|error| error.to_string())?
            .map_err(|error| format!("writing the database map: {error}"))?;
        tracing::info!(a, b, "databases swapped");
        *map = next;
        Ok(())
    }

    /// The map as it is now.
    pub async fn now(&self) -> DatabaseMap {
        self.map.read().await.clone()
    }
}

/// A database number argument (SELECT, MOVE, COPY ... DB): an integer below `count`, or
/// Redis's error.
pub fn number(arg: &[u8], count: u16) -> Result<u16, Reply> {
    match parse_i64(arg) {
        Some(db) if (0..i64::from(count)).contains(&db) => Ok(db as u16),
        Some(_) => Err(Reply::error("ERR DB index is out of range")),
        None => Err(errors::not_integer()),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn temp_dir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!("shoal-swapdb-{}", shoal_shared::random_u64()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[tokio::test]
    async fn a_swap_waits_for_every_ticket_and_holds_back_new_ones_until_it_is_on_disk() {
        let dir = temp_dir();
        let databases = Arc::new(Databases::new(DatabaseMap::identity(4), dir.clone()));
        let held = databases.ticket().await;
        assert_eq!(held.collection(0), 0);

        let swapping = tokio::spawn({
            let databases = Arc::clone(&databases);
            async move { databases.swap(0, 2).await }
        });
        tokio::task::yield_now().await;
        // A batch that starts now waits for the swap, and then sees the new map.
        let later = tokio::spawn({
            let databases = Arc::clone(&databases);
            async move { databases.ticket().await.collection(0) }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            !swapping.is_finished(),
            "the swap ran while a ticket was held"
        );
        assert!(
            !later.is_finished(),
            "a batch started under the old map mid-swap"
        );
        assert!(!dir.join(shoal_shared::databases::FILE).exists());

        drop(held);
        swapping.await.unwrap().unwrap();
        assert_eq!(later.await.unwrap(), 2);
        let stored = DatabaseMap::load(&dir, 4).unwrap();
        assert_eq!((stored.collection(0), stored.collection(2)), (2, 0));

        databases.swap(2, 0).await.unwrap();
        assert!(databases.now().await.is_identity());
        assert!(!dir.join(shoal_shared::databases::FILE).exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
