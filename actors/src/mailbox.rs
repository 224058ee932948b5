//! Each peer link's share of an actor's mailbox.
//!
//! Actix mailboxes fed with `do_send` have no bound. A link's reader hands what a peer sent
//! to an actor (gossip to FabricGossip, published messages to PubSub) without waiting:
//! without a share, a peer that sends faster than the actor handles would grow the mailbox
//! without end. Beyond a link's share its frames are dropped and counted by the caller
//! (gossip tolerates loss and the periodic push-pull repairs it; a published message is
//! best effort across nodes).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::fabric::LinkId;

/// Frames one link may have in one actor's mailbox, not yet handled.
pub const MAX_MAILBOX_FRAMES_PER_LINK: usize = 4096;
/// Bytes (as read) of those frames; a single larger frame passes when the link has none
/// waiting.
pub const MAX_MAILBOX_BYTES_PER_LINK: usize = 16 << 20;

/// What each link has handed to one actor that the actor has not handled yet (frames,
/// bytes).
#[derive(Clone, Default)]
pub struct MailboxShares(Arc<Mutex<HashMap<LinkId, (usize, usize)>>>);

impl MailboxShares {
    /// A place for a frame of `bytes` from `link`, held until the ticket drops (the actor
    /// handled the message, or dropped it); `None` when the link's share is used up.
    pub fn take(&self, link: LinkId, bytes: usize) -> Option<MailboxTicket> {
        let mut map = self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let (frames, queued) = map.entry(link).or_default();
        let fits =
            *frames == 0 || (*frames < MAX_MAILBOX_FRAMES_PER_LINK && *queued + bytes <= MAX_MAILBOX_BYTES_PER_LINK);
        if !fits {
            return None;
        }
        *frames += 1;
        *queued += bytes;
        Some(MailboxTicket { shares: self.clone(), link, bytes })
    }
}

/// A frame's place in its link's [`MailboxShares`], given back on drop.
pub struct MailboxTicket {
    shares: MailboxShares,
    link: LinkId,
    bytes: usize,
}

impl Drop for MailboxTicket {
    fn drop(&mut self) {
        let mut map = self.shares.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some((frames, queued)) = map.get_mut(&self.link) {
            *frames -= 1;
            *queued -= self.bytes;
            if *frames == 0 {
                map.remove(&self.link);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_links_share_of_the_mailbox_is_bounded_in_frames_and_bytes_and_given_back() {
        let shares = MailboxShares::default();
        // One frame larger than the byte bound passes when its link has none waiting.
        let big = shares.take(1, MAX_MAILBOX_BYTES_PER_LINK * 2).expect("alone: passes");
        assert!(shares.take(1, 1).is_none(), "nothing joins it");
        assert!(shares.take(2, 1).is_some(), "another link has its own share");
        drop(big);
        let held: Vec<MailboxTicket> =
            (0..MAX_MAILBOX_FRAMES_PER_LINK).map(|_| shares.take(1, 10).expect("within the share")).collect();
        assert!(shares.take(1, 10).is_none(), "frames used up");
        drop(held);
        let half = shares.take(1, MAX_MAILBOX_BYTES_PER_LINK / 2).expect("given back");
        assert!(shares.take(1, MAX_MAILBOX_BYTES_PER_LINK / 2 + 1).is_none(), "bytes used up");
        drop(half);
        assert!(shares.0.lock().unwrap().is_empty(), "no entry is left behind");
    }
}
