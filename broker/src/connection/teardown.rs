//! Ending channels and connections: nothing is lost. Unacknowledged deliveries go back to their
//! queues flagged redelivered, deliveries still in the mailbox (never written) go back as they
//! were, consumers are removed (auto-delete queues go with their last one) and exclusive
//! queues of the connection are deleted.

use super::Connection;
use crate::channel::{Channel, ChannelConsumer};
use crate::direct_reply::PSEUDO_QUEUE;
use crate::mailbox::{MailboxReceiver, Outbound};
use crate::message::QueuedMessage;
use crate::queue::{Return, Source};
use crate::vhost::{VhostState, source_queue};
use rustc_hash::FxHashSet;
use std::sync::Arc;
use tokio::time::Instant;

impl Connection {
    /// Releases what a channel holds (it stays in the map if it is closing).
    pub(crate) fn release_channel(&mut self, channel: u16) {
        let Some(ch) = self.channels.get_mut(&channel) else {
            return;
        };
        let consumers = std::mem::take(&mut ch.consumers);
        let mut unacked = std::mem::take(&mut ch.unacked);
        // Uncommitted acks are void: those deliveries are unacknowledged still.
        if let Some(tx) = ch.tx.take() {
            unacked.extend(tx.settles.into_iter().flat_map(|(settled, _)| settled));
        }
        ch.assembly = Default::default();
        let vhost = self.vhost.clone();
        let mut state = vhost.lock();
        let mut touched = FxHashSet::default();
        for (tag, consumer) in consumers {
            self.detach_consumer(&mut state, channel, &tag, &consumer);
            // A waiting consumer may take over (single active consumer): after the requeues
            // below, so that it gets them first.
            touched.insert(consumer.queue().clone());
        }
        // The channel's consumers are detached above, so settling finds none of them.
        for (_, u) in unacked.take_all() {
            requeue(
                &mut state,
                &u.source,
                self.id,
                channel,
                u.message,
                Return::Released,
            );
            touched.insert(u.source.queue.clone());
        }
        dispatch_all(&mut state, touched);
    }

    /// Detaches a consumer its channel has forgotten: from its queue (which may auto-delete), or
    /// from direct reply-to.
    pub(crate) fn detach_consumer(
        &mut self,
        state: &mut VhostState,
        channel: u16,
        tag: &str,
        consumer: &ChannelConsumer,
    ) {
        if &**consumer.queue() == PSEUDO_QUEUE {
            if let Some(address) = self
                .channels
                .get_mut(&channel)
                .and_then(|c| c.reply_address.take())
            {
                state.reply_consumers.remove(&address);
            }
            return;
        }
        let VhostState { queues, outbox, .. } = state;
        if let Some(queue) = queues.get_mut(consumer.queue()) {
            queue.remove_consumer(self.id, channel, tag);
            queue.touch(Instant::now(), outbox);
        }
        state.auto_delete(consumer.queue());
    }

    /// Ends the connection: requeues everything it held and deletes its exclusive queues.
    pub(crate) fn teardown(&mut self, inbox: &mut MailboxReceiver) {
        let pending = inbox.close_and_drain();
        let channels: Vec<u16> = self.channels.keys().copied().collect();
        for channel in channels {
            self.release_channel(channel);
        }
        self.channels.clear();
        let mut state = self.vhost.lock();
        let mut touched = FxHashSet::default();
        for item in pending {
            if let Outbound::Deliver {
                source,
                no_ack,
                message,
                ..
            } = item
            {
                requeue_undelivered(&mut state, &source, no_ack, message);
                touched.insert(source.queue.clone());
            }
        }
        state.delete_exclusive_queues(self.id);
        dispatch_all(&mut state, touched);
    }

    /// A delivery whose consumer or channel is gone by the time it leaves the mailbox: back
    /// to its queue.
    pub(crate) fn return_undelivered(
        &mut self,
        source: Arc<Source>,
        no_ack: bool,
        message: QueuedMessage,
    ) {
        let mut state = self.vhost.lock();
        requeue_undelivered(&mut state, &source, no_ack, message);
        state.dispatch(&source.queue, Instant::now());
    }

    /// The channel, if open.
    pub(crate) fn open_channel(&mut self, channel: u16) -> Option<&mut Channel> {
        self.channels
            .get_mut(&channel)
            .filter(|ch| ch.state == crate::channel::ChannelState::Open)
    }
}

/// Returns a delivery that never reached the socket to its queue, as it was: the client never
/// saw it, so it is not flagged redelivered (RabbitMQ flags only messages a client received).
fn requeue_undelivered(
    state: &mut VhostState,
    source: &Source,
    no_ack: bool,
    message: QueuedMessage,
) {
    if let Some(q) = source_queue(&mut state.queues, source) {
        q.undo_dispatch(source, no_ack, message);
    }
}

/// Settles a delivery from `source` and puts its message back (if the queue still exists).
pub(crate) fn requeue(
    state: &mut VhostState,
    source: &Source,
    conn: u64,
    channel: u16,
    message: QueuedMessage,
    how: Return,
) {
    if let Some(q) = source_queue(&mut state.queues, source) {
        q.settle(conn, channel, source, 1);
        q.requeue(message, how, &mut state.outbox);
    }
}

/// Dispatches every named queue.
pub(crate) fn dispatch_all(state: &mut VhostState, queues: FxHashSet<Arc<str>>) {
    let now = Instant::now();
    for name in queues {
        state.dispatch(&name, now);
    }
}
