//! Node identity and cluster credentials (DESIGN.md §8, "Trust").
//!
//! A cluster **authority** is an ed25519 key pair; it signs one **certificate** per node,
//! binding the node's own ed25519 public key to its name, its cluster and an expiry. A
//! node's **credentials** are its secret key, its certificate and the authority's public
//! key, which the node pins: a peer is trusted only if its certificate verifies under that
//! key (`verify_strict`), is not expired, names the node and cluster its STATUS claims,
//! and the peer proves possession of the certified key in the link handshake.
//!
//! Signatures are always over exact bytes that travel as they were signed: a certificate
//! carries its body as the JSON text the authority signed, a signed statement (GOODBYE,
//! catalog entries) carries the JSON text its node signed, and the link proof signs a
//! canonical length-prefixed transcript ([`link_transcript`]) that both sides build from
//! values they both hold. Nothing is signed after a parse/re-serialise round trip.
//!
//! # Files (JSON, keys and signatures in lowercase hex)
//!
//! `DIR/cluster.key` (mode 0600, the authority's secret; keep it off the nodes):
//! ```json
//! {"format": "mpreg-cluster-authority/1", "secret_key": "<32 bytes>", "public_key": "<32 bytes>"}
//! ```
//! `DIR/cluster.pub`: the authority's public key, 64 hex digits and a newline.
//!
//! `DIR/NAME.cred` (mode 0600, one per node, the only file a node needs):
//! ```json
//! {"format": "mpreg-node-credentials/1", "node": "NAME", "cluster_id": "C",
//!  "secret_key": "<node's 32-byte secret>",
//!  "certificate": {"body": "<JSON text of the body below>", "signature": "<64 bytes>"},
//!  "authority_public_key": "<32 bytes>"}
//! ```
//! The certificate body (the exact text the authority signed):
//! ```json
//! {"format": "mpreg-node-cert/1", "node": "NAME", "cluster_id": "C",
//!  "node_public_key": "<32 bytes>", "authority_public_key": "<32 bytes>",
//!  "issued_at": 1764620000, "expires_at": 1796156000}
//! ```
//! (times are Unix seconds).
//!
//! What this does not protect: the authority's secret (whoever holds `cluster.key` can
//! mint nodes), a node's own file (whoever reads `NAME.cred` is that node), and there is
//! no revocation list: a certificate stays valid until it expires.

use std::path::{Path, PathBuf};

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};

const AUTHORITY_FORMAT: &str = "mpreg-cluster-authority/1";
const CREDENTIALS_FORMAT: &str = "mpreg-node-credentials/1";
const CERTIFICATE_FORMAT: &str = "mpreg-node-cert/1";

/// The authority's secret key file in a keys directory.
pub const AUTHORITY_KEY_FILE: &str = "cluster.key";
/// The authority's public key file in a keys directory.
pub const AUTHORITY_PUB_FILE: &str = "cluster.pub";

/// Why credentials could not be made, read or trusted.
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A file or field does not have the documented shape.
    #[error("{0}")]
    Format(String),
    /// A signature does not verify.
    #[error("{0}")]
    BadSignature(String),
    /// A certificate's validity ended.
    #[error("certificate of {node} expired at {expires_at} (now {now})")]
    Expired {
        /// Whose.
        node: String,
        /// When (Unix seconds).
        expires_at: u64,
        /// The clock it was checked against.
        now: u64,
    },
    /// A certificate names another node or cluster than the one claimed.
    #[error("{0}")]
    Mismatch(String),
}

/// Lowercase hex of `bytes`.
pub fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[usize::from(b >> 4)] as char);
        out.push(DIGITS[usize::from(b & 0xf)] as char);
    }
    out
}

/// Exactly `N` bytes from hex text.
pub fn from_hex<const N: usize>(text: &str, what: &str) -> Result<[u8; N], TrustError> {
    let bad = || TrustError::Format(format!("{what}: expected {} hex digits", N * 2));
    let text = text.trim().as_bytes();
    if text.len() != N * 2 {
        return Err(bad());
    }
    let digit = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let mut out = [0u8; N];
    for (i, pair) in text.chunks_exact(2).enumerate() {
        out[i] = (digit(pair[0]).ok_or_else(bad)? << 4) | digit(pair[1]).ok_or_else(bad)?;
    }
    Ok(out)
}

/// An ed25519 public key from hex (`what` names the field in errors).
pub fn verifying_key(hex: &str, what: &str) -> Result<VerifyingKey, TrustError> {
    VerifyingKey::from_bytes(&from_hex::<32>(hex, what)?)
        .map_err(|e| TrustError::Format(format!("{what}: not an ed25519 public key: {e}")))
}

fn signature(hex: &str) -> Result<Signature, TrustError> {
    Ok(Signature::from_bytes(&from_hex::<64>(hex, "signature")?))
}

/// Signs `message` with `key`; the signature in hex.
pub fn sign_hex(key: &SigningKey, message: &[u8]) -> String {
    to_hex(&key.sign(message).to_bytes())
}

/// Checks `signature` (hex) over `message` with `key`, strictly (weak keys refused).
pub fn verify_hex(key: &VerifyingKey, message: &[u8], signature_hex: &str) -> Result<(), TrustError> {
    key.verify_strict(message, &signature(signature_hex)?)
        .map_err(|_| TrustError::BadSignature("signature does not verify".into()))
}

/// Writes `contents` to `path`, readable by the owner only (mode 0600 from creation, so
/// the secret is never briefly world-readable).
pub(crate) fn write_secret(path: &Path, contents: &[u8]) -> Result<(), TrustError> {
    use std::io::Write;
    let fail = |source| TrustError::Io { path: path.to_owned(), source };
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        options.mode(0o600);
        let mut file = options.open(path).map_err(fail)?;
        // An existing file keeps its old mode on open: set it explicitly.
        file.set_permissions(std::fs::Permissions::from_mode(0o600)).map_err(fail)?;
        file.write_all(contents).map_err(fail)?;
        file.sync_all().map_err(fail)
    }
    #[cfg(not(unix))]
    {
        let mut file = options.open(path).map_err(fail)?;
        file.write_all(contents).map_err(fail)?;
        file.sync_all().map_err(fail)
    }
}

pub(crate) fn read(path: &Path) -> Result<String, TrustError> {
    std::fs::read_to_string(path).map_err(|source| TrustError::Io { path: path.to_owned(), source })
}

pub(crate) fn parse<T: for<'de> Deserialize<'de>>(text: &str, what: &str) -> Result<T, TrustError> {
    serde_json::from_str(text).map_err(|e| TrustError::Format(format!("{what}: {e}")))
}

#[derive(Serialize, Deserialize)]
struct AuthorityFile {
    format: String,
    secret_key: String,
    public_key: String,
}

/// A cluster authority: signs node certificates.
pub struct Authority {
    key: SigningKey,
}

impl Authority {
    /// A fresh authority.
    pub fn generate() -> Self {
        Authority { key: SigningKey::generate(&mut rand::rngs::OsRng) }
    }

    /// The public key other nodes pin.
    pub fn public_key(&self) -> VerifyingKey {
        self.key.verifying_key()
    }

    /// The secret key, for signing records the authority vouches for (route keys).
    pub(crate) fn signing_key(&self) -> &SigningKey {
        &self.key
    }

    /// The public key in hex.
    pub fn public_hex(&self) -> String {
        to_hex(self.public_key().as_bytes())
    }

    /// Writes `dir/cluster.key` (0600) and `dir/cluster.pub`; refuses to overwrite an
    /// existing authority (that would orphan every certificate it issued).
    pub fn save(&self, dir: &Path) -> Result<(), TrustError> {
        std::fs::create_dir_all(dir).map_err(|source| TrustError::Io { path: dir.to_owned(), source })?;
        let key_path = dir.join(AUTHORITY_KEY_FILE);
        if key_path.exists() {
            return Err(TrustError::Format(format!(
                "{} exists: refusing to replace a cluster authority",
                key_path.display()
            )));
        }
        let file = AuthorityFile {
            format: AUTHORITY_FORMAT.into(),
            secret_key: to_hex(&self.key.to_bytes()),
            public_key: self.public_hex(),
        };
        let text = serde_json::to_string_pretty(&file).map_err(|e| TrustError::Format(e.to_string()))?;
        write_secret(&key_path, text.as_bytes())?;
        let pub_path = dir.join(AUTHORITY_PUB_FILE);
        std::fs::write(&pub_path, format!("{}\n", self.public_hex()))
            .map_err(|source| TrustError::Io { path: pub_path, source })
    }

    /// Reads `dir/cluster.key`.
    pub fn load(dir: &Path) -> Result<Self, TrustError> {
        let path = dir.join(AUTHORITY_KEY_FILE);
        let file: AuthorityFile = parse(&read(&path)?, &path.display().to_string())?;
        if file.format != AUTHORITY_FORMAT {
            return Err(TrustError::Format(format!("{}: format is not {AUTHORITY_FORMAT}", path.display())));
        }
        let key = SigningKey::from_bytes(&from_hex::<32>(&file.secret_key, "secret_key")?);
        if to_hex(key.verifying_key().as_bytes()) != file.public_key.trim() {
            return Err(TrustError::Mismatch(format!("{}: public_key does not match secret_key", path.display())));
        }
        Ok(Authority { key })
    }

    /// Issues credentials for `node` in `cluster_id`, valid from `now` for `valid_s`
    /// seconds, with a fresh node key pair.
    pub fn issue(&self, node: &str, cluster_id: &str, now: u64, valid_s: u64) -> Result<Credentials, TrustError> {
        let node_key = SigningKey::generate(&mut rand::rngs::OsRng);
        let body = CertificateBody {
            format: CERTIFICATE_FORMAT.into(),
            node: node.into(),
            cluster_id: cluster_id.into(),
            node_public_key: to_hex(node_key.verifying_key().as_bytes()),
            authority_public_key: self.public_hex(),
            issued_at: now,
            expires_at: now.saturating_add(valid_s),
        };
        let text = serde_json::to_string(&body).map_err(|e| TrustError::Format(e.to_string()))?;
        let signature = sign_hex(&self.key, text.as_bytes());
        let certificate = Certificate { body: text, signature };
        Ok(Credentials { key: node_key, certificate, body, authority: self.public_key() })
    }
}

/// What a certificate says (the authority signed its exact JSON text).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertificateBody {
    /// `mpreg-node-cert/1`.
    pub format: String,
    /// The node's name.
    pub node: String,
    /// Its cluster.
    pub cluster_id: String,
    /// The node's ed25519 public key (hex).
    pub node_public_key: String,
    /// The issuing authority's public key (hex), for humans; trust comes from the pinned key.
    pub authority_public_key: String,
    /// Unix seconds.
    pub issued_at: u64,
    /// Unix seconds; not valid from then on.
    pub expires_at: u64,
}

/// A node certificate as it travels: the signed body text and the authority's signature.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Certificate {
    /// The exact JSON text of a [`CertificateBody`] that was signed.
    pub body: String,
    /// The authority's ed25519 signature over `body`'s bytes (hex).
    pub signature: String,
}

impl Certificate {
    /// Checks the signature under the pinned `authority` and the expiry against `now`
    /// (Unix seconds); the verified body.
    pub fn verify(&self, authority: &VerifyingKey, now: u64) -> Result<CertificateBody, TrustError> {
        verify_hex(authority, self.body.as_bytes(), &self.signature)
            .map_err(|_| TrustError::BadSignature("certificate not signed by this cluster's authority".into()))?;
        let body: CertificateBody = parse(&self.body, "certificate body")?;
        if body.format != CERTIFICATE_FORMAT {
            return Err(TrustError::Format(format!("certificate format is not {CERTIFICATE_FORMAT}")));
        }
        if now >= body.expires_at {
            return Err(TrustError::Expired { node: body.node, expires_at: body.expires_at, now });
        }
        Ok(body)
    }
}

impl CertificateBody {
    /// The certified node key.
    pub fn node_key(&self) -> Result<VerifyingKey, TrustError> {
        verifying_key(&self.node_public_key, "node_public_key")
    }
}

#[derive(Serialize, Deserialize)]
struct CredentialsFile {
    format: String,
    node: String,
    cluster_id: String,
    secret_key: String,
    certificate: Certificate,
    authority_public_key: String,
}

/// A node's credentials: its key, its certificate, and the authority it pins.
pub struct Credentials {
    key: SigningKey,
    certificate: Certificate,
    body: CertificateBody,
    authority: VerifyingKey,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the secret.
        f.debug_struct("Credentials").field("node", &self.body.node).field("cluster_id", &self.body.cluster_id).finish()
    }
}

impl Credentials {
    /// The certificate.
    pub fn certificate(&self) -> &Certificate {
        &self.certificate
    }

    /// What the certificate says.
    pub fn body(&self) -> &CertificateBody {
        &self.body
    }

    /// The pinned authority key.
    pub fn authority(&self) -> &VerifyingKey {
        &self.authority
    }

    /// Signs `message` with the node key; the signature in hex.
    pub fn sign_hex(&self, message: &[u8]) -> String {
        sign_hex(&self.key, message)
    }

    /// Writes the credentials file (mode 0600).
    pub fn save(&self, path: &Path) -> Result<(), TrustError> {
        let file = CredentialsFile {
            format: CREDENTIALS_FORMAT.into(),
            node: self.body.node.clone(),
            cluster_id: self.body.cluster_id.clone(),
            secret_key: to_hex(&self.key.to_bytes()),
            certificate: self.certificate.clone(),
            authority_public_key: to_hex(self.authority.as_bytes()),
        };
        let text = serde_json::to_string_pretty(&file).map_err(|e| TrustError::Format(e.to_string()))?;
        write_secret(path, text.as_bytes())
    }

    /// Reads a credentials file and checks that it hangs together: the certificate
    /// verifies under the authority key in the file and certifies this file's key.
    /// Expiry is checked against `now` (Unix seconds): a node does not start with an
    /// expired certificate.
    pub fn load(path: &Path, now: u64) -> Result<Self, TrustError> {
        let shown = path.display().to_string();
        let file: CredentialsFile = parse(&read(path)?, &shown)?;
        if file.format != CREDENTIALS_FORMAT {
            return Err(TrustError::Format(format!("{shown}: format is not {CREDENTIALS_FORMAT}")));
        }
        let key = SigningKey::from_bytes(&from_hex::<32>(&file.secret_key, "secret_key")?);
        let authority = verifying_key(&file.authority_public_key, "authority_public_key")?;
        let body = file.certificate.verify(&authority, now).map_err(|e| match e {
            TrustError::Expired { .. } => e,
            other => TrustError::Format(format!("{shown}: {other}")),
        })?;
        if body.node_public_key != to_hex(key.verifying_key().as_bytes()) {
            return Err(TrustError::Mismatch(format!("{shown}: the certificate is for another key")));
        }
        if body.node != file.node || body.cluster_id != file.cluster_id {
            return Err(TrustError::Mismatch(format!("{shown}: node or cluster_id differ from the certificate")));
        }
        Ok(Credentials { key, certificate: file.certificate, body, authority })
    }

    /// Checks a peer's certificate: signed by our authority, not expired, naming `node`
    /// in our cluster. The peer's node key.
    pub fn check_peer(&self, certificate: &Certificate, node: &str, now: u64) -> Result<VerifyingKey, TrustError> {
        check_certificate(&self.authority, certificate, node, &self.body.cluster_id, now)
    }

    /// Signs a statement about this node (its exact text) for others to relay.
    pub fn seal(&self, signed: String) -> StatementProof {
        let signature = self.sign_hex(signed.as_bytes());
        StatementProof { signed, signature, certificate: self.certificate.clone() }
    }

    /// Checks a statement `node` made about itself: the certificate it carries is for
    /// `node` and chains to our authority, and the signature over the exact text
    /// verifies. The signed text.
    pub fn open<'a>(&self, proof: &'a StatementProof, node: &str, now: u64) -> Result<&'a str, TrustError> {
        let key = self.check_peer(&proof.certificate, node, now)?;
        verify_hex(&key, proof.signed.as_bytes(), &proof.signature)
            .map_err(|_| TrustError::BadSignature(format!("statement not signed by {node}")))?;
        Ok(&proof.signed)
    }
}

/// A statement a node signed about itself, relayed unchanged by others.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatementProof {
    /// The exact JSON text the node signed; receivers act on what it says.
    pub signed: String,
    /// The node's ed25519 signature over `signed`'s bytes (hex).
    pub signature: String,
    /// The node's certificate, so nodes without a direct link can check it.
    pub certificate: Certificate,
}

/// Which side of a link signs a transcript.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkSide {
    /// The node that opened the websocket.
    Dialer,
    /// The node that accepted it.
    Acceptor,
}

/// Who is on one end of a link, as bound into the handshake proof.
#[derive(Debug, Clone, Copy)]
pub struct LinkEnd<'a> {
    /// Node name.
    pub node: &'a str,
    /// Instance id.
    pub instance_id: &'a str,
    /// The nonce this end chose (hex).
    pub nonce: &'a str,
}

/// The bytes one side signs in the link handshake: a domain tag, the signing side, the
/// cluster, then both ends (dialer first) with their nonces, each field length-prefixed
/// (u32 big endian) so no two field lists encode alike. Binding both fresh nonces stops
/// replay; binding the side stops reflection (an acceptor's proof is not a dialer's);
/// binding both names and instances stops relaying a proof onto another link.
pub fn link_transcript(side: LinkSide, cluster_id: &str, dialer: LinkEnd<'_>, acceptor: LinkEnd<'_>) -> Vec<u8> {
    let side = match side {
        LinkSide::Dialer => "dialer",
        LinkSide::Acceptor => "acceptor",
    };
    let fields = [
        "mpreg/link-proof/v1",
        side,
        cluster_id,
        dialer.node,
        dialer.instance_id,
        dialer.nonce,
        acceptor.node,
        acceptor.instance_id,
        acceptor.nonce,
    ];
    let mut out = Vec::with_capacity(fields.iter().map(|f| f.len() + 4).sum());
    for field in fields {
        out.extend_from_slice(&(field.len() as u32).to_be_bytes());
        out.extend_from_slice(field.as_bytes());
    }
    out
}

/// Checks a certificate: signed by `authority`, not expired, naming `node` of `cluster`.
/// The node's key.
pub fn check_certificate(
    authority: &VerifyingKey,
    certificate: &Certificate,
    node: &str,
    cluster: &str,
    now: u64,
) -> Result<VerifyingKey, TrustError> {
    let body = certificate.verify(authority, now)?;
    if body.node != node {
        return Err(TrustError::Mismatch(format!("certificate is for node {}, not {node}", body.node)));
    }
    if body.cluster_id != cluster {
        return Err(TrustError::Mismatch(format!("certificate is for cluster {}", body.cluster_id)));
    }
    body.node_key()
}

/// What a federation bridge's handshake transcripts name as their cluster: both clusters,
/// the dialer's first (a transcript signed for one bridge, or for a link inside a cluster,
/// never verifies for another).
pub fn bridge_label(dialer_cluster: &str, acceptor_cluster: &str) -> String {
    format!("federation:{dialer_cluster}>{acceptor_cluster}")
}

/// A fresh random nonce for one link (32 bytes, hex).
pub fn fresh_nonce() -> String {
    to_hex(&rand::random::<[u8; 32]>())
}

/// Now, in whole Unix seconds.
pub fn unix_seconds() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_800_000_000;
    const DAY: u64 = 86_400;

    fn temp_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("mpreg-trust-{tag}-{}-{}", std::process::id(), fresh_nonce()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn hex_round_trips_and_refuses_bad_digits() {
        let bytes = [0u8, 1, 0xab, 0xff];
        assert_eq!(to_hex(&bytes), "0001abff");
        assert_eq!(from_hex::<4>("0001ABff", "x").unwrap(), bytes);
        assert!(from_hex::<4>("0001abf", "x").is_err());
        assert!(from_hex::<4>("0001abfg", "x").is_err());
    }

    #[test]
    fn certificate_round_trips_through_files_with_private_modes() {
        let dir = temp_dir("files");
        let authority = Authority::generate();
        authority.save(&dir).unwrap();
        assert!(authority.save(&dir).is_err(), "an authority is never overwritten");
        let loaded = Authority::load(&dir).unwrap();
        assert_eq!(loaded.public_hex(), authority.public_hex());
        let pub_text = std::fs::read_to_string(dir.join(AUTHORITY_PUB_FILE)).unwrap();
        assert_eq!(pub_text.trim(), authority.public_hex());

        let creds = loaded.issue("A", "c1", NOW, DAY).unwrap();
        let path = dir.join("A.cred");
        creds.save(&path).unwrap();
        let back = Credentials::load(&path, NOW + 1).unwrap();
        assert_eq!(back.body(), creds.body());
        assert_eq!(back.certificate(), creds.certificate());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            for file in [dir.join(AUTHORITY_KEY_FILE), path] {
                let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
                assert_eq!(mode, 0o600, "{}", file.display());
            }
        }
        // A peer with credentials from the same authority accepts this certificate.
        let peer = authority.issue("B", "c1", NOW, DAY).unwrap();
        let key = peer.check_peer(creds.certificate(), "A", NOW + 2).unwrap();
        assert_eq!(to_hex(key.as_bytes()), creds.body().node_public_key);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_tampered_certificate_is_refused() {
        let authority = Authority::generate();
        let verifier = authority.issue("B", "c1", NOW, DAY).unwrap();
        let mut cert = authority.issue("A", "c1", NOW, DAY).unwrap().certificate().clone();
        cert.body = cert.body.replace("\"node\":\"A\"", "\"node\":\"Z\"");
        assert!(cert.body.contains("\"Z\""));
        assert!(matches!(verifier.check_peer(&cert, "Z", NOW), Err(TrustError::BadSignature(_))));
        let mut cert = authority.issue("A", "c1", NOW, DAY).unwrap().certificate().clone();
        cert.signature.replace_range(0..2, if cert.signature.starts_with("00") { "01" } else { "00" });
        assert!(verifier.check_peer(&cert, "A", NOW).is_err());
    }

    #[test]
    fn an_expired_certificate_is_refused() {
        let authority = Authority::generate();
        let verifier = authority.issue("B", "c1", NOW, 10 * DAY).unwrap();
        let cert = authority.issue("A", "c1", NOW, DAY).unwrap().certificate().clone();
        assert!(verifier.check_peer(&cert, "A", NOW + DAY - 1).is_ok());
        assert!(matches!(verifier.check_peer(&cert, "A", NOW + DAY), Err(TrustError::Expired { .. })));
    }

    #[test]
    fn a_certificate_of_another_authority_or_identity_is_refused() {
        let ours = Authority::generate();
        let theirs = Authority::generate();
        let verifier = ours.issue("B", "c1", NOW, DAY).unwrap();
        let foreign = theirs.issue("A", "c1", NOW, DAY).unwrap();
        assert!(matches!(verifier.check_peer(foreign.certificate(), "A", NOW), Err(TrustError::BadSignature(_))));
        let a = ours.issue("A", "c1", NOW, DAY).unwrap();
        assert!(matches!(verifier.check_peer(a.certificate(), "C", NOW), Err(TrustError::Mismatch(_))));
        let other_cluster = ours.issue("A", "c2", NOW, DAY).unwrap();
        assert!(matches!(verifier.check_peer(other_cluster.certificate(), "A", NOW), Err(TrustError::Mismatch(_))));
    }

    #[test]
    fn a_credentials_file_with_someone_elses_key_is_refused() {
        let dir = temp_dir("swap");
        let authority = Authority::generate();
        let a = authority.issue("A", "c1", NOW, DAY).unwrap();
        let b = authority.issue("B", "c1", NOW, DAY).unwrap();
        let mixed = Credentials {
            key: SigningKey::from_bytes(&b.key.to_bytes()),
            certificate: a.certificate.clone(),
            body: a.body.clone(),
            authority: a.authority,
        };
        let path = dir.join("mixed.cred");
        mixed.save(&path).unwrap();
        assert!(matches!(Credentials::load(&path, NOW), Err(TrustError::Mismatch(_))));
        a.save(&path).unwrap();
        assert!(matches!(Credentials::load(&path, NOW + DAY), Err(TrustError::Expired { .. })));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_handshake_transcript_binds_side_nonces_and_names() {
        let authority = Authority::generate();
        let a = authority.issue("A", "c1", NOW, DAY).unwrap();
        let b = authority.issue("B", "c1", NOW, DAY).unwrap();
        let dialer = LinkEnd { node: "A", instance_id: "ia", nonce: "n1" };
        let acceptor = LinkEnd { node: "B", instance_id: "ib", nonce: "n2" };
        let transcript = link_transcript(LinkSide::Acceptor, "c1", dialer, acceptor);
        let proof = b.sign_hex(&transcript);
        let b_key = a.check_peer(b.certificate(), "B", NOW).unwrap();
        verify_hex(&b_key, &transcript, &proof).unwrap();
        // Reflected (the other side's role), replayed (another nonce), or moved to another
        // node or cluster: it no longer verifies.
        let variants = [
            link_transcript(LinkSide::Dialer, "c1", dialer, acceptor),
            link_transcript(LinkSide::Acceptor, "c1", LinkEnd { nonce: "n3", ..dialer }, acceptor),
            link_transcript(LinkSide::Acceptor, "c1", LinkEnd { node: "C", ..dialer }, acceptor),
            link_transcript(LinkSide::Acceptor, "c2", dialer, acceptor),
            link_transcript(LinkSide::Acceptor, "c1", acceptor, dialer),
        ];
        for other in variants {
            assert!(verify_hex(&b_key, &other, &proof).is_err());
        }
        // Length prefixes: shifting a boundary between fields changes the bytes.
        let shifted =
            link_transcript(LinkSide::Acceptor, "c1", LinkEnd { node: "A", instance_id: "ian", nonce: "1" }, acceptor);
        assert_ne!(shifted, transcript);
    }

    #[test]
    fn statements_verify_only_for_their_node_and_exact_text() {
        let authority = Authority::generate();
        let a = authority.issue("A", "c1", NOW, DAY).unwrap();
        let b = authority.issue("B", "c1", NOW, DAY).unwrap();
        let goodbye = a.seal(r#"{"statement":"goodbye","node":"A","instance_id":"i1"}"#.into());
        assert_eq!(b.open(&goodbye, "A", NOW).unwrap(), goodbye.signed);
        assert!(b.open(&goodbye, "B", NOW).is_err(), "A's statement is not B's");
        let mut forged = goodbye.clone();
        forged.signed = forged.signed.replace("i1", "i2");
        assert!(matches!(b.open(&forged, "A", NOW), Err(TrustError::BadSignature(_))));
        // A relay with its own valid certificate cannot speak for A.
        let relayed = StatementProof { certificate: b.certificate().clone(), ..b.seal(goodbye.signed.clone()) };
        assert!(b.open(&relayed, "A", NOW).is_err());
    }
}
