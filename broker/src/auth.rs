//! Who may connect. Users and their credentials live in the log's state table
//! (namespace `auth.user`): an argon2id PHC string for MQTT passwords (and SASL PLAIN),
//! and SCRAM-SHA-256 and SCRAM-SHA-512 salted credentials (RFC 5802: salt, iterations,
//! StoredKey, ServerKey); never the password. `Gate` decides each connection: a user
//! whose password checks, or a client without credentials as `[auth] anonymous` says.
//!
//! Hashing is slow by design (argon2id, 19 MiB, two passes), so it runs on the blocking
//! pool, on at most half the cores; a password that already checked is remembered (keyed digest)
//! until the user changes, so that a thousand devices reconnecting cost one hash each
//! at most. A failed login is answered after a delay that doubles per failure from the
//! same address; the delay holds only that connection.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use hmac::digest::KeyInit;
use hmac::{Hmac, Mac};
use parking_lot::{Mutex, RwLock};
use prometheus_client::metrics::counter::Counter;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use weir_wire::sasl::{ScramCredential, ScramMechanism};

pub use crate::acl::Principal;
use crate::acl::{Acl, AclRule, Operation, Resource, Subject};
use crate::storage::{Log, StorageError, WriteError, now_ms};

/// The state-table namespace of users.
pub const NS_USER: &str = "auth.user";
/// PBKDF2 iterations of the SCRAM credentials (Kafka's minimum, and its default).
pub const SCRAM_ITERATIONS: u32 = 4096;
/// Longest user name, in bytes.
const MAX_NAME: usize = 255;
/// Longest password, in bytes (MQTT allows 65,535; a hash input this long is plenty).
const MAX_PASSWORD: usize = 1024;
/// First delay after a failed login from an address; it doubles up to `MAX_DELAY`.
const FIRST_DELAY: Duration = Duration::from_millis(250);
const MAX_DELAY: Duration = Duration::from_secs(8);
/// An address's failures are forgotten this long after its last one.
const FAILURES_KEPT: Duration = Duration::from_secs(600);
/// How often a refused client without credentials is logged as a warning.
const ANONYMOUS_WARNING_EVERY: Duration = Duration::from_secs(60);
/// Addresses whose failures are tracked; beyond this the oldest are forgotten.
const MAX_TRACKED: usize = 10_000;

/// Who gets in without credentials.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Anonymous {
    /// Clients on this machine (127.0.0.0/8, ::1), as Mosquitto 2.0 does.
    #[default]
    Loopback,
    All,
    None,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    pub anonymous: Anonymous,
    /// Who may do what; none: everyone admitted may do everything.
    pub acl: Vec<AclRule>,
}

/// What is stored for a user.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserRecord {
    /// argon2id PHC string (MQTT passwords, SASL PLAIN).
    pub phc: String,
    pub scram_sha256: ScramCredential,
    pub scram_sha512: ScramCredential,
    pub created_ms: i64,
}

/// A user as the admin API shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserView {
    pub name: String,
    /// What the user can log in with.
    pub mechanisms: Vec<String>,
    pub created_ms: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum UserError {
    #[error("invalid user name {0:?}: 1 to 255 bytes of letters, digits and . _ - @ + (no spaces)")]
    InvalidName(String),
    #[error("invalid password: {0}")]
    InvalidPassword(&'static str),
    #[error("no user named {0:?}")]
    NotFound(String),
    #[error(transparent)]
    Storage(#[from] WriteError),
}

/// Why a connection was refused; the protocol maps it to its own code.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Unknown user or wrong password (MQTT 5 0x86, 3.1.1 return code 4).
    BadCredentials,
    /// No credentials, and `[auth] anonymous` does not let this client in (MQTT 5 0x87,
    /// 3.1.1 return code 5).
    NotAuthorized,
}
crate::metrics::group! {
    /// The `weir_auth_*` metrics.
    #[derive(Clone, Debug, Default)]
    pub struct AuthMetrics in "auth" {
        /// Logins with a user name and a password that checked.
        logins: Counter,
        /// Logins refused: unknown user or wrong password.
        failed_logins: Counter,
        /// Clients without credentials refused by [auth] anonymous.
        anonymous_refused: Counter,
        /// argon2id computations (logins not answered from the cache, users added).
        password_hashes: Counter,
        /// Operations refused by [[auth.acl]]: MQTT publishes and subscriptions, Kafka requests
        /// per topic or group.
        denied: Counter,
        /// [[auth.acl]] rules reloaded on SIGHUP.
        acl_reloads: Counter,
    }
}

/// The users, loaded from the log at start and kept in step with it.
pub struct Users {
    log: Log,
    users: RwLock<HashMap<String, Arc<UserRecord>>>,
    /// Keyed digest of the password that last checked, per user.
    verified: Mutex<HashMap<String, [u8; 32]>>,
    /// Random per process: the digests above mean nothing outside it.
    cache_key: [u8; 32],
    /// argon2 runs at most this many at a time (each takes 19 MiB and a core): half
    /// the cores.
    hashing: tokio::sync::Semaphore,
    metrics: AuthMetrics,
}

impl Users {
    pub fn load(log: Log, metrics: AuthMetrics) -> Result<Self, StorageError> {
        let users = log
            .list_state::<UserRecord>(NS_USER)?
            .into_iter()
            .map(|(name, record)| (name, Arc::new(record)))
            .collect();
        let mut cache_key = [0u8; 32];
        rand::rng().fill_bytes(&mut cache_key);
        // Half the cores: a reconnect storm of devices with new passwords must leave
        // the broker the rest.
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        let hashers = (cores / 2).max(1);
        Ok(Self {
            log,
            users: RwLock::new(users),
            verified: Mutex::new(HashMap::new()),
            cache_key,
            hashing: tokio::sync::Semaphore::new(hashers),
            metrics,
        })
    }

    pub fn exists(&self, name: &str) -> bool {
        self.users.read().contains_key(name)
    }

    pub fn list(&self) -> Vec<UserView> {
        let mut out: Vec<UserView> = self
            .users
            .read()
            .iter()
            .map(|(name, r)| UserView {
                name: name.clone(),
                mechanisms: vec![
                    "PLAIN".into(),
                    ScramMechanism::Sha256.name().into(),
                    ScramMechanism::Sha512.name().into(),
                ],
                created_ms: r.created_ms,
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// Adds a user, or sets a new password for one. Returns true if the user is new.
    pub async fn add(&self, name: &str, password: &[u8]) -> Result<bool, UserError> {
        check_name(name)?;
        if password.is_empty() {
            return Err(UserError::InvalidPassword("empty"));
        }
        if password.len() > MAX_PASSWORD {
            return Err(UserError::InvalidPassword("longer than 1024 bytes"));
        }
        let record = {
            let _permit = self.hashing.acquire().await.expect("never closed");
            self.metrics.password_hashes.inc();
            let password = password.to_vec();
            tokio::task::spawn_blocking(move || credentials(&password))
                .await
                .expect("hashing does not panic")
        };
        self.log.put_state(NS_USER, name, &record).await?;
        self.verified.lock().remove(name);
        let created = self
            .users
            .write()
            .insert(name.to_string(), Arc::new(record))
            .is_none();
        Ok(created)
    }

    pub async fn remove(&self, name: &str) -> Result<(), UserError> {
        if !self.users.read().contains_key(name) {
            return Err(UserError::NotFound(name.to_string()));
        }
        self.log.delete_state(NS_USER, name).await?;
        self.users.write().remove(name);
        self.verified.lock().remove(name);
        Ok(())
    }

    /// The SCRAM credential of a user, for the Kafka SASL exchange.
    pub fn scram(&self, name: &str, mechanism: ScramMechanism) -> Option<ScramCredential> {
        let users = self.users.read();
        let user = users.get(name)?;
        Some(match mechanism {
            ScramMechanism::Sha256 => user.scram_sha256.clone(),
            ScramMechanism::Sha512 => user.scram_sha512.clone(),
        })
    }

    /// A credential for a user that does not exist, the same every time for a name, so
    /// that a SCRAM exchange for an unknown user looks like one for a known user and
    /// fails only at the proof.
    pub fn stand_in_scram(&self, name: &str, mechanism: ScramMechanism) -> ScramCredential {
        let digest = self.digest(name, b"stand-in");
        ScramCredential {
            salt: digest[..16].to_vec(),
            iterations: SCRAM_ITERATIONS,
            stored_key: mechanism.hash(&digest),
            server_key: mechanism.hash(&digest[16..]),
        }
    }

    /// Whether `password` is `name`'s.
    pub async fn verify(&self, name: &str, password: &[u8]) -> bool {
        let Some(user) = self.users.read().get(name).cloned() else {
            return false;
        };
        let digest = self.digest(name, password);
        if self.verified.lock().get(name) == Some(&digest) {
            return true;
        }
        let ok = {
            let _permit = self.hashing.acquire().await.expect("never closed");
            self.metrics.password_hashes.inc();
            let password = password.to_vec();
            let phc = user.phc.clone();
            tokio::task::spawn_blocking(move || {
                PasswordHash::new(&phc).is_ok_and(|hash| {
                    argon2::Argon2::default()
                        .verify_password(&password, &hash)
                        .is_ok()
                })
            })
            .await
            .unwrap_or(false)
        };
        // Only if the user was not changed meanwhile.
        if ok
            && self
                .users
                .read()
                .get(name)
                .is_some_and(|u| Arc::ptr_eq(u, &user))
        {
            self.verified.lock().insert(name.to_string(), digest);
        }
        ok
    }

    fn digest(&self, name: &str, password: &[u8]) -> [u8; 32] {
        let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(&self.cache_key)
            .expect("HMAC takes keys of any length");
        mac.update(&(name.len() as u64).to_be_bytes());
        mac.update(name.as_bytes());
        mac.update(password);
        mac.finalize().into_bytes().into()
    }
}

/// The stored form of a password: argon2id, and SCRAM for both hash functions.
fn credentials(password: &[u8]) -> UserRecord {
    let mut salt = [0u8; 16];
    rand::rng().fill_bytes(&mut salt);
    let phc = argon2::Argon2::default()
        .hash_password(
            password,
            &SaltString::encode_b64(&salt).expect("16 bytes is a valid salt"),
        )
        .expect("argon2 takes any password up to 4 GiB")
        .to_string();
    let scram_salt = |mechanism: ScramMechanism| {
        let mut salt = [0u8; 16];
        rand::rng().fill_bytes(&mut salt);
        mechanism.credential(password, &salt, SCRAM_ITERATIONS)
    };
    UserRecord {
        phc,
        scram_sha256: scram_salt(ScramMechanism::Sha256),
        scram_sha512: scram_salt(ScramMechanism::Sha512),
        created_ms: now_ms(),
    }
}

fn check_name(name: &str) -> Result<(), UserError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME
        && name
            .chars()
            .all(|c| c.is_alphanumeric() || matches!(c, '.' | '_' | '-' | '@' | '+'));
    if ok {
        Ok(())
    } else {
        Err(UserError::InvalidName(name.to_string()))
    }
}

/// Failed logins of one address.
struct Failures {
    count: u32,
    last: Instant,
}

/// The decision for each connection of every protocol.
pub struct Gate {
    pub users: Arc<Users>,
    anonymous: Anonymous,
    acl: RwLock<Arc<Acl>>,
    failures: Mutex<HashMap<IpAddr, Failures>>,
    /// When the last refused anonymous client was logged as a warning.
    anonymous_warned: Mutex<Option<Instant>>,
    metrics: AuthMetrics,
}

impl Gate {
    pub fn new(users: Arc<Users>, anonymous: Anonymous, acl: Acl, metrics: AuthMetrics) -> Self {
        Self {
            users,
            anonymous,
            acl: RwLock::new(Arc::new(acl)),
            failures: Mutex::new(HashMap::new()),
            anonymous_warned: Mutex::new(None),
            metrics,
        }
    }

    /// Puts new rules in force (SIGHUP); connections use them from their next request.
    pub fn set_acl(&self, acl: Acl) {
        *self.acl.write() = Arc::new(acl);
        self.metrics.acl_reloads.inc();
    }

    /// The rules in force.
    pub fn acl(&self) -> Arc<Acl> {
        self.acl.read().clone()
    }

    /// Whether `who` may do `op` on `resource`; a refusal is counted and logged.
    pub fn authorize(&self, who: Subject<'_>, op: Operation, resource: Resource<'_>) -> bool {
        let acl = self.acl.read();
        if acl.allows(who, op, resource) {
            return true;
        }
        self.metrics.denied.inc();
        tracing::debug!(principal = ?who.principal, client = who.client_id, ?op, ?resource, "denied by [[auth.acl]]");
        false
    }

    /// Admits a client from `peer` with these credentials, or says why not. A refusal
    /// for bad credentials returns only after the address's delay.
    pub async fn admit(
        &self,
        peer: IpAddr,
        login: Option<(&str, &[u8])>,
    ) -> Result<Principal, Refusal> {
        let Some((name, password)) = login else {
            return self.anonymous(peer);
        };
        if self.users.verify(name, password).await {
            return Ok(self.logged_in(peer, name));
        }
        Err(self.login_failed(peer, name).await)
    }

    /// Counts a login whose credentials checked (here or in a SASL exchange).
    pub fn logged_in(&self, peer: IpAddr, name: &str) -> Principal {
        self.metrics.logins.inc();
        self.failures.lock().remove(&peer);
        Principal::User(name.to_string())
    }

    /// Admits the holder of a client certificate the TLS verifier accepted, as the user
    /// its identity names.
    pub fn certified(&self, identity: &str) -> Principal {
        self.metrics.logins.inc();
        Principal::User(identity.to_string())
    }

    /// Counts a failed login and returns once the address's delay has passed.
    pub async fn login_failed(&self, peer: IpAddr, name: &str) -> Refusal {
        self.metrics.failed_logins.inc();
        let delay = self.failed(peer);
        tracing::warn!(%peer, user = name, delay_ms = delay.as_millis() as u64, "login refused: unknown user or wrong password");
        tokio::time::sleep(delay).await;
        Refusal::BadCredentials
    }

    /// Whether a client from `peer` may go on without credentials.
    pub fn anonymous(&self, peer: IpAddr) -> Result<Principal, Refusal> {
        let allowed = match self.anonymous {
            Anonymous::All => true,
            Anonymous::Loopback => peer.is_loopback() || is_mapped_loopback(peer),
            Anonymous::None => false,
        };
        if allowed {
            return Ok(Principal::Anonymous);
        }
        self.metrics.anonymous_refused.inc();
        // Once a minute at most: a fleet retrying without credentials would flood the log.
        let mut warned = self.anonymous_warned.lock();
        if warned.is_none_or(|at| at.elapsed() >= ANONYMOUS_WARNING_EVERY) {
            *warned = Some(Instant::now());
            tracing::warn!(%peer, anonymous = ?self.anonymous,
                "refused a client without credentials (weir_auth_anonymous_refused_total counts them all): add users with `weir user add NAME`, or set [auth] anonymous = \"all\"");
        } else {
            tracing::debug!(%peer, "refused a client without credentials");
        }
        Err(Refusal::NotAuthorized)
    }

    /// Counts a failure from `peer` and returns how long its answer waits.
    fn failed(&self, peer: IpAddr) -> Duration {
        let now = Instant::now();
        let mut failures = self.failures.lock();
        if failures.len() >= MAX_TRACKED {
            failures.retain(|_, f| now.duration_since(f.last) < FAILURES_KEPT);
            if failures.len() >= MAX_TRACKED {
                failures.clear();
            }
        }
        let entry = failures.entry(peer).or_insert(Failures {
            count: 0,
            last: now,
        });
        if now.duration_since(entry.last) >= FAILURES_KEPT {
            entry.count = 0;
        }
        entry.count = entry.count.saturating_add(1);
        entry.last = now;
        FIRST_DELAY
            .saturating_mul(1u32 << (entry.count - 1).min(6))
            .min(MAX_DELAY)
    }
}

fn is_mapped_loopback(peer: IpAddr) -> bool {
    match peer {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback()),
        IpAddr::V4(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 7677's example (SCRAM-SHA-256, password "pencil"): the stored form that
    /// PostgreSQL's documentation shows for it.
    #[test]
    fn scram_sha256_matches_rfc_7677() {
        let c =
            ScramMechanism::Sha256.credential(b"pencil", &b64("W22ZaJ0SNY7soEsUEjb6gQ=="), 4096);
        assert_eq!(
            c.stored_key,
            b64("WG5d8oPm3OtcPnkdi4Uo7BkeZkBFzpcXkuLmtbsT4qY=")
        );
        assert_eq!(
            c.server_key,
            b64("wfPLwcE6nTWhTAmQ7tl2KeoiWGPlZqQxSrmfPwDl2dU=")
        );
    }

    fn b64(s: &str) -> Vec<u8> {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.decode(s).unwrap()
    }

    #[test]
    fn names_are_checked() {
        for good in ["dev-1", "sensor.7", "a@b.c", "x_y+z", "Gerät"] {
            assert!(check_name(good).is_ok(), "{good}");
        }
        for bad in ["", "a b", "a/b", "a,b", "a=b", "a\u{0}", &"x".repeat(256)] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_delay_doubles_per_failure_up_to_a_cap() {
        let dir = tempfile::tempdir().unwrap();
        let log = Log::open(crate::storage::LogOptions::new(dir.path())).unwrap();
        let users = Arc::new(Users::load(log, AuthMetrics::default()).unwrap());
        let gate = Gate::new(
            users,
            Anonymous::None,
            Acl::default(),
            AuthMetrics::default(),
        );
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let delays: Vec<u128> = (0..8).map(|_| gate.failed(a).as_millis()).collect();
        assert_eq!(delays, [250, 500, 1000, 2000, 4000, 8000, 8000, 8000]);
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        assert_eq!(gate.failed(b), FIRST_DELAY, "another address starts afresh");
    }

    #[test]
    fn anonymous_clients_by_policy() {
        let dir = tempfile::tempdir().unwrap();
        let log = Log::open(crate::storage::LogOptions::new(dir.path())).unwrap();
        let users = Arc::new(Users::load(log, AuthMetrics::default()).unwrap());
        let remote: IpAddr = "192.0.2.1".parse().unwrap();
        let mapped: IpAddr = "::ffff:127.0.0.1".parse().unwrap();
        for (policy, ip, admitted) in [
            (Anonymous::Loopback, IpAddr::from([127, 0, 0, 1]), true),
            (Anonymous::Loopback, IpAddr::from([127, 9, 9, 9]), true),
            (Anonymous::Loopback, "::1".parse().unwrap(), true),
            (Anonymous::Loopback, mapped, true),
            (Anonymous::Loopback, remote, false),
            (Anonymous::All, remote, true),
            (Anonymous::None, IpAddr::from([127, 0, 0, 1]), false),
        ] {
            let gate = Gate::new(
                users.clone(),
                policy,
                Acl::default(),
                AuthMetrics::default(),
            );
            let got = gate.anonymous(ip);
            assert_eq!(got.is_ok(), admitted, "{policy:?} {ip}");
            if !admitted {
                assert_eq!(got, Err(Refusal::NotAuthorized));
            }
        }
    }
}
