//! A virtual host: its queues and exchanges under one std mutex, held only briefly and never
//! across an `.await`. Every operation that touches more than one queue or a queue and its
//! consumers takes the lock once.

use crate::direct_reply::{ADDRESS_PREFIX, ReplyConsumer};
use crate::exchange::{Exchange, builtin_exchanges, is_default};
use crate::mailbox::{Outbound, Outbox};
use crate::message::{Message, QueuedMessage};
use crate::queue::{ConnId, Queue};
use amq_protocol::types::FieldTable;
use rustc_hash::FxHashMap;
use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::time::Instant;

/// A virtual host.
#[derive(Debug)]
pub(crate) struct Vhost {
    /// Its name, e.g. `/`.
    pub(crate) name: String,
    /// A std mutex rather than tokio's: it is only held for in-memory work that never awaits,
    /// so it is never contended across a suspension point and is cheaper than an async lock.
    state: Mutex<VhostState>,
}

/// Everything in a vhost.
#[derive(Debug)]
pub(crate) struct VhostState {
    /// Queues by name.
    pub(crate) queues: FxHashMap<Arc<str>, Queue>,
    /// Exchanges by name.
    pub(crate) exchanges: FxHashMap<String, Exchange>,
    /// Direct reply-to consumers by reply address.
    pub(crate) reply_consumers: FxHashMap<String, ReplyConsumer>,
    /// Items for connections' mailboxes, handed over when the lock is released.
    pub(crate) outbox: Outbox,
}

/// The vhost lock, held. Items sent to mailboxes through the outbox while it is held
/// (deliveries from queues, server-sent cancels) reach them when it is released, in the order
/// they were sent.
pub(crate) struct VhostGuard<'a>(MutexGuard<'a, VhostState>);

impl Deref for VhostGuard<'_> {
    type Target = VhostState;

    fn deref(&self) -> &VhostState {
        &self.0
    }
}

impl DerefMut for VhostGuard<'_> {
    fn deref_mut(&mut self) -> &mut VhostState {
        &mut self.0
    }
}

impl Drop for VhostGuard<'_> {
    fn drop(&mut self) {
        self.0.flush_outbox();
    }
}

impl Vhost {
    /// A vhost with RabbitMQ's predeclared exchanges.
    pub(crate) fn new(name: &str) -> Self {
        let exchanges = builtin_exchanges()
            .into_iter()
            .map(|(n, e)| (n.to_owned(), e))
            .collect();
        Self {
            name: name.to_owned(),
            state: Mutex::new(VhostState {
                queues: FxHashMap::default(),
                exchanges,
                reply_consumers: FxHashMap::default(),
                outbox: Outbox::default(),
            }),
        }
    }

    /// Takes the lock. A panic while it was held cannot leave the maps half-updated in a way
    /// that matters more than stopping service, so poisoning is ignored.
    pub(crate) fn lock(&self) -> VhostGuard<'_> {
        VhostGuard(self.state.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

impl VhostState {
    /// Dispatches a queue, if it exists.
    pub(crate) fn dispatch(&mut self, queue: &str, now: Instant) {
        if let Some(q) = self.queues.get_mut(queue) {
            q.dispatch(now, &mut self.outbox);
        }
    }

    /// Hands the gathered items to their mailboxes. A delivery whose connection has gone
    /// meanwhile goes back to its queue, which dispatches again.
    fn flush_outbox(&mut self) {
        while !self.outbox.is_empty() {
            let undelivered = self.outbox.flush();
            if undelivered.is_empty() {
                return;
            }
            let now = Instant::now();
            for item in undelivered {
                if let Outbound::Deliver {
                    source,
                    no_ack,
                    message,
                    ..
                } = item
                    && let Some(q) = self.queues.get_mut(&source.queue)
                {
                    q.undo_dispatch(message, no_ack);
                    q.dispatch(now, &mut self.outbox);
                }
            }
        }
    }

    /// Routes a message from its exchange (which must exist) and enqueues it, with its
    /// `expiration` (`ttl`, in milliseconds) counted from `now`; gives it back if it routes to
    /// no queue.
    pub(crate) fn publish(
        &mut self,
        headers: Option<&FieldTable>,
        ttl: Option<u64>,
        mut message: Message,
        now: Instant,
    ) -> Result<(), Message> {
        let expires_at = ttl.map(|ms| now + Duration::from_millis(ms));
        if is_default(message.exchange()) {
            let routing_key = message.routing_key();
            if routing_key.starts_with(ADDRESS_PREFIX) {
                return self.reply(message);
            }
            return match self.queues.get_mut(routing_key) {
                Some(queue) => {
                    queue.publish(message, expires_at, now, &mut self.outbox);
                    Ok(())
                }
                None => Err(message),
            };
        }
        let Some(exchange) = self.exchanges.get(message.exchange()) else {
            return Err(message);
        };
        // Whether a target has no consumer, so would keep the message in a buffer of its own
        // (`Queue::keep`).
        let mut one_would_copy = false;
        let mut targets: Vec<&Arc<str>> = exchange
            .route(message.routing_key(), headers)
            .filter(|name| match self.queues.get(&***name) {
                Some(queue) => {
                    one_would_copy |= queue.consumer_count() == 0;
                    true
                }
                None => false,
            })
            .collect();
        if targets.len() > 1 {
            targets.sort();
            targets.dedup();
        }
        let Some(last) = targets.pop() else {
            return Err(message);
        };
        if !targets.is_empty() && one_would_copy {
            // Each queue without a consumer would copy a shared body out: one copy now, which
            // every queue shares, instead. Queues with consumers share the pinned body as it is.
            message.unpin();
        }
        for name in targets {
            if let Some(queue) = self.queues.get_mut(name) {
                queue.publish(message.clone(), expires_at, now, &mut self.outbox);
            }
        }
        if let Some(queue) = self.queues.get_mut(last) {
            queue.publish(message, expires_at, now, &mut self.outbox);
        }
        Ok(())
    }

    /// Hands a reply straight to the direct reply-to consumer it is addressed to.
    fn reply(&mut self, message: Message) -> Result<(), Message> {
        let Some(consumer) = self.reply_consumers.get(message.routing_key()) else {
            return Err(message);
        };
        let delivery = Outbound::Deliver {
            channel: consumer.channel,
            source: consumer.source.clone(),
            no_ack: true,
            message: QueuedMessage {
                seq: 0,
                redelivered: false,
                expires_at: None,
                message,
            },
        };
        let Err(Outbound::Deliver { message, .. }) = consumer.mailbox.send(delivery) else {
            return Ok(());
        };
        Err(message.message)
    }

    /// Deletes a queue: its consumers are told (basic.cancel) and its messages dropped.
    /// Returns the number of ready messages it held.
    pub(crate) fn delete_queue(&mut self, name: &str) -> Option<u32> {
        let mut queue = self.queues.remove(name)?;
        self.remove_bindings_to(name);
        let count = queue.ready_len() as u32;
        for consumer in queue.take_consumers() {
            self.outbox.send(
                &consumer.mailbox,
                Outbound::Cancel {
                    channel: consumer.channel,
                    consumer_tag: consumer.tag().into(),
                },
            );
        }
        Some(count)
    }

    /// Deletes the queue if it is auto-delete and has lost its last consumer.
    pub(crate) fn auto_delete(&mut self, name: &str) {
        if self.queues.get(name).is_some_and(Queue::should_auto_delete) {
            self.delete_queue(name);
        }
    }

    /// Removes every binding to a deleted queue; auto-delete exchanges left without bindings
    /// go too.
    fn remove_bindings_to(&mut self, queue: &str) {
        let mut emptied = Vec::new();
        for (name, exchange) in self.exchanges.iter_mut() {
            let before = exchange.bindings.len();
            exchange.bindings.retain(|b| &*b.queue != queue);
            if exchange.auto_delete && before > 0 && exchange.bindings.is_empty() {
                emptied.push(name.clone());
            }
        }
        for name in emptied {
            self.exchanges.remove(&name);
        }
    }

    /// Deletes every queue exclusive to a closing connection.
    pub(crate) fn delete_exclusive_queues(&mut self, conn: ConnId) {
        let owned: Vec<Arc<str>> = self
            .queues
            .values()
            .filter(|q| q.options.exclusive == Some(conn))
            .map(|q| q.name.clone())
            .collect();
        for name in owned {
            self.delete_queue(&name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mailbox::mailbox;
    use crate::message::{MessageBuilder, SHARED_BODY_MIN};
    use crate::queue::{Consumer, QueueOptions, Source};

    #[test]
    fn a_delivery_whose_connection_goes_before_the_lock_is_released_returns_to_its_queue() {
        let vhost = Vhost::new("/");
        let (tx, mut rx) = mailbox();
        let mut state = vhost.lock();
        let mut queue = Queue::new("jobs", QueueOptions::default(), None);
        queue.add_consumer(Consumer {
            source: Source::consumer("jobs".into(), "c".into()),
            conn: 1,
            channel: 1,
            no_ack: false,
            exclusive: false,
            prefetch: 0,
            in_flight: 0,
            channel_credit: Arc::default(),
            mailbox: tx,
        });
        state.queues.insert("jobs".into(), queue);
        let message = MessageBuilder::new("", "jobs", &[0, 0], 0).finish();
        assert!(state.publish(None, None, message, Instant::now()).is_ok());
        let queue = &state.queues["jobs"];
        assert_eq!((queue.ready_len(), queue.unacked), (0, 1), "dispatched");
        // The connection closes its mailbox (as its teardown does) while the lock is held.
        assert!(rx.close_and_drain().is_empty(), "nothing arrives early");
        drop(state);
        let state = vhost.lock();
        let queue = &state.queues["jobs"];
        assert_eq!(
            (queue.ready_len(), queue.unacked),
            (1, 0),
            "back in the queue"
        );
    }

    #[test]
    fn queues_that_keep_a_shared_body_share_one_copy_of_it() {
        let vhost = Vhost::new("/");
        let mut state = vhost.lock();
        let fanout = state.exchanges.get_mut("amq.fanout").expect("predeclared");
        for name in ["a", "b"] {
            fanout.bind(crate::exchange::Binding {
                queue: name.into(),
                routing_key: String::new(),
                arguments: FieldTable::default(),
            });
        }
        for name in ["a", "b"] {
            state
                .queues
                .insert(name.into(), Queue::new(name, QueueOptions::default(), None));
        }
        let read_buffer = bytes::Bytes::from(vec![5u8; 3 * SHARED_BODY_MIN]);
        let body = read_buffer.slice(SHARED_BODY_MIN..2 * SHARED_BODY_MIN);
        let message = Message::with_shared_body("amq.fanout", "", &[0, 0], body);
        assert!(message.is_pinning());
        assert!(state.publish(None, None, message, Instant::now()).is_ok());
        let now = Instant::now();
        let kept: Vec<_> = ["a", "b"]
            .map(|name| state.queues.get_mut(name).unwrap().get(now, true).unwrap())
            .into_iter()
            .collect();
        assert!(kept.iter().all(|m| !m.message.is_pinning()));
        assert_eq!(kept[0].message.body(), &read_buffer[..SHARED_BODY_MIN]);
        assert_eq!(
            kept[0].message.body().as_ptr(),
            kept[1].message.body().as_ptr(),
            "each queue made its own copy"
        );
    }
}
