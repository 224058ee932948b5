//! Node processes started from the built `mpreg` binary.

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
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

/// The built `mpreg` with quiet logs and no inherited `MPREG_URL`.
pub fn mpreg_command() -> std::process::Command {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_mpreg"));
    command.env("RUST_LOG", "warn").env("NO_COLOR", "1").env_remove("MPREG_URL");
    command
}

/// A node process in a process group of its own, the whole group SIGKILLed and the node
/// reaped on drop.
pub struct NodeProcess {
    child: Child,
    /// The URL it printed.
    pub url: String,
}

impl NodeProcess {
    /// Runs `command` (an `mpreg server ...`, or a wrapper such as strace around one) and
    /// waits for the URL it prints.
    pub fn spawn(mut command: std::process::Command) -> NodeProcess {
        let mut child = command
            .process_group(0)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn mpreg");
        let url = printed_url(&mut child, Duration::from_secs(60));
        NodeProcess { child, url }
    }

    /// `mpreg server start` on free ports with `dir` as its data dir.
    pub fn on_data_dir(dir: &std::path::Path) -> NodeProcess {
        let mut command = mpreg_command();
        Self::add_data_dir_args(&mut command, dir);
        Self::spawn(command)
    }

    /// Appends `server start` on free ports with `dir` as its data dir to `command`.
    pub fn add_data_dir_args(command: &mut std::process::Command, dir: &std::path::Path) {
        command.args(["server", "start", "--port", "0", "--monitoring-port", "0", "--data-dir"]).arg(dir);
    }

    /// SIGKILL, then reap.
    pub fn kill9(self) {
        drop(self);
    }

    /// SIGTERM (a clean stop), then reap.
    pub fn terminate(mut self) {
        let _ = std::process::Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        let _ = self.child.wait();
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        // The group: a wrapper's node too (strace's tracee keeps running when only strace
        // is killed). The child is not reaped yet, so its pid still names this group.
        let group = format!("-{}", self.child.id());
        let _ = std::process::Command::new("kill").args(["-KILL", "--", &group]).status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
