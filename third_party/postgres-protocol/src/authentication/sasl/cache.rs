//! TANDEM PATCH (see TANDEM-PATCH.md): a small process-wide cache of SCRAM
//! `SaltedPassword` values.
//!
//! `SaltedPassword = Hi(password, salt, i)` is PBKDF2-HMAC-SHA-256, the
//! expensive part of a SCRAM login on purpose. A client that logs in again
//! and again with the same password to the same role (a health monitor) gets
//! the same salt and iteration count from the server every time (they are
//! fixed per stored verifier), so it may reuse the value (RFC 7677, section 4:
//! "This computational cost can be avoided by caching the ClientKey").
//!
//! The key is (SHA-256 of the normalized password, salt, iteration count):
//! the password itself is never kept as a key. `Hi` is deterministic, so an
//! entry can only ever be the value a fresh derivation would give; a wrong
//! or changed password, or a server that changed the salt (every password
//! change does) or the iteration count, simply misses. Entries are inserted
//! only after the server has proved knowledge of the verifier (the
//! `ServerSignature` checked in `finish`), so failed logins and impostor
//! servers cannot fill the cache. It holds at most [`CAPACITY`] entries and
//! evicts the least recently used.

use sha2::{Digest, Sha256};
use std::sync::{Mutex, MutexGuard};

/// Most entries the process-wide cache holds. One entry per (password,
/// role verifier) in use; 64 entries take under 10 KiB.
pub(crate) const CAPACITY: usize = 64;

/// What a `SaltedPassword` is derived from, minus the password itself.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct Key {
    password_sha256: [u8; 32],
    salt: Vec<u8>,
    iterations: u32,
}

impl Key {
    /// `normalized_password` is the password after SASLprep, as `Hi` gets it.
    pub(crate) fn new(normalized_password: &[u8], salt: &[u8], iterations: u32) -> Key {
        Key {
            password_sha256: Sha256::digest(normalized_password).into(),
            salt: salt.to_vec(),
            iterations,
        }
    }
}

struct Entry {
    key: Key,
    salted_password: [u8; 32],
    last_used: u64,
}

/// A bounded least-recently-used map from [`Key`] to `SaltedPassword`. A
/// linear scan: with at most a few dozen entries it costs well under a
/// microsecond against the ~1 ms derivation it saves.
pub(crate) struct Cache {
    entries: Vec<Entry>,
    capacity: usize,
    clock: u64,
}

impl Cache {
    pub(crate) const fn new(capacity: usize) -> Cache {
        Cache {
            entries: Vec::new(),
            capacity,
            clock: 0,
        }
    }

    pub(crate) fn get(&mut self, key: &Key) -> Option<[u8; 32]> {
        self.clock += 1;
        let clock = self.clock;
        let e = self.entries.iter_mut().find(|e| e.key == *key)?;
        e.last_used = clock;
        Some(e.salted_password)
    }

    pub(crate) fn contains(&self, key: &Key) -> bool {
        self.entries.iter().any(|e| e.key == *key)
    }

    pub(crate) fn insert(&mut self, key: Key, salted_password: [u8; 32]) {
        self.clock += 1;
        let last_used = self.clock;
        if let Some(e) = self.entries.iter_mut().find(|e| e.key == key) {
            e.salted_password = salted_password;
            e.last_used = last_used;
            return;
        }
        let entry = Entry {
            key,
            salted_password,
            last_used,
        };
        if self.entries.len() < self.capacity {
            self.entries.push(entry);
        } else if let Some(lru) = self.entries.iter_mut().min_by_key(|e| e.last_used) {
            *lru = entry;
        }
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }
}

static CACHE: Mutex<Cache> = Mutex::new(Cache::new(CAPACITY));

/// The process-wide cache. The lock is held for a lookup or an insert only,
/// never while deriving. A panic while it was held cannot leave an entry
/// half-written (entries are replaced whole), so poisoning is ignored.
pub(crate) fn global() -> MutexGuard<'static, Cache> {
    CACHE.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod test {
    use super::*;

    fn key(n: u32) -> Key {
        Key::new(format!("password {n}").as_bytes(), b"salt", 4096)
    }

    #[test]
    fn hit_only_for_the_same_password_salt_and_iterations() {
        let mut c = Cache::new(8);
        c.insert(Key::new(b"pw", b"salt", 4096), [7; 32]);
        assert_eq!(c.get(&Key::new(b"pw", b"salt", 4096)), Some([7; 32]));
        assert_eq!(c.get(&Key::new(b"pw2", b"salt", 4096)), None);
        assert_eq!(c.get(&Key::new(b"pw", b"salt2", 4096)), None);
        assert_eq!(c.get(&Key::new(b"pw", b"salt", 4097)), None);
        // Inserting the same key again replaces, it does not add.
        c.insert(Key::new(b"pw", b"salt", 4096), [8; 32]);
        assert_eq!(c.len(), 1);
        assert_eq!(c.get(&Key::new(b"pw", b"salt", 4096)), Some([8; 32]));
    }

    #[test]
    fn the_password_is_not_kept() {
        let k = Key::new(b"hunter2-secret", b"salt", 4096);
        assert_eq!(
            k.password_sha256,
            <[u8; 32]>::from(Sha256::digest(b"hunter2-secret"))
        );
    }

    #[test]
    fn bounded_and_evicts_the_least_recently_used() {
        let mut c = Cache::new(4);
        for n in 0..4 {
            c.insert(key(n), [n as u8; 32]);
        }
        // Key 0 is used again, so key 1 is now the least recently used.
        assert_eq!(c.get(&key(0)), Some([0; 32]));
        c.insert(key(4), [4; 32]);
        assert_eq!(c.len(), 4);
        assert!(c.contains(&key(0)));
        assert!(!c.contains(&key(1)));
        assert!(c.contains(&key(4)));

        let mut c = Cache::new(CAPACITY);
        for n in 0..(CAPACITY as u32 * 3) {
            c.insert(key(n), [1; 32]);
            assert!(c.len() <= CAPACITY);
        }
        assert_eq!(c.len(), CAPACITY);
        // The newest CAPACITY entries are the ones kept.
        let first_kept = CAPACITY as u32 * 2;
        assert!(!c.contains(&key(first_kept - 1)));
        assert!((first_kept..CAPACITY as u32 * 3).all(|n| c.contains(&key(n))));
    }
}
