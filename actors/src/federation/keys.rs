//! Route keys: which key may sign a cluster's route announcements, and rotation.
//!
//! A cluster signs its route announcements with a **route key**, not with its authority
//! (whose secret stays off the nodes). Route keys form a chain of **key records**:
//!
//! - generation 1 is signed by the cluster authority (the key other clusters pin in
//!   `trust = { "cluster-b" = "<authority public key>" }`);
//! - generation `g + 1` is signed by the route key of generation `g` (a rotation), and
//!   names an overlap window: the old key still verifies until `issued_at + overlap_s`,
//!   after that only the new one does.
//!
//! A receiver trusts a record only when it verifies under the pinned authority or under a
//! key it already trusts for that cluster; a key a message carries about itself is never
//! trusted. Records travel as the exact JSON text that was signed ([`SignedKeyRecord`]),
//! so nodes learn a rotation over the wire without a restart, and a replayed old record
//! changes nothing (its generation is not newer).
//!
//! # The route key file
//!
//! `DIR/route.key` (mode 0600, copied to every node of the cluster), written by
//! `mpreg keys rotate DIR`:
//! ```json
//! {"format": "mpreg-route-key/1", "cluster_id": "C", "secret_key": "<current key, 32 bytes hex>",
//!  "chain": [{"body": "<record JSON text>", "signature": "<64 bytes hex>"}, ...]}
//! ```
//! A record body: `{"format": "mpreg-route-key-record/1", "cluster_id", "generation",
//! "key_id", "public_key", "issued_at", "overlap_s", "signed_by"}` where `signed_by` is
//! `"authority"` or the key id of the previous generation.
//!
//! Bounds: a chain holds at most [`MAX_CHAIN`] records (a rotation beyond it is refused;
//! re-key the cluster), a record body at most [`MAX_RECORD_BYTES`].

use std::collections::BTreeMap;
use std::path::Path;

use ed25519_dalek::{SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::ClusterId;
use crate::fabric::trust::{self, from_hex, to_hex, Authority, TrustError};

/// The route key file in a keys directory.
pub const ROUTE_KEY_FILE: &str = "route.key";
/// Most records in one cluster's chain.
pub const MAX_CHAIN: usize = 64;
/// Largest record body accepted, in bytes.
pub const MAX_RECORD_BYTES: usize = 1024;
const RECORD_FORMAT: &str = "mpreg-route-key-record/1";
const FILE_FORMAT: &str = "mpreg-route-key/1";
const SIGNED_BY_AUTHORITY: &str = "authority";

/// The id of a route key: `rk-` and the first 16 hex digits of SHA-256 of the public key.
pub fn key_id(key: &VerifyingKey) -> String {
    format!("rk-{}", &to_hex(&Sha256::digest(key.as_bytes()))[..16])
}

/// What a key record says (the signed body).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KeyRecordBody {
    /// Always `mpreg-route-key-record/1`.
    pub format: String,
    /// Whose route key this is.
    pub cluster_id: ClusterId,
    /// 1 for the first key, one more per rotation.
    pub generation: u64,
    /// [`key_id`] of `public_key`.
    pub key_id: String,
    /// The new key (hex).
    pub public_key: String,
    /// When the rotation happened (Unix seconds).
    pub issued_at: u64,
    /// How long the previous key keeps verifying after `issued_at`.
    pub overlap_s: u64,
    /// `authority` or the key id of the previous generation.
    pub signed_by: String,
}

/// A key record as it travels: the exact text signed, and the signature (hex).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SignedKeyRecord {
    /// JSON text of a [`KeyRecordBody`].
    pub body: String,
    /// Signature over `body` by the authority or the previous route key.
    pub signature: String,
}

impl SignedKeyRecord {
    fn sign(body: &KeyRecordBody, signer: &SigningKey) -> Self {
        let body = serde_json::to_string(body).unwrap_or_default();
        let signature = trust::sign_hex(signer, body.as_bytes());
        SignedKeyRecord { body, signature }
    }

    /// Parses the body (bounded) without trusting it.
    pub fn parse(&self) -> Result<KeyRecordBody, KeyError> {
        if self.body.len() > MAX_RECORD_BYTES {
            return Err(KeyError::Malformed(format!("key record over {MAX_RECORD_BYTES} bytes")));
        }
        let body: KeyRecordBody =
            serde_json::from_str(&self.body).map_err(|e| KeyError::Malformed(format!("key record: {e}")))?;
        if body.format != RECORD_FORMAT {
            return Err(KeyError::Malformed(format!("key record format is not {RECORD_FORMAT}")));
        }
        let public = public_key(&body.public_key)?;
        if key_id(&public) != body.key_id {
            return Err(KeyError::Malformed("key record: key_id does not match public_key".into()));
        }
        if body.generation == 0 || (body.generation == 1) != (body.signed_by == SIGNED_BY_AUTHORITY) {
            return Err(KeyError::Malformed(
                "key record: generation 1, and only it, is signed by the authority".into(),
            ));
        }
        Ok(body)
    }
}

/// Why a key record or a route key file was refused.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// Not the documented shape.
    #[error("{0}")]
    Malformed(String),
    /// No authority is pinned for that cluster.
    #[error("no authority pinned for cluster {0}")]
    NotPinned(ClusterId),
    /// The signature does not verify under the key it must come from.
    #[error("{0}")]
    BadSignature(String),
    /// The record does not follow the chain this node holds (gap, fork, or too long).
    #[error("{0}")]
    Chain(String),
    /// Reading or writing a file failed.
    #[error(transparent)]
    Trust(#[from] TrustError),
}

fn public_key(hex: &str) -> Result<VerifyingKey, KeyError> {
    trust::verifying_key(hex, "public_key").map_err(|e| KeyError::Malformed(e.to_string()))
}

/// One trusted key of a cluster.
#[derive(Debug, Clone)]
struct TrustedKey {
    body: KeyRecordBody,
    key: VerifyingKey,
    signed: SignedKeyRecord,
}

/// Why a route key does not verify a signature now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyRejection {
    /// No authority is pinned for the cluster.
    NotPinned,
    /// The key id is not one of the cluster's trusted keys.
    UnknownKey,
    /// The key was rotated out and its overlap window has ended.
    RetiredKey,
    /// The signature does not verify.
    BadSignature,
}

/// One cluster's pinned authority and its chain of route keys.
#[derive(Debug, Clone)]
struct ClusterKeys {
    authority: VerifyingKey,
    chain: Vec<TrustedKey>,
}

impl ClusterKeys {
    /// Until when (Unix seconds) generation `index` verifies; `None` = it is the current key.
    fn valid_until(&self, index: usize) -> Option<u64> {
        self.chain.get(index + 1).map(|next| next.body.issued_at.saturating_add(next.body.overlap_s))
    }
}

/// Route keys of every cluster this node trusts: pinned authorities and the chains learned
/// from them. Pure: time is passed in.
#[derive(Debug, Clone, Default)]
pub struct RouteKeyRing {
    clusters: BTreeMap<ClusterId, ClusterKeys>,
}

impl RouteKeyRing {
    /// Pins `authority` for `cluster`; its route keys are learned with [`Self::learn`].
    /// Re-pinning another authority forgets the old chain.
    pub fn pin(&mut self, cluster: &str, authority: VerifyingKey) {
        match self.clusters.get_mut(cluster) {
            Some(keys) if keys.authority == authority => {}
            _ => {
                self.clusters.insert(cluster.to_owned(), ClusterKeys { authority, chain: Vec::new() });
            }
        }
    }

    /// The pinned authority of `cluster`.
    pub fn authority(&self, cluster: &str) -> Option<&VerifyingKey> {
        self.clusters.get(cluster).map(|keys| &keys.authority)
    }

    /// Learns one record: `Ok(true)` when it extended the chain, `Ok(false)` when it was
    /// already known or older (a replay). A record must be signed by the pinned authority
    /// (generation 1) or by the key of the generation before it, which must be trusted.
    pub fn learn(&mut self, record: &SignedKeyRecord) -> Result<bool, KeyError> {
        let body = record.parse()?;
        let keys =
            self.clusters.get_mut(&body.cluster_id).ok_or_else(|| KeyError::NotPinned(body.cluster_id.clone()))?;
        let have = keys.chain.len() as u64;
        if body.generation <= have {
            let known = &keys.chain[(body.generation - 1) as usize];
            return if known.signed == *record {
                Ok(false)
            } else {
                Err(KeyError::Chain(format!(
                    "cluster {} generation {} conflicts with the trusted record",
                    body.cluster_id, body.generation
                )))
            };
        }
        if body.generation != have + 1 {
            return Err(KeyError::Chain(format!(
                "cluster {} generation {} does not follow {have}",
                body.cluster_id, body.generation
            )));
        }
        if keys.chain.len() >= MAX_CHAIN {
            return Err(KeyError::Chain(format!("cluster {}: more than {MAX_CHAIN} route keys", body.cluster_id)));
        }
        let signer = match keys.chain.last() {
            None => keys.authority,
            Some(previous) if previous.body.key_id == body.signed_by => previous.key,
            Some(previous) => {
                return Err(KeyError::Chain(format!(
                    "record signed by {} but generation {} is {}",
                    body.signed_by, previous.body.generation, previous.body.key_id
                )))
            }
        };
        trust::verify_hex(&signer, record.body.as_bytes(), &record.signature)
            .map_err(|_| KeyError::BadSignature(format!("key record of {} does not verify", body.cluster_id)))?;
        let key = public_key(&body.public_key)?;
        keys.chain.push(TrustedKey { body, key, signed: record.clone() });
        Ok(true)
    }

    /// Learns a whole chain in order (records already known are skipped).
    pub fn learn_chain(&mut self, chain: &[SignedKeyRecord]) -> Result<bool, KeyError> {
        if chain.len() > MAX_CHAIN {
            return Err(KeyError::Chain(format!("chain of {} records, at most {MAX_CHAIN}", chain.len())));
        }
        let mut changed = false;
        for record in chain {
            changed |= self.learn(record)?;
        }
        Ok(changed)
    }

    /// The chain this node trusts for `cluster`, to pass on to neighbours.
    pub fn chain(&self, cluster: &str) -> Vec<SignedKeyRecord> {
        self.clusters.get(cluster).map(|keys| keys.chain.iter().map(|k| k.signed.clone()).collect()).unwrap_or_default()
    }

    /// Checks `signature` (hex) over `message` by `cluster`'s route key `key_id` at `now`.
    pub fn verify(
        &self,
        cluster: &str,
        key_id: &str,
        message: &[u8],
        signature: &str,
        now: u64,
    ) -> Result<(), KeyRejection> {
        let keys = self.clusters.get(cluster).ok_or(KeyRejection::NotPinned)?;
        let index = keys.chain.iter().position(|k| k.body.key_id == key_id).ok_or(KeyRejection::UnknownKey)?;
        if keys.valid_until(index).is_some_and(|until| now >= until) {
            return Err(KeyRejection::RetiredKey);
        }
        trust::verify_hex(&keys.chain[index].key, message, signature).map_err(|_| KeyRejection::BadSignature)
    }

    /// A serialisable view: per cluster, the pinned authority and each key with its state.
    pub fn describe(&self, now: u64) -> serde_json::Value {
        let clusters: BTreeMap<&str, serde_json::Value> = self
            .clusters
            .iter()
            .map(|(cluster, keys)| {
                let chain: Vec<serde_json::Value> = keys
                    .chain
                    .iter()
                    .enumerate()
                    .map(|(i, k)| {
                        let until = keys.valid_until(i);
                        serde_json::json!({
                            "key_id": k.body.key_id,
                            "generation": k.body.generation,
                            "issued_at": k.body.issued_at,
                            "valid_until": until,
                            "active": until.is_none_or(|u| now < u),
                        })
                    })
                    .collect();
                (cluster.as_str(), serde_json::json!({"authority": to_hex(keys.authority.as_bytes()), "keys": chain}))
            })
            .collect();
        serde_json::json!(clusters)
    }
}

/// A cluster's current route key with its chain: what a node signs with.
#[derive(Clone)]
pub struct RouteSigner {
    cluster_id: ClusterId,
    key: SigningKey,
    key_id: String,
    chain: Vec<SignedKeyRecord>,
}

impl std::fmt::Debug for RouteSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RouteSigner").field("cluster_id", &self.cluster_id).field("key_id", &self.key_id).finish()
    }
}

#[derive(Serialize, Deserialize)]
struct RouteKeyFile {
    format: String,
    cluster_id: ClusterId,
    secret_key: String,
    chain: Vec<SignedKeyRecord>,
}

impl RouteSigner {
    /// Generation 1: a fresh route key for `cluster_id`, certified by the authority.
    pub fn first(authority: &Authority, cluster_id: &str, now: u64) -> Self {
        let key = SigningKey::generate(&mut rand::rngs::OsRng);
        let body = record_body(cluster_id, 1, &key, now, 0, SIGNED_BY_AUTHORITY);
        let record = SignedKeyRecord::sign(&body, authority.signing_key());
        RouteSigner { cluster_id: cluster_id.into(), key_id: body.key_id, key, chain: vec![record] }
    }

    /// The next generation: a fresh key whose record is signed by this one; this key keeps
    /// verifying for `overlap_s` seconds after `now`.
    pub fn rotate(&self, now: u64, overlap_s: u64) -> Result<Self, KeyError> {
        if self.chain.len() >= MAX_CHAIN {
            return Err(KeyError::Chain(format!("{MAX_CHAIN} route keys already: re-key the cluster")));
        }
        let key = SigningKey::generate(&mut rand::rngs::OsRng);
        let body = record_body(&self.cluster_id, self.chain.len() as u64 + 1, &key, now, overlap_s, &self.key_id);
        let mut chain = self.chain.clone();
        chain.push(SignedKeyRecord::sign(&body, &self.key));
        Ok(RouteSigner { cluster_id: self.cluster_id.clone(), key_id: body.key_id, key, chain })
    }

    /// The cluster this key signs for.
    pub fn cluster_id(&self) -> &str {
        &self.cluster_id
    }

    /// The current key's id.
    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// Every record from generation 1 to the current key.
    pub fn chain(&self) -> &[SignedKeyRecord] {
        &self.chain
    }

    /// Signs `message` (hex signature).
    pub fn sign_hex(&self, message: &[u8]) -> String {
        trust::sign_hex(&self.key, message)
    }

    /// Writes the route key file (mode 0600).
    pub fn save(&self, path: &Path) -> Result<(), KeyError> {
        let file = RouteKeyFile {
            format: FILE_FORMAT.into(),
            cluster_id: self.cluster_id.clone(),
            secret_key: to_hex(&self.key.to_bytes()),
            chain: self.chain.clone(),
        };
        let text = serde_json::to_string_pretty(&file).map_err(|e| KeyError::Malformed(e.to_string()))?;
        Ok(trust::write_secret(path, text.as_bytes())?)
    }

    /// Reads a route key file and checks that its chain verifies under `authority` and
    /// ends with its secret key's record.
    pub fn load(path: &Path, authority: &VerifyingKey) -> Result<Self, KeyError> {
        let what = path.display().to_string();
        let file: RouteKeyFile = trust::parse(&trust::read(path)?, &what)?;
        if file.format != FILE_FORMAT {
            return Err(KeyError::Malformed(format!("{what}: format is not {FILE_FORMAT}")));
        }
        let key = SigningKey::from_bytes(&from_hex::<32>(&file.secret_key, "secret_key")?);
        let mut ring = RouteKeyRing::default();
        ring.pin(&file.cluster_id, *authority);
        ring.learn_chain(&file.chain).map_err(|e| KeyError::Chain(format!("{what}: {e}")))?;
        let key_id = key_id(&key.verifying_key());
        let last = file.chain.last().map(SignedKeyRecord::parse).transpose()?;
        if last.is_none_or(|last| last.key_id != key_id) {
            return Err(KeyError::Chain(format!("{what}: secret_key is not the last key of the chain")));
        }
        Ok(RouteSigner { cluster_id: file.cluster_id, key, key_id, chain: file.chain })
    }
}

/// What `mpreg keys rotate DIR` did.
#[derive(Debug)]
pub struct Rotation {
    /// The route key file written.
    pub path: std::path::PathBuf,
    /// The new key's generation (1 = the first key).
    pub generation: u64,
    /// The new key's id.
    pub key_id: String,
}

/// `mpreg keys rotate DIR`: without `DIR/route.key`, makes generation 1 certified by the
/// authority in `DIR/cluster.key`; with it, makes the next generation signed by the
/// current key (checked against `DIR/cluster.pub` first), the current key verifying for
/// `overlap_s` more seconds. Rewrites `DIR/route.key`.
pub fn rotate_in_dir(dir: &Path, cluster_id: &str, now: u64, overlap_s: u64) -> Result<Rotation, KeyError> {
    let path = dir.join(ROUTE_KEY_FILE);
    let next = if path.exists() {
        let pub_path = dir.join(trust::AUTHORITY_PUB_FILE);
        let authority = trust::verifying_key(&trust::read(&pub_path)?, "cluster.pub")?;
        let current = RouteSigner::load(&path, &authority)?;
        if current.cluster_id != cluster_id {
            return Err(KeyError::Malformed(format!(
                "{} belongs to cluster {}, not {cluster_id}",
                path.display(),
                current.cluster_id
            )));
        }
        current.rotate(now, overlap_s)?
    } else {
        RouteSigner::first(&Authority::load(dir)?, cluster_id, now)
    };
    next.save(&path)?;
    Ok(Rotation { path, generation: next.chain.len() as u64, key_id: next.key_id })
}

fn record_body(
    cluster_id: &str,
    generation: u64,
    key: &SigningKey,
    now: u64,
    overlap_s: u64,
    signed_by: &str,
) -> KeyRecordBody {
    KeyRecordBody {
        format: RECORD_FORMAT.into(),
        cluster_id: cluster_id.into(),
        generation,
        key_id: key_id(&key.verifying_key()),
        public_key: to_hex(key.verifying_key().as_bytes()),
        issued_at: now,
        overlap_s,
        signed_by: signed_by.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_800_000_000;

    fn ring_for(authority: &Authority, cluster: &str) -> RouteKeyRing {
        let mut ring = RouteKeyRing::default();
        ring.pin(cluster, authority.public_key());
        ring
    }

    #[test]
    fn first_key_verifies_under_the_pinned_authority_only() {
        let authority = Authority::generate();
        let signer = RouteSigner::first(&authority, "b", NOW);
        let mut ring = ring_for(&authority, "b");
        assert!(ring.learn_chain(signer.chain()).unwrap());
        let sig = signer.sign_hex(b"route");
        assert_eq!(ring.verify("b", signer.key_id(), b"route", &sig, NOW), Ok(()));
        assert_eq!(ring.verify("b", signer.key_id(), b"other", &sig, NOW), Err(KeyRejection::BadSignature));
        assert_eq!(ring.verify("c", signer.key_id(), b"route", &sig, NOW), Err(KeyRejection::NotPinned));

        // A chain certified by another authority is refused: the message's own key is not trust.
        let impostor = RouteSigner::first(&Authority::generate(), "b", NOW);
        let mut fresh = ring_for(&authority, "b");
        assert!(matches!(fresh.learn_chain(impostor.chain()), Err(KeyError::BadSignature(_))));
        assert_eq!(
            fresh.verify("b", impostor.key_id(), b"route", &impostor.sign_hex(b"route"), NOW),
            Err(KeyRejection::UnknownKey)
        );
    }

    #[test]
    fn rotation_keeps_the_old_key_for_the_overlap_then_only_the_new_one() {
        let authority = Authority::generate();
        let old = RouteSigner::first(&authority, "b", NOW);
        let mut ring = ring_for(&authority, "b");
        ring.learn_chain(old.chain()).unwrap();
        let new = old.rotate(NOW + 100, 20).unwrap();
        assert!(ring.learn_chain(new.chain()).unwrap());
        assert!(!ring.learn_chain(new.chain()).unwrap(), "a replayed chain changes nothing");
        let by_old = old.sign_hex(b"m");
        let by_new = new.sign_hex(b"m");
        assert_eq!(ring.verify("b", old.key_id(), b"m", &by_old, NOW + 110), Ok(()));
        assert_eq!(ring.verify("b", new.key_id(), b"m", &by_new, NOW + 110), Ok(()));
        assert_eq!(ring.verify("b", old.key_id(), b"m", &by_old, NOW + 120), Err(KeyRejection::RetiredKey));
        assert_eq!(ring.verify("b", new.key_id(), b"m", &by_new, NOW + 150), Ok(()));
        let described = ring.describe(NOW + 150);
        assert_eq!(described["b"]["keys"][0]["active"], false);
        assert_eq!(described["b"]["keys"][1]["active"], true);
    }

    #[test]
    fn records_out_of_order_forged_or_forked_are_refused() {
        let authority = Authority::generate();
        let g1 = RouteSigner::first(&authority, "b", NOW);
        let g2 = g1.rotate(NOW + 1, 10).unwrap();
        let g3 = g2.rotate(NOW + 2, 10).unwrap();
        let mut ring = ring_for(&authority, "b");
        // A gap: generation 3 before 2.
        ring.learn(&g3.chain()[0]).unwrap();
        assert!(matches!(ring.learn(&g3.chain()[2]), Err(KeyError::Chain(_))));
        // A fork: another generation 2 signed by g1 conflicts with nothing yet, so it is
        // learned; then the original generation 2 is a conflict.
        let fork = g1.rotate(NOW + 1, 10).unwrap();
        ring.learn(&fork.chain()[1]).unwrap();
        assert!(matches!(ring.learn(&g2.chain()[1]), Err(KeyError::Chain(_))));
        // Forged signature.
        let mut forged = g2.chain()[1].clone();
        forged.signature = g2.sign_hex(forged.body.as_bytes());
        let mut fresh = ring_for(&authority, "b");
        fresh.learn(&g1.chain()[0]).unwrap();
        assert!(matches!(fresh.learn(&forged), Err(KeyError::BadSignature(_))));
        // Unpinned cluster, oversized and malformed records.
        assert!(matches!(RouteKeyRing::default().learn(&g1.chain()[0]), Err(KeyError::NotPinned(_))));
        let huge = SignedKeyRecord { body: "x".repeat(MAX_RECORD_BYTES + 1), signature: String::new() };
        assert!(matches!(fresh.learn(&huge), Err(KeyError::Malformed(_))));
        let garbage = SignedKeyRecord { body: "{\"format\":1}".into(), signature: String::new() };
        assert!(matches!(fresh.learn(&garbage), Err(KeyError::Malformed(_))));
    }

    #[test]
    fn a_chain_longer_than_the_bound_is_refused() {
        let authority = Authority::generate();
        let mut signer = RouteSigner::first(&authority, "b", NOW);
        for i in 1..MAX_CHAIN as u64 {
            signer = signer.rotate(NOW + i, 0).unwrap();
        }
        assert!(matches!(signer.rotate(NOW + 1000, 0), Err(KeyError::Chain(_))));
        let mut ring = ring_for(&authority, "b");
        assert!(ring.learn_chain(signer.chain()).unwrap());
        let mut long = signer.chain().to_vec();
        long.push(long[0].clone());
        assert!(matches!(ring.learn_chain(&long), Err(KeyError::Chain(_))));
    }

    #[test]
    fn route_key_file_round_trips_and_is_checked_on_load() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(ROUTE_KEY_FILE);
        let authority = Authority::generate();
        let signer = RouteSigner::first(&authority, "b", NOW).rotate(NOW + 5, 60).unwrap();
        signer.save(&path).unwrap();
        let loaded = RouteSigner::load(&path, &authority.public_key()).unwrap();
        assert_eq!(loaded.key_id(), signer.key_id());
        assert_eq!(loaded.chain(), signer.chain());
        assert!(RouteSigner::load(&path, &Authority::generate().public_key()).is_err());
        let mut tampered: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        tampered["secret_key"] = to_hex(&[7u8; 32]).into();
        std::fs::write(&path, tampered.to_string()).unwrap();
        assert!(matches!(RouteSigner::load(&path, &authority.public_key()), Err(KeyError::Chain(_))));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        }
    }

    #[test]
    fn rotate_in_dir_starts_a_chain_then_extends_it() {
        let dir = tempfile::tempdir().unwrap();
        assert!(rotate_in_dir(dir.path(), "b", NOW, 60).is_err(), "no authority, no first key");
        let authority = Authority::generate();
        authority.save(dir.path()).unwrap();
        let first = rotate_in_dir(dir.path(), "b", NOW, 60).unwrap();
        assert_eq!(first.generation, 1);
        let second = rotate_in_dir(dir.path(), "b", NOW + 10, 60).unwrap();
        assert_eq!(second.generation, 2);
        assert_ne!(first.key_id, second.key_id);
        assert!(rotate_in_dir(dir.path(), "other", NOW + 20, 60).is_err(), "wrong cluster");
        let signer = RouteSigner::load(&second.path, &authority.public_key()).unwrap();
        let mut ring = RouteKeyRing::default();
        ring.pin("b", authority.public_key());
        ring.learn_chain(signer.chain()).unwrap();
        let old_sig = RouteSigner::first(&authority, "b", NOW).sign_hex(b"m");
        assert_eq!(ring.verify("b", &first.key_id, b"m", &old_sig, NOW + 11), Err(KeyRejection::BadSignature));
        assert_eq!(ring.verify("b", &second.key_id, b"m", &signer.sign_hex(b"m"), NOW + 11), Ok(()));
    }
}
