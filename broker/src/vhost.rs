//! A virtual host: its queues and exchanges under one std mutex, held only briefly and never
//! across an `.await`. Every operation that touches more than one queue or a queue and its
//! consumers takes the lock once.

use crate::channel::Publication;
use crate::dead_letter::{dead_lettered, is_cycle};
use crate::direct_reply::{ADDRESS_PREFIX, ReplyConsumer};
use crate::exchange::{Destination, Exchange, RoutingKeys, builtin_exchanges, is_default, route};
use crate::limits::VhostLimits;
use crate::mailbox::{Outbound, Outbox};
use crate::message::{Message, QueuedMessage};
use crate::methods::queue::validate_arguments;
use crate::policy::{Policies, Policy, PolicyError, queue_args};
use crate::queue::{ConnId, Queue, Source};
use rustc_hash::{FxHashMap, FxHashSet};
use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};
use tokio::sync::Notify;
use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;

/// A virtual host.
#[derive(Debug)]
pub(crate) struct Vhost {
    /// Its name, e.g. `/`.
    pub(crate) name: String,
    /// A std mutex rather than tokio's: it is only held for in-memory work that never awaits,
    /// so it is never contended across a suspension point and is cheaper than an async lock.
    state: Mutex<VhostState>,
}

/// The queue a delivery came from, if it still exists: that very queue, not one declared
/// under its name since it was deleted (RabbitMQ drops what was in flight from a deleted
/// queue; the new one's messages and counts are its own).
pub(crate) fn source_queue<'a>(
    queues: &'a mut FxHashMap<Arc<str>, Queue>,
    source: &Source,
) -> Option<&'a mut Queue> {
    queues
        .get_mut(&source.queue)
        .filter(|q| Arc::ptr_eq(&q.name, &source.queue))
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
    /// The queues the expiry task looks at: those that dead-letter or can expire themselves.
    timed_queues: FxHashSet<Arc<str>>,
    /// When the expiry task next looks at the dead-lettering queues (`None`: it sleeps until
    /// woken).
    expiry_armed: Option<Instant>,
    /// Wakes the expiry task (see [`run_expiry`]).
    expiry_wake: Arc<Notify>,
    /// Its policies.
    pub(crate) policies: Policies,
    /// Its limits (`rabbitmqctl set_vhost_limits`).
    pub(crate) limits: VhostLimits,
}

/// Where a routed publish went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Routed {
    /// Every queue it was routed to took it.
    Enqueued,
    /// A queue refused it (`x-overflow` `reject-publish`): a publisher in confirm mode gets a
    /// nack.
    Refused,
}

impl Routed {
    fn of(all_took_it: bool) -> Self {
        if all_took_it {
            Self::Enqueued
        } else {
            Self::Refused
        }
    }
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
        // Flushing can put deliveries back (their connection went), whose dispatch can
        // dead-letter or arm an expiry in turn: round until nothing is left.
        loop {
            self.0.route_dead_letters();
            self.0.arm_expiry();
            self.0.flush_outbox();
            if self.0.outbox.dead_letters.is_empty() && self.0.outbox.expiry.is_none() {
                return;
            }
        }
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
                timed_queues: FxHashSet::default(),
                expiry_armed: None,
                expiry_wake: Arc::new(Notify::new()),
                policies: Policies::default(),
                limits: VhostLimits::default(),
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
    /// Sets a policy (replacing one of the same name) and applies it to the queues and
    /// exchanges it now governs.
    pub(crate) fn set_policy(&mut self, policy: Policy) -> Result<(), PolicyError> {
        self.policies.set(policy)?;
        self.apply_policies();
        Ok(())
    }

    /// Clears a policy; what it governed goes back to its own arguments (or to the next
    /// policy that matches).
    pub(crate) fn clear_policy(&mut self, name: &str) -> Result<(), PolicyError> {
        self.policies.clear(name)?;
        self.apply_policies();
        Ok(())
    }

    /// Gives every queue and exchange whose policy changed its new behaviour.
    fn apply_policies(&mut self) {
        let now = Instant::now();
        let VhostState {
            queues,
            exchanges,
            outbox,
            timed_queues,
            policies,
            ..
        } = self;
        for queue in queues.values_mut() {
            let policy = policies.for_queue(&queue.name).cloned();
            // A policy set again as it was changes nothing (its `expires` clock goes on).
            if policy == queue.policy {
                continue;
            }
            // RabbitMQ applies a new length limit under the overflow the queue had until now,
            // then the new overflow: either one being drop-head drops the head at once.
            let overflow_until_now = queue.overflow();
            // Checked when the queue was declared: only the vhost's name, in error texts, is
            // missing here.
            let declared =
                validate_arguments(&queue.options.arguments, &queue.name, "").unwrap_or_default();
            let args = queue_args(
                declared,
                &queue.options.arguments,
                policy.as_deref().map(|p| &p.definition),
            );
            queue.reconfigure(args, policy, overflow_until_now, now, outbox);
            if queue.has_timers() {
                timed_queues.insert(queue.name.clone());
            } else {
                timed_queues.remove(&queue.name);
            }
        }
        for (name, exchange) in exchanges.iter_mut().filter(|(name, _)| !is_default(name)) {
            exchange.policy_alternate = policies
                .for_exchange(name)
                .and_then(|p| p.definition.alternate_exchange.clone());
        }
    }

    /// Adds a new queue.
    pub(crate) fn insert_queue(&mut self, queue: Queue) {
        if queue.has_timers() {
            self.timed_queues.insert(queue.name.clone());
        }
        self.queues.insert(queue.name.clone(), queue);
    }

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
                    && let Some(q) = source_queue(&mut self.queues, &source)
                {
                    q.undo_dispatch(&source, no_ack, message);
                    q.dispatch(now, &mut self.outbox);
                }
            }
        }
    }

    /// Publishes the dead letters gathered in the outbox to their dead-letter exchanges (those
    /// whose exchange is gone, or that route nowhere, are dropped, as in RabbitMQ). Publishing
    /// them can expire others: it goes on until none is left, which cycle detection bounds.
    fn route_dead_letters(&mut self) {
        if self.outbox.dead_letters.is_empty() {
            return;
        }
        let now = Instant::now();
        let secs = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        while !self.outbox.dead_letters.is_empty() {
            for letter in std::mem::take(&mut self.outbox.dead_letters) {
                let Some((message, publication)) = dead_lettered(&letter, secs) else {
                    continue;
                };
                let reason = letter.reason;
                let _ = self.publish_except(&publication, message, now, |queue| {
                    publication
                        .headers
                        .as_ref()
                        .is_some_and(|headers| is_cycle(reason, headers, queue))
                });
            }
        }
    }

    /// Wakes the expiry task if a dead-lettering queue's head now expires before it would
    /// next look.
    fn arm_expiry(&mut self) {
        let Some(at) = self.outbox.expiry.take() else {
            return;
        };
        if self.expiry_armed.is_none_or(|armed| at < armed) {
            self.expiry_armed = Some(at);
            self.expiry_wake.notify_one();
        }
    }

    /// Dead-letters the expired head messages of every dead-lettering queue, and deletes the
    /// queues unused for their `x-expires`; returns when the next of either is due.
    fn expire_due(&mut self, now: Instant) -> Option<Instant> {
        let VhostState {
            queues,
            outbox,
            timed_queues,
            ..
        } = self;
        let mut next: Option<Instant> = None;
        let mut unused = Vec::new();
        for name in timed_queues.iter() {
            let Some(queue) = queues.get_mut(name) else {
                continue;
            };
            let head = queue.expire(now, outbox);
            let deadline = queue.unused_deadline();
            if deadline.is_some_and(|at| at <= now) {
                unused.push(queue.name.clone());
                continue;
            }
            for at in [head, deadline].into_iter().flatten() {
                next = Some(next.map_or(at, |n| n.min(at)));
            }
        }
        for name in unused {
            self.delete_queue(&name);
        }
        // What this pass dead-letters may arm an earlier expiry (through the outbox) when the
        // lock is released.
        self.expiry_armed = next;
        next
    }

    /// Routes a message from its exchange (which must exist), by its routing key, its `CC` and
    /// `BCC` keys and its headers, and enqueues it, with its `expiration` counted from `now`;
    /// gives it back if it routes to no queue.
    pub(crate) fn publish(
        &mut self,
        publication: &Publication,
        message: Message,
        now: Instant,
    ) -> Result<Routed, Message> {
        self.publish_except(publication, message, now, |_| false)
    }

    /// [`Self::publish`], skipping the queues `skip` names (a dead letter's cycles).
    fn publish_except(
        &mut self,
        publication: &Publication,
        mut message: Message,
        now: Instant,
        skip: impl Fn(&str) -> bool,
    ) -> Result<Routed, Message> {
        let expires_at = publication.ttl.map(|ms| now + Duration::from_millis(ms));
        let keys = RoutingKeys {
            own: message.routing_key(),
            extra: &publication.extra_routing_keys,
        };
        // The queues the default exchange routes `CC` or `BCC` keys to (owned: `targets`
        // borrows them while the queues are changed).
        let named: Vec<Arc<str>>;
        let mut targets = if is_default(message.exchange()) {
            if keys.extra.is_empty() {
                let routing_key = keys.own;
                if routing_key.starts_with(ADDRESS_PREFIX) {
                    return self.reply(message).map(|()| Routed::Enqueued);
                }
                return match self.queues.get_mut(routing_key) {
                    Some(queue) if !skip(&queue.name) => Ok(Routed::of(queue.publish(
                        message,
                        expires_at,
                        publication.priority,
                        now,
                        &mut self.outbox,
                    ))),
                    _ => Err(message),
                };
            }
            named = keys
                .all()
                .filter_map(|key| self.queues.get_key_value(key).map(|(name, _)| name.clone()))
                .collect();
            named.iter().collect()
        } else {
            route(
                &self.exchanges,
                message.exchange(),
                keys,
                publication.headers.as_ref(),
            )
        };
        // Whether a target has no consumer, so would keep the message in a buffer of its own
        // (`Queue::keep`).
        let mut one_would_copy = false;
        targets.retain(|name| match self.queues.get(&***name) {
            Some(queue) if !skip(name) => {
                one_would_copy |= queue.consumer_count() == 0;
                true
            }
            _ => false,
        });
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
        let mut all_took_it = true;
        for name in targets {
            if let Some(queue) = self.queues.get_mut(name) {
                all_took_it &= queue.publish(
                    message.clone(),
                    expires_at,
                    publication.priority,
                    now,
                    &mut self.outbox,
                );
            }
        }
        if let Some(queue) = self.queues.get_mut(last) {
            all_took_it &= queue.publish(
                message,
                expires_at,
                publication.priority,
                now,
                &mut self.outbox,
            );
        }
        Ok(Routed::of(all_took_it))
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
                deliveries: 0,
                priority: 0,
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
        self.timed_queues.remove(name);
        self.remove_bindings_to(&Destination::Queue(queue.name.clone()));
        let count = queue.ready_len() as u32;
        for consumer in queue.take_consumers() {
            self.outbox.send(
                &consumer.mailbox,
                Outbound::Cancel {
                    channel: consumer.channel,
                    source: consumer.source.clone(),
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

    /// Removes every binding to a deleted queue or exchange; auto-delete exchanges left
    /// without bindings go too.
    pub(crate) fn remove_bindings_to(&mut self, destination: &Destination) {
        for name in self.unbind_all(destination) {
            self.delete_exchange(&name);
        }
    }

    /// Removes every binding to `destination`; returns the auto-delete exchanges it emptied.
    fn unbind_all(&mut self, destination: &Destination) -> Vec<String> {
        let mut emptied = Vec::new();
        for (name, exchange) in self.exchanges.iter_mut() {
            let before = exchange.bindings.len();
            exchange.bindings.retain(|b| &b.destination != destination);
            if exchange.auto_delete && before > 0 && exchange.bindings.is_empty() {
                emptied.push(name.clone());
            }
        }
        emptied
    }

    /// Deletes an exchange and every binding to it, and so on for the auto-delete exchanges
    /// that loses their last binding (a loop, not a recursion: a client can chain thousands).
    pub(crate) fn delete_exchange(&mut self, name: &str) {
        let mut doomed = vec![name.to_owned()];
        while let Some(name) = doomed.pop() {
            if self.exchanges.remove(&name).is_some() {
                doomed.extend(self.unbind_all(&Destination::Exchange(name.as_str().into())));
            }
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

/// How long the expiry task sleeps with no deadline ahead; a lock hold that arms one wakes it
/// at once, so this only bounds how long it can oversleep a deadline nobody armed.
const IDLE_EXPIRY_WAKE: Duration = Duration::from_secs(3600);

/// Dead-letters messages when they expire at the head of a dead-lettering queue, whether or
/// not anything else touches the queue (a queue of delayed retries has no consumer), and
/// deletes queues left unused for their `x-expires`. One task per vhost, asleep until the
/// earliest such deadline or until a lock hold arms an earlier one.
pub(crate) async fn run_expiry(vhost: Arc<Vhost>, shutdown: CancellationToken) {
    let wake = vhost.lock().expiry_wake.clone();
    loop {
        let next = vhost.lock().expire_due(Instant::now());
        let sleep = sleep_until(next.unwrap_or_else(|| Instant::now() + IDLE_EXPIRY_WAKE));
        tokio::select! {
            _ = sleep => {}
            _ = wake.notified() => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mailbox::mailbox;
    use crate::message::{MessageBuilder, SHARED_BODY_MIN};
    use crate::queue::{Consumer, QueueOptions, Source};
    use amq_protocol::types::FieldTable;

    #[test]
    fn a_delivery_whose_connection_goes_before_the_lock_is_released_returns_to_its_queue() {
        let vhost = Vhost::new("/");
        let (tx, mut rx) = mailbox();
        let mut state = vhost.lock();
        let mut queue = Queue::new("jobs", QueueOptions::default(), Default::default());
        queue.add_consumer(Consumer {
            source: Source::consumer(queue.name.clone(), "c".into(), Arc::default()),
            conn: 1,
            channel: 1,
            no_ack: false,
            exclusive: false,
            priority: 0,
            prefetch: 0,
            in_flight: 0,
            mailbox: tx,
        });
        state.queues.insert(queue.name.clone(), queue);
        let message = MessageBuilder::new("", "jobs", &[0, 0], 0).finish();
        assert!(
            state
                .publish(&Publication::default(), message, Instant::now())
                .is_ok()
        );
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
    fn a_policy_set_again_as_it_was_leaves_its_queues_alone() {
        let vhost = Vhost::new("/");
        let mut state = vhost.lock();
        state.insert_queue(Queue::new("q", QueueOptions::default(), Default::default()));
        let policy = crate::policy::Policy::new("p", "^q$").expires(60_000);
        state.set_policy(policy.clone()).unwrap();
        let applied = state.queues.get("q").unwrap().policy.clone().unwrap();
        state.set_policy(policy).unwrap();
        // Not reconfigured: its `expires` clock was not restarted.
        assert!(Arc::ptr_eq(
            state.queues.get("q").unwrap().policy.as_ref().unwrap(),
            &applied
        ));
        state
            .set_policy(crate::policy::Policy::new("p", "^q$").expires(30_000))
            .unwrap();
        assert!(!Arc::ptr_eq(
            state.queues.get("q").unwrap().policy.as_ref().unwrap(),
            &applied
        ));
    }

    #[test]
    fn a_long_chain_of_auto_delete_exchanges_goes_with_its_queue_without_recursing() {
        // On a small stack, where a recursion per link would overflow.
        let chain = std::thread::Builder::new()
            .stack_size(256 * 1024)
            .spawn(|| {
                let vhost = Vhost::new("/");
                let mut state = vhost.lock();
                let links = 5_000;
                for i in 0..links {
                    let mut exchange = Exchange::declared(
                        crate::exchange::ExchangeKind::Fanout,
                        false,
                        true,
                        false,
                        FieldTable::default(),
                    );
                    exchange.bind(crate::exchange::Binding {
                        destination: if i + 1 < links {
                            Destination::Exchange(format!("x{}", i + 1).into())
                        } else {
                            Destination::Queue("end".into())
                        },
                        routing_key: String::new(),
                        arguments: FieldTable::default(),
                    });
                    state.exchanges.insert(format!("x{i}"), exchange);
                }
                state.insert_queue(Queue::new(
                    "end",
                    QueueOptions::default(),
                    Default::default(),
                ));
                assert_eq!(state.delete_queue("end"), Some(0));
                (0..links).all(|i| !state.exchanges.contains_key(&format!("x{i}")))
            })
            .expect("a thread");
        assert!(chain.join().expect("no overflow"), "every link went");
    }

    #[test]
    fn queues_that_keep_a_shared_body_share_one_copy_of_it() {
        let vhost = Vhost::new("/");
        let mut state = vhost.lock();
        let fanout = state.exchanges.get_mut("amq.fanout").expect("predeclared");
        for name in ["a", "b"] {
            fanout.bind(crate::exchange::Binding {
                destination: Destination::Queue(name.into()),
                routing_key: String::new(),
                arguments: FieldTable::default(),
            });
        }
        for name in ["a", "b"] {
            state.queues.insert(
                name.into(),
                Queue::new(name, QueueOptions::default(), Default::default()),
            );
        }
        let read_buffer = bytes::Bytes::from(vec![5u8; 3 * SHARED_BODY_MIN]);
        let body = read_buffer.slice(SHARED_BODY_MIN..2 * SHARED_BODY_MIN);
        let message = Message::with_shared_body("amq.fanout", "", &[0, 0], body);
        assert!(message.is_pinning());
        assert!(
            state
                .publish(&Publication::default(), message, Instant::now())
                .is_ok()
        );
        let now = Instant::now();
        let kept: Vec<_> = ["a", "b"]
            .map(|name| {
                let state = &mut *state;
                let queue = state.queues.get_mut(name).unwrap();
                queue.get(now, true, &mut state.outbox).unwrap()
            })
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
