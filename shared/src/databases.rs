//! Which storage collection holds each database number.
//!
//! Clients name databases (SELECT, MOVE, COPY ... DB, SWAPDB); the workers keep keys in
//! collections (`c<N>`, see [`crate::layout`]), and the log, the expiry index and the
//! change feed name collections too. A database and its collection have the same number
//! until SWAPDB exchanges two databases: it swaps their entries in this map and moves no
//! key, so it is O(1) whatever the databases hold.
//!
//! The map lives in `data_dir/databases`, a text file that lists only the databases
//! whose collection differs from their number:
//!
//! ```text
//! # database collection
//! 0 1
//! 1 0
//! ```
//!
//! A data dir without the file maps every database to its own collection. The map is a
//! host's own: a host in a cluster keeps every database in its own collection (SWAPDB is
//! refused there, as Redis Cluster refuses it).

use std::path::Path;

/// The map's file in the data dir.
pub const FILE: &str = "databases";

/// The collection of each database number (`collections[db]`); always a permutation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatabaseMap {
    collections: Vec<u16>,
}

impl DatabaseMap {
    /// Every one of `count` databases in its own collection.
    pub fn identity(count: u16) -> DatabaseMap {
        DatabaseMap {
            collections: (0..count).collect(),
        }
    }

    /// How many databases there are.
    pub fn len(&self) -> u16 {
        self.collections.len() as u16
    }

    /// Whether there are no databases (never, once validated).
    pub fn is_empty(&self) -> bool {
        self.collections.is_empty()
    }

    /// The collection that holds database `db` (`db` below [`Self::len`]).
    pub fn collection(&self, db: u16) -> u16 {
        self.collections[usize::from(db)]
    }

    /// The database whose keys collection `collection` holds.
    pub fn database(&self, collection: u16) -> u16 {
        self.collections
            .iter()
            .position(|&c| c == collection)
            .map_or(collection, |db| db as u16)
    }

    /// Whether every database is in its own collection.
    pub fn is_identity(&self) -> bool {
        self.changed().is_empty()
    }

    /// The `[database, collection]` pairs that differ, in database order.
    pub fn changed(&self) -> Vec<[u16; 2]> {
        (0..self.len())
            .map(|db| [db, self.collection(db)])
            .filter(|[db, collection]| db != collection)
            .collect()
    }

    /// This map with databases `a` and `b` exchanged.
    pub fn swapped(&self, a: u16, b: u16) -> DatabaseMap {
        let mut next = self.clone();
        next.collections.swap(usize::from(a), usize::from(b));
        next
    }

    /// The map of `count` databases in which the `changed` pairs differ; fails unless
    /// they make a permutation of `0..count`.
    pub fn from_changed(count: u16, changed: &[[u16; 2]]) -> Result<DatabaseMap, String> {
        let mut map = DatabaseMap::identity(count);
        let mut seen = vec![false; usize::from(count)];
        for &[db, collection] in changed {
            if db >= count || collection >= count {
                return Err(format!(
                    "database {db} in collection {collection}: storage.collections is {count}"
                ));
            }
            if seen[usize::from(db)] {
                return Err(format!("database {db} is listed twice"));
            }
            seen[usize::from(db)] = true;
            map.collections[usize::from(db)] = collection;
        }
        let mut used = vec![false; usize::from(count)];
        for &collection in &map.collections {
            if std::mem::replace(&mut used[usize::from(collection)], true) {
                return Err(format!(
                    "collection {collection} holds two databases; each must hold one"
                ));
            }
        }
        Ok(map)
    }

    /// Parses the file's text for `count` databases.
    pub fn parse(text: &str, count: u16) -> Result<DatabaseMap, String> {
        let mut changed = Vec::new();
        for (number, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let fields: Vec<&str> = line.split_whitespace().collect();
            match fields[..] {
                [db, collection] => match (db.parse(), collection.parse()) {
                    (Ok(db), Ok(collection)) => changed.push([db, collection]),
                    _ => return Err(format!("line {}: not two numbers", number + 1)),
                },
                _ => {
                    return Err(format!(
                        "line {}: expected `database collection`",
                        number + 1
                    ))
                }
            }
        }
        DatabaseMap::from_changed(count, &changed)
    }

    /// The file's text.
    pub fn to_text(&self) -> String {
        let mut text = String::from(
            "# Shoal: the storage collection of each database that SWAPDB moved.\n\
             # database collection\n",
        );
        for [db, collection] in self.changed() {
            text.push_str(&format!("{db} {collection}\n"));
        }
        text
    }

    /// Reads the map of a data dir with `count` databases (`storage.collections`).
    pub fn load(data_dir: &Path, count: u16) -> Result<DatabaseMap, String> {
        let path = data_dir.join(FILE);
        match std::fs::read_to_string(&path) {
            Ok(text) => DatabaseMap::parse(&text, count)
                .map_err(|error| format!("{}: {error}", path.display())),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                Ok(DatabaseMap::identity(count))
            }
            Err(error) => Err(format!("reading {}: {error}", path.display())),
        }
    }

    /// Reads the map of the data dir `config` names, and refuses a moved database on a
    /// host that is in a cluster.
    pub fn load_for(config: &crate::config::Config) -> Result<DatabaseMap, String> {
        let map = DatabaseMap::load(&config.data_dir, config.storage.collections)?;
        if config.cluster.secret.is_some() && !map.is_identity() {
            return Err(format!(
                "{}: SWAPDB moved databases on this host, and a host in a cluster keeps each \
                 database in its own collection; start it without [cluster] and SWAPDB them \
                 back first",
                config.data_dir.join(FILE).display()
            ));
        }
        Ok(map)
    }

    /// Writes the map into a data dir durably (the file is replaced whole, and removed
    /// when every database is in its own collection).
    pub fn store(&self, data_dir: &Path) -> std::io::Result<()> {
        let path = data_dir.join(FILE);
        if self.is_identity() {
            match std::fs::remove_file(&path) {
                Ok(()) => std::fs::File::open(data_dir)?.sync_all(),
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(error) => Err(error),
            }
        } else {
            crate::config::write_durably(&path, self.to_text().as_bytes())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_swap_round_trips_through_the_file_and_back() {
        let map = DatabaseMap::identity(16).swapped(0, 3).swapped(3, 7);
        assert_eq!(map.collection(0), 3);
        assert_eq!(map.collection(3), 7);
        assert_eq!(map.collection(7), 0);
        assert_eq!(map.database(7), 3);
        assert_eq!(DatabaseMap::parse(&map.to_text(), 16), Ok(map.clone()));
        assert!(map.swapped(3, 7).swapped(0, 3).is_identity());
    }

    #[test]
    fn a_file_that_is_not_a_permutation_is_refused() {
        assert!(DatabaseMap::parse("0 1\n", 16)
            .unwrap_err()
            .contains("holds two"));
        assert!(DatabaseMap::parse("0 1\n0 1\n1 0\n", 16)
            .unwrap_err()
            .contains("twice"));
        assert!(DatabaseMap::parse("0 16\n16 0\n", 16)
            .unwrap_err()
            .contains("storage.collections is 16"));
        assert!(DatabaseMap::parse("0 x\n", 16)
            .unwrap_err()
            .contains("line 1"));
        assert!(DatabaseMap::parse("# only a comment\n\n", 16)
            .unwrap()
            .is_identity());
    }

    #[test]
    fn the_file_is_removed_when_every_database_is_home_again() {
        let dir = std::env::temp_dir().join(format!("shoal-dbmap-{}", crate::random_u64()));
        std::fs::create_dir_all(&dir).unwrap();
        let swapped = DatabaseMap::identity(4).swapped(1, 2);
        swapped.store(&dir).unwrap();
        assert_eq!(DatabaseMap::load(&dir, 4), Ok(swapped.clone()));
        swapped.swapped(1, 2).store(&dir).unwrap();
        assert!(!dir.join(FILE).exists());
        assert!(DatabaseMap::load(&dir, 4).unwrap().is_identity());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
