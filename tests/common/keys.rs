//! A cluster authority for tests: its key and the node credentials it issues live in a
//! temporary directory, removed on drop — what `mpreg keys init` and `mpreg keys issue`
//! would write, made without the CLI.

use std::path::PathBuf;

use mpreg_actors::fabric::trust::{self, Authority};

/// A cluster authority in a temporary directory, removed on drop.
pub struct Keys {
    /// Where the authority and the issued credentials are saved.
    pub dir: PathBuf,
    /// The authority itself, for tests that issue credentials by hand.
    pub authority: Authority,
    /// The cluster the credentials are issued for.
    pub cluster: String,
}

impl Keys {
    /// A new authority for `cluster`, saved in a fresh temporary directory.
    pub fn new(cluster: &str) -> Keys {
        let dir = std::env::temp_dir().join(format!("mpreg-test-keys-{}-{}", std::process::id(), trust::fresh_nonce()));
        let authority = Authority::generate();
        authority.save(&dir).expect("authority saved");
        Keys { dir, authority, cluster: cluster.to_owned() }
    }

    /// `NAME.cred` for this cluster, valid for a day, as `mpreg keys issue` writes it.
    pub fn issue(&self, name: &str) -> PathBuf {
        let credentials =
            self.authority.issue(name, &self.cluster, trust::unix_seconds(), 86_400).expect("credentials issued");
        let path = self.dir.join(format!("{name}.cred"));
        credentials.save(&path).expect("credentials saved");
        path
    }
}

impl Drop for Keys {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
