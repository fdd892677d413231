//! The acks of an [`RpcServer`](crate::RpcServer): request tasks hand over the delivery tags of
//! the requests they answered, and one task per server acks them on the server's channel, in
//! order, folding a run of consecutive answered requests into one `multiple` ack.
//!
//! With many requests in flight this sends one ack frame per batch instead of one per request.
//! A request answered out of order (an earlier one still running) is acked on its own at once,
//! so a slow request never holds back the acks, and thus the prefetch credit, of later ones.
//! A request never handed over (its reply could not be published) is never covered by a
//! `multiple` ack: it stays unacked, and the broker redelivers it when the channel closes.
//!
//! Acks go out with `Channel::basic_ack`, not the delivery's `Acker`: lapin settles an
//! `Acker`'s ack through its internal RPC task, which spawns a task per ack.

use lapin::{Channel, options::BasicAckOptions};
use std::collections::BTreeSet;
use tokio::sync::mpsc;
use tracing::warn;

/// Where request tasks hand over the delivery tags of answered requests. The ack task ends
/// once every `AckSender` is gone and the tags handed over are acked.
#[derive(Debug)]
pub(crate) struct AckSender(mpsc::UnboundedSender<u64>);

/// The receiving end, for [`send_acks`].
pub(crate) type AckReceiver = mpsc::UnboundedReceiver<u64>;

/// A sender and the receiver [`send_acks`] drains.
pub(crate) fn ack_channel() -> (AckSender, AckReceiver) {
    let (tx, rx) = mpsc::unbounded_channel();
    (AckSender(tx), rx)
}

impl AckSender {
    /// Hands over an answered request (its reply is published) to be acked.
    pub(crate) fn answered(&self, delivery_tag: u64) {
        // Refused only once the ack task has stopped (its channel failed): nothing left to do.
        let _ = self.0.send(delivery_tag);
    }
}

/// Acks the tags handed over on `channel` until every [`AckSender`] is gone or an ack fails
/// (the channel is closed).
pub(crate) async fn send_acks(channel: Channel, mut answered: AckReceiver) {
    let mut fold = AckFold::default();
    while let Some(tag) = answered.recv().await {
        fold.answered(tag);
        // Everything answered meanwhile goes into the same batch.
        while let Ok(tag) = answered.try_recv() {
            fold.answered(tag);
        }
        for (delivery_tag, multiple) in fold.take_acks() {
            if let Err(e) = channel
                .basic_ack(delivery_tag, BasicAckOptions { multiple })
                .await
            {
                warn!(error = %e, delivery_tag, "acking answered requests failed");
                return;
            }
        }
    }
}

/// Which acks cover the answered requests: the bookkeeping of [`send_acks`], apart from I/O.
#[derive(Debug, Default)]
struct AckFold {
    /// Every tag up to this one is acked.
    acked_through: u64,
    /// Answered, not yet acked.
    answered: BTreeSet<u64>,
    /// Acked on its own, above `acked_through` (an earlier request was still running).
    acked_alone: BTreeSet<u64>,
}

impl AckFold {
    fn answered(&mut self, delivery_tag: u64) {
        self.answered.insert(delivery_tag);
    }

    /// The acks to send now, in order, as `(delivery_tag, multiple)`: one `multiple` ack for the
    /// run of answered tags right above `acked_through`, then each other answered tag alone.
    fn take_acks(&mut self) -> Vec<(u64, bool)> {
        let mut acks = Vec::new();
        let mut run_top = None;
        let mut run_len = 0;
        loop {
            let next = self.acked_through + 1;
            if self.answered.remove(&next) {
                run_top = Some(next);
                run_len += 1;
            } else if !self.acked_alone.remove(&next) {
                break;
            }
            self.acked_through = next;
        }
        if let Some(top) = run_top {
            acks.push((top, run_len > 1));
        }
        for tag in std::mem::take(&mut self.answered) {
            acks.push((tag, false));
            self.acked_alone.insert(tag);
        }
        acks
    }
}

#[cfg(test)]
mod tests {
    use super::AckFold;

    fn fold(fold: &mut AckFold, tags: &[u64]) -> Vec<(u64, bool)> {
        for &tag in tags {
            fold.answered(tag);
        }
        fold.take_acks()
    }

    #[test]
    fn a_run_of_answered_requests_is_one_multiple_ack() {
        let mut f = AckFold::default();
        assert_eq!(fold(&mut f, &[2, 1, 3]), [(3, true)]);
        assert_eq!(fold(&mut f, &[4]), [(4, false)]);
    }

    #[test]
    fn requests_answered_past_a_running_one_are_acked_alone_and_never_acked_again() {
        let mut f = AckFold::default();
        // 1 is still running: 2 and 3 must not wait for it, nor be covered by `multiple`.
        assert_eq!(fold(&mut f, &[2, 3]), [(2, false), (3, false)]);
        // 1 answered: acked alone (2 and 3 are acked), and the run moves past them.
        assert_eq!(fold(&mut f, &[1]), [(1, false)]);
        assert_eq!(fold(&mut f, &[5, 4]), [(5, true)]);
    }

    #[test]
    fn a_request_never_answered_is_never_covered() {
        let mut f = AckFold::default();
        // 2's reply failed: it is never handed over, so no `multiple` ack may reach past 1.
        assert_eq!(
            fold(&mut f, &[1, 3, 4]),
            [(1, false), (3, false), (4, false)]
        );
        assert_eq!(fold(&mut f, &[5, 6]), [(5, false), (6, false)]);
    }
}
