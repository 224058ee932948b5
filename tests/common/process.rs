//! Node processes started from the built `mpreg` binary.

use std::io::{BufRead, BufReader};
use std::process::Child;
use std::time::Duration;

/// The URL a node process prints on its stdout (`MPREG_URL=...`) once it listens; panics
/// if it has not within `within`. The child's stdout must be piped; it is read to its end
/// by a thread of its own, so the node never blocks on a full pipe.
pub fn printed_url(child: &mut Child, within: Duration) -> String {
    printed_urls(child).recv_timeout(within).expect("the node never printed MPREG_URL")
}

/// Every URL printed on the child's stdout, in order (a script that starts one node after
/// another prints several); read as [`printed_url`] reads.
pub fn printed_urls(child: &mut Child) -> std::sync::mpsc::Receiver<String> {
    let stdout = child.stdout.take().expect("the node's stdout is piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(url) = line.strip_prefix("MPREG_URL=") {
                let _ = tx.send(url.to_owned());
            }
        }
    });
    rx
}
