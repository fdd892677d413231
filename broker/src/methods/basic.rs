//! The basic class: qos, consume, cancel, publish, get, ack, nack, reject, recover; and the
//! two directions of content: completing a publish and writing a delivery.

use super::Resource;
use super::exchange::exchange_resource;
use super::queue::{generated_tag, integer_arg, queue_resource, usable_queue};
use crate::channel::{Assembly, ChannelConsumer, Publication, Settle, SettleCount, Unacked};
use crate::codec;
use crate::connection::Connection;
use crate::connection::teardown::{dispatch_all, requeue};
use crate::dead_letter::DeathReason;
use crate::direct_reply::{PSEUDO_QUEUE, ReplyConsumer, new_address};
use crate::error::{AmqpError, AmqpResult};
use crate::message::{Message, QueuedMessage, encode_properties, parse_expiration};
use crate::permissions::Access;
use crate::queue::{Consumer, ConsumerTag, Return, Source};
use crate::sender_selected::header_routes;
use crate::vhost::{Routed, VhostState, source_queue};
use amq_protocol::protocol::{AMQPClass, BasicProperties, basic};
use amq_protocol::types::ShortString;
use rustc_hash::{FxHashMap, FxHashSet};
use std::borrow::Cow;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use tokio::time::Instant;

/// The most sources (queue and consumer) [`Connection::settle_counts`] keeps between acks (about
/// 100 KB; an ack spanning 1,000 queues, as in the bench's scale rows, fits).
const SETTLE_COUNTS_KEPT: usize = 4096;
/// The most entries [`Connection::settled_messages`] keeps between acks.
const SETTLED_MESSAGES_KEPT: usize = 4096;
/// Most publishes staged before they are routed (see [`Connection::staged`]), which bounds how
/// long one hold of the vhost lock lasts. 1,024 measured no better (BENCHMARKS.md, session 5).
const MAX_STAGED: usize = 256;

/// A short string from a message's exchange or routing key (which were short strings).
fn short(text: &str) -> ShortString {
    crate::error::short_string_lossy(text)
}

/// Adds a run of settled deliveries to the counts per source.
fn add_count(counts: &mut FxHashMap<usize, SettleCount>, key: usize, count: SettleCount) {
    counts
        .entry(key)
        .and_modify(|c| c.1 += count.1)
        .or_insert(count);
}

/// Drops settled messages, outside the vhost lock. The heap buffers of those not kept inline
/// were allocated long ago and (with many queues and connections) far apart, so each free
/// would wait for a cache miss in turn: reading a byte of each first lets those misses overlap.
fn free_settled(messages: &mut Vec<Message>) {
    let sum = messages.iter().fold(0u8, |sum, m| sum ^ m.first_byte());
    std::hint::black_box(sum);
    messages.clear();
    if messages.capacity() > SETTLED_MESSAGES_KEPT {
        *messages = Vec::new();
    }
}

fn send_basic(conn: &mut Connection, ch: u16, method: basic::AMQPMethod) {
    conn.send(ch, AMQPClass::Basic(method));
}

/// RabbitMQ's refusal of a publish to `exchange` itself: 404 when it does not exist, 403 when
/// it is internal. The default exchange always exists and is not internal: no lookup.
pub(crate) fn check_publish_exchange(
    state: &VhostState,
    vhost: &str,
    exchange: &str,
) -> AmqpResult {
    if exchange.is_empty() {
        return Ok(());
    }
    match state.exchanges.get(exchange) {
        None => Err(AmqpError::not_found(format!(
            "no {}",
            exchange_resource(exchange, vhost)
        ))),
        Some(e) if e.internal => Err(AmqpError::access_refused(format!(
            "cannot publish to internal {}",
            exchange_resource(exchange, vhost)
        ))),
        Some(_) => Ok(()),
    }
}

impl Connection {
    pub(crate) fn basic_class(&mut self, ch: u16, method: basic::AMQPMethod) -> AmqpResult {
        match method {
            basic::AMQPMethod::Qos(m) => self.basic_qos(ch, m),
            basic::AMQPMethod::Consume(m) => self.basic_consume(ch, m),
            basic::AMQPMethod::Cancel(m) => self.basic_cancel(ch, m),
            basic::AMQPMethod::Publish(m) => {
                if m.immediate {
                    return Err(AmqpError::not_implemented("immediate=true"));
                }
                // Write permission is checked with the content header, after its size.
                self.channel_mut(ch).assembly = Assembly::Header(m);
                self.publish_received();
                Ok(())
            }
            basic::AMQPMethod::Get(m) => self.basic_get(ch, m),
            basic::AMQPMethod::Ack(m) => self.settle(ch, m.delivery_tag, m.multiple, Settle::Ack),
            basic::AMQPMethod::Nack(m) => self.settle(
                ch,
                m.delivery_tag,
                m.multiple,
                Settle::Reject { requeue: m.requeue },
            ),
            basic::AMQPMethod::Reject(m) => self.settle(
                ch,
                m.delivery_tag,
                false,
                Settle::Reject { requeue: m.requeue },
            ),
            basic::AMQPMethod::Recover(m) => {
                self.basic_recover(ch, m.requeue)?;
                send_basic(self, ch, basic::AMQPMethod::RecoverOk(basic::RecoverOk {}));
                Ok(())
            }
            basic::AMQPMethod::RecoverAsync(m) => self.basic_recover(ch, m.requeue),
            _ => Err(AmqpError::server_method()),
        }
    }

    fn basic_qos(&mut self, ch: u16, m: basic::Qos) -> AmqpResult {
        let channel = self.channel_mut(ch);
        if m.global {
            channel
                .credit
                .limit
                .store(m.prefetch_count as u32, Ordering::Relaxed);
        } else {
            channel.consumer_prefetch = m.prefetch_count as u32;
        }
        send_basic(self, ch, basic::AMQPMethod::QosOk(basic::QosOk {}));
        if m.global {
            // A larger window may let waiting messages through.
            let queues: FxHashSet<Arc<str>> = self
                .channel_mut(ch)
                .consumers
                .values()
                .map(|c| c.queue().clone())
                .collect();
            dispatch_all(&mut self.vhost.lock(), queues);
        }
        Ok(())
    }

    fn basic_consume(&mut self, ch: u16, m: basic::Consume) -> AmqpResult {
        let queue_name = self.expand_queue_name(ch, m.queue)?;
        let tag: ConsumerTag = if m.consumer_tag.as_str().is_empty() {
            generated_tag().into()
        } else {
            m.consumer_tag.as_str().into()
        };
        let (prefetch, credit) = {
            let channel = self.channel_mut(ch);
            if channel.consumers.contains_key(&*tag) {
                return Err(AmqpError::not_allowed(format!(
                    "attempt to reuse consumer tag '{tag}'"
                )));
            }
            (channel.consumer_prefetch, channel.credit.clone())
        };
        if queue_name.as_str() == PSEUDO_QUEUE {
            return self.consume_replies(ch, tag, m.no_ack, m.nowait);
        }
        self.check_access(Access::Read, Resource::Queue, queue_name.as_str())?;
        let vhost_name = self.vhost.name.clone();
        let mailbox = self.mailbox.clone();
        let vhost = self.vhost.clone();
        let mut state = vhost.lock();
        let queue = usable_queue(&mut state.queues, queue_name.as_str(), self.id, &vhost_name)?;
        // x-priority (0 without): its queue delivers to its highest-priority consumers first.
        let resource = queue_resource(queue_name.as_str(), &vhost_name);
        let priority = integer_arg(&m.arguments, "x-priority", &resource)?.unwrap_or(0);
        if queue.quorum().is_some() && credit.limit.load(Ordering::Relaxed) > 0 {
            return Err(AmqpError::not_implemented(format!(
                "{resource} does not support global qos"
            )));
        }
        if queue.has_exclusive_consumer() || (m.exclusive && queue.consumer_count() > 0) {
            return Err(AmqpError::access_refused(format!(
                "queue '{queue_name}' in vhost '{vhost_name}' in exclusive use"
            )));
        }
        // consume-ok goes out before any delivery: deliveries reach the output only through
        // the mailbox, which is read after this handler returns.
        if !m.nowait {
            send_basic(
                self,
                ch,
                basic::AMQPMethod::ConsumeOk(basic::ConsumeOk {
                    consumer_tag: short(&tag),
                }),
            );
        }
        let queue = state
            .queues
            .get_mut(queue_name.as_str())
            .expect("found above");
        let source = Source::consumer(queue.name.clone(), tag.clone(), credit);
        queue.add_consumer(Consumer {
            source: source.clone(),
            conn: self.id,
            channel: ch,
            no_ack: m.no_ack,
            exclusive: m.exclusive,
            priority,
            prefetch,
            in_flight: 0,
            mailbox,
        });
        state.dispatch(&source.queue, Instant::now());
        drop(state);
        self.channel_mut(ch)
            .consumers
            .insert(tag, ChannelConsumer { source });
        Ok(())
    }

    /// basic.consume on `amq.rabbitmq.reply-to`: direct replies to this channel.
    fn consume_replies(
        &mut self,
        ch: u16,
        tag: ConsumerTag,
        no_ack: bool,
        nowait: bool,
    ) -> AmqpResult {
        if !no_ack {
            return Err(AmqpError::precondition_failed(
                "reply consumer cannot acknowledge",
            ));
        }
        if self.channel_mut(ch).reply_address.is_some() {
            return Err(AmqpError::precondition_failed("reply consumer already set"));
        }
        let address = new_address();
        // No-ack: never charged to the window.
        let source = Source::consumer(PSEUDO_QUEUE.into(), tag.clone(), Arc::default());
        self.vhost.lock().reply_consumers.insert(
            address.clone(),
            ReplyConsumer {
                mailbox: self.mailbox.clone(),
                channel: ch,
                source: source.clone(),
            },
        );
        let channel = self.channel_mut(ch);
        channel.reply_address = Some(address);
        channel
            .consumers
            .insert(tag.clone(), ChannelConsumer { source });
        if !nowait {
            send_basic(
                self,
                ch,
                basic::AMQPMethod::ConsumeOk(basic::ConsumeOk {
                    consumer_tag: short(&tag),
                }),
            );
        }
        Ok(())
    }

    fn basic_cancel(&mut self, ch: u16, m: basic::Cancel) -> AmqpResult {
        if let Some(consumer) = self
            .channel_mut(ch)
            .consumers
            .remove(m.consumer_tag.as_str())
        {
            let vhost = self.vhost.clone();
            let mut state = vhost.lock();
            self.detach_consumer(&mut state, ch, m.consumer_tag.as_str(), &consumer);
            // A waiting consumer may take over (single active consumer).
            state.dispatch(consumer.queue(), Instant::now());
        }
        if !m.nowait {
            send_basic(
                self,
                ch,
                basic::AMQPMethod::CancelOk(basic::CancelOk {
                    consumer_tag: m.consumer_tag,
                }),
            );
        }
        Ok(())
    }

    fn basic_get(&mut self, ch: u16, m: basic::Get) -> AmqpResult {
        let queue_name = self.expand_queue_name(ch, m.queue)?;
        self.check_access(Access::Read, Resource::Queue, queue_name.as_str())?;
        let vhost_name = self.vhost.name.clone();
        let mut state = self.vhost.lock();
        let VhostState { queues, outbox, .. } = &mut *state;
        let queue = usable_queue(queues, queue_name.as_str(), self.id, &vhost_name)?;
        let now = Instant::now();
        let taken = queue.get(now, m.no_ack, outbox);
        let remaining = queue.message_count(now, outbox);
        queue.touch(now, outbox);
        let source = queue.get_source();
        drop(state);
        let Some(message) = taken else {
            send_basic(self, ch, basic::AMQPMethod::GetEmpty(basic::GetEmpty {}));
            return Ok(());
        };
        let channel = self.channel_mut(ch);
        let delivery_tag = channel.next_delivery_tag;
        channel.next_delivery_tag += 1;
        send_basic(
            self,
            ch,
            basic::AMQPMethod::GetOk(basic::GetOk {
                delivery_tag,
                redelivered: message.redelivered,
                exchange: short(message.message.exchange()),
                routing_key: short(message.message.routing_key()),
                message_count: remaining,
            }),
        );
        self.write_content(ch, &message.message);
        if !m.no_ack {
            let clock = self.clock;
            self.channel_mut(ch)
                .unacked
                .insert(delivery_tag, Unacked { source, message }, clock);
        }
        Ok(())
    }

    fn settle(&mut self, ch: u16, tag: u64, multiple: bool, how: Settle) -> AmqpResult {
        // The channel's unacked deliveries are moved out while the ones taken are settled, so
        // settling them can borrow the connection; they go back whatever happens.
        let mut unacked = std::mem::take(&mut self.channel_mut(ch).unacked);
        let outcome = match unacked.take(tag, multiple) {
            None => Err(AmqpError::precondition_failed(format!(
                "unknown delivery tag {tag}"
            ))),
            Some(taken) => {
                match &mut self.channel_mut(ch).tx {
                    Some(tx) => tx.settles.push((taken.collect(), how)),
                    None => self.apply_settle(ch, taken, how),
                }
                Ok(())
            }
        };
        self.channel_mut(ch).unacked = unacked;
        outcome
    }

    /// Acks, rejects or requeues deliveries taken from the unacked ones.
    pub(crate) fn apply_settle(
        &mut self,
        ch: u16,
        settled: impl IntoIterator<Item = (u64, Unacked)>,
        how: Settle,
    ) {
        let credit = self.channel_mut(ch).credit.clone();
        let mut state = self.vhost.lock();
        let mut touched = FxHashSet::default();
        let conn = self.id;
        // Acked (or dropped) deliveries are counted per source (queue and consumer), told apart
        // by its address, and each queue settles its count in one step: a multiple ack over
        // deliveries from many queues then costs one queue lookup per queue, not per message.
        // Kept between acks (cleared), so an ack over many queues does not grow a new table.
        let mut counts = std::mem::take(&mut self.settle_counts);
        let mut run: Option<(usize, SettleCount)> = None;
        let mut released = 0;
        let mut settled_messages = std::mem::take(&mut self.settled_messages);
        for (_, u) in settled {
            let source = u.source;
            if source.consumer_tag.is_some() {
                released += 1;
            }
            match how {
                Settle::Reject { requeue: true } => {
                    requeue(&mut state, &source, conn, ch, u.message, Return::Requeued);
                    touched.insert(source.queue.clone());
                    continue;
                }
                Settle::Reject { requeue: false } => {
                    let state = &mut *state;
                    match source_queue(&mut state.queues, &source) {
                        Some(q) if q.has_dead_letter_exchange() => q.dead_letter(
                            u.message.message,
                            DeathReason::Rejected,
                            &mut state.outbox,
                        ),
                        _ => settled_messages.push(u.message.message),
                    }
                }
                Settle::Ack => settled_messages.push(u.message.message),
            }
            let key = Arc::as_ptr(&source) as usize;
            // Consecutive deliveries from one source (the usual case) are counted without a
            // table lookup each.
            match &mut run {
                Some((k, count)) if *k == key => count.1 += 1,
                _ => {
                    if let Some((k, count)) = run.replace((key, (source, 1))) {
                        add_count(&mut counts, k, count);
                    }
                }
            }
        }
        if let Some((k, count)) = run {
            add_count(&mut counts, k, count);
        }
        credit.release_many(released);
        // Each queue settles and dispatches with one lookup.
        let now = Instant::now();
        let VhostState { queues, outbox, .. } = &mut *state;
        for (_, (source, n)) in counts.drain() {
            if let Some(q) = source_queue(queues, &source) {
                q.settle(conn, ch, &source, n);
                q.dispatch(now, outbox);
            }
        }
        // Kept unless an ack over very many queues grew it.
        if counts.capacity() <= SETTLE_COUNTS_KEPT {
            self.settle_counts = counts;
        }
        // Credit freed in a channel-wide window may serve any queue the channel consumes from.
        if credit.limit.load(Ordering::Relaxed) != 0
            && let Some(channel) = self.channels.get(&ch)
        {
            touched.extend(channel.consumers.values().map(|c| c.queue().clone()));
        }
        dispatch_all(&mut state, touched);
        drop(state);
        free_settled(&mut settled_messages);
        self.settled_messages = settled_messages;
    }

    fn basic_recover(&mut self, ch: u16, requeue_them: bool) -> AmqpResult {
        if !requeue_them {
            return Err(AmqpError::not_implemented("requeue=false"));
        }
        // Every unacknowledged delivery goes back, flagged redelivered: a reject with requeue.
        let unacked = self.channel_mut(ch).unacked.take_all();
        self.apply_settle(ch, unacked, Settle::Reject { requeue: true });
        Ok(())
    }

    /// Checks a content header's properties as RabbitMQ does (user_id, expiration, `CC` and
    /// `BCC`), rewrites a direct reply-to `reply_to` and removes `BCC`; returns what routing
    /// needs and the property bytes to keep.
    pub(crate) fn prepare_content<'a>(
        &mut self,
        ch: u16,
        properties: &BasicProperties,
        raw_properties: Cow<'a, [u8]>,
    ) -> AmqpResult<(Publication, Cow<'a, [u8]>)> {
        // In RabbitMQ's order: direct reply-to without its consumer, user_id, expiration.
        let reply_address = match properties.reply_to() {
            Some(reply_to) if reply_to.as_str() == PSEUDO_QUEUE => {
                let Some(address) = self.channel_mut(ch).reply_address.clone() else {
                    return Err(AmqpError::precondition_failed(
                        "fast reply consumer does not exist",
                    ));
                };
                Some(address)
            }
            _ => None,
        };
        if let Some(user_id) = properties.user_id()
            && user_id.as_str() != self.tuning.user
            && !self.tuning.grants.impersonator
        {
            return Err(AmqpError::precondition_failed(format!(
                "user_id property set to '{user_id}' but authenticated user was '{}'",
                self.tuning.user
            )));
        }
        let ttl = match properties.expiration() {
            Some(expiration) => Some(
                parse_expiration(expiration.as_str()).map_err(AmqpError::precondition_failed)?,
            ),
            None => None,
        };
        let routes = header_routes(properties.headers().as_ref())?;
        // Properties the broker changes (a direct reply-to address, no `BCC`) are encoded
        // again; the others are kept as received.
        let mut changed: Option<BasicProperties> = reply_address.map(|address| {
            let address = ShortString::try_new(address).expect("address is short");
            properties.clone().with_reply_to(address)
        });
        let headers = match routes.without_bcc {
            Some(headers) => {
                let base = changed.unwrap_or_else(|| properties.clone());
                changed = Some(base.with_headers(headers.clone()));
                Some(headers)
            }
            None => properties.headers().clone(),
        };
        let raw_properties = match changed {
            Some(changed) => Cow::Owned(encode_properties(&changed)),
            None => raw_properties,
        };
        let publication = Publication {
            mandatory: false,
            headers,
            extra_routing_keys: routes.keys,
            bcc_count: routes.bcc_count,
            ttl,
            priority: properties.priority().unwrap_or(0),
        };
        Ok((publication, raw_properties))
    }

    /// Takes a fully assembled publish: stages it for routing (see [`Connection::staged`]), or
    /// keeps it for tx.commit.
    pub(crate) fn publish(
        &mut self,
        ch: u16,
        publication: Publication,
        message: Message,
    ) -> AmqpResult {
        if let Some(tx) = &mut self.channel_mut(ch).tx {
            tx.publishes.push((publication, message));
            return Ok(());
        }
        self.staged.push((ch, publication, message));
        if self.staged.len() >= MAX_STAGED {
            self.route_staged();
        }
        Ok(())
    }

    /// Routes the staged publishes, in order, under one hold of the vhost lock. A publish that
    /// fails (no such exchange, or an internal one) closes its channel; the channel's later
    /// publishes are dropped, as frames on a closing channel are.
    pub(crate) fn route_staged(&mut self) {
        if self.staged.is_empty() {
            return;
        }
        let mut staged = std::mem::take(&mut self.staged);
        let vhost = self.vhost.clone();
        let mut state = vhost.lock();
        // One clock read for the batch (TTLs count in milliseconds; a clock read per publish
        // was 3.5% of the broker's time).
        let mut now = Instant::now();
        for (ch, publication, message) in staged.drain(..) {
            if self.open_channel(ch).is_none() {
                continue;
            }
            if let Err(e) = self.route_locked(&mut state, now, ch, publication, message) {
                self.pacing.fed(state.outbox.spread());
                drop(state);
                self.fail(ch, e.during_ids(60, 40));
                state = vhost.lock();
                now = Instant::now();
            }
        }
        self.pacing.fed(state.outbox.spread());
        drop(state);
        self.staged = staged;
    }

    /// Routes a publish at tx.commit, then answers it (basic.return, confirm).
    pub(crate) fn route(
        &mut self,
        ch: u16,
        publication: Publication,
        message: Message,
    ) -> AmqpResult {
        let vhost = self.vhost.clone();
        let mut state = vhost.lock();
        self.route_locked(&mut state, Instant::now(), ch, publication, message)
    }

    /// Routes a publish under the vhost lock at `now`, then answers it (basic.return, confirm).
    fn route_locked(
        &mut self,
        state: &mut VhostState,
        now: Instant,
        ch: u16,
        publication: Publication,
        message: Message,
    ) -> AmqpResult {
        check_publish_exchange(state, &self.vhost.name, message.exchange())?;
        let routed = state.publish(&publication, message, now);
        let refused = matches!(routed, Ok(Routed::Refused));
        if let Err(message) = routed
            && publication.mandatory
        {
            send_basic(
                self,
                ch,
                basic::AMQPMethod::Return(basic::Return {
                    reply_code: 312,
                    reply_text: "NO_ROUTE".into(),
                    exchange: short(message.exchange()),
                    routing_key: short(message.routing_key()),
                }),
            );
            self.write_content(ch, &message);
        }
        let channel = self.channel_mut(ch);
        if let Some(seq) = channel.next_confirm {
            channel.next_confirm = Some(seq + 1);
            if refused {
                // The acks due before it go first, so confirms stay in order.
                self.flush_confirms_of(ch);
                self.send(
                    ch,
                    AMQPClass::Basic(basic::AMQPMethod::Nack(basic::Nack {
                        delivery_tag: seq,
                        multiple: false,
                        requeue: false,
                    })),
                );
                return Ok(());
            }
            // Confirmed once the frames read in this batch are handled: one ack with
            // `multiple` covers a run of publishes (as RabbitMQ batches them).
            if channel.confirm_due.is_none() {
                self.confirms_due.push(ch);
            }
            let channel = self.channel_mut(ch);
            channel.confirm_due = Some(match channel.confirm_due {
                Some((first, _)) => (first, seq),
                None => (seq, seq),
            });
        }
        Ok(())
    }

    /// Sends the publisher confirms due on every channel.
    pub(crate) fn flush_confirms(&mut self) {
        for ch in std::mem::take(&mut self.confirms_due) {
            self.flush_confirms_of(ch);
        }
    }

    /// Sends the publisher confirms due on one channel.
    pub(crate) fn flush_confirms_of(&mut self, ch: u16) {
        let Some((first, last)) = self
            .channels
            .get_mut(&ch)
            .and_then(|c| c.confirm_due.take())
        else {
            return;
        };
        let multiple = last > first;
        self.trace_sent(ch, || {
            AMQPClass::Basic(basic::AMQPMethod::Ack(basic::Ack {
                delivery_tag: last,
                multiple,
            }))
        });
        codec::write_ack(&mut self.out.bytes, ch, last, multiple);
    }

    /// Writes a delivery from the mailbox, or requeues it if its consumer is gone.
    pub(crate) fn deliver(
        &mut self,
        ch: u16,
        source: Arc<Source>,
        no_ack: bool,
        message: QueuedMessage,
    ) {
        let Some(consumer_tag) = source.consumer_tag.as_ref() else {
            // Dispatch sends only consumers' deliveries.
            return self.return_undelivered(source, no_ack, message);
        };
        // The very consumer the delivery was dispatched to, still on its channel (not a newer
        // one that reuses its tag after a cancel): a flag on the source, not a lookup among
        // the channel's consumers, which with a thousand of them missed the cache each time.
        let Some(channel) = self.open_channel(ch).filter(|_| source.is_attached()) else {
            return self.return_undelivered(source, no_ack, message);
        };
        let delivery_tag = channel.next_delivery_tag;
        channel.next_delivery_tag += 1;
        let deliver = codec::Deliver {
            consumer_tag,
            delivery_tag,
            redelivered: message.redelivered,
            exchange: message.message.exchange_bytes(),
            routing_key: message.message.routing_key_bytes(),
        };
        self.trace_sent(ch, || deliver.method());
        codec::write_deliver(&mut self.out.bytes, ch, &deliver);
        self.write_content(ch, &message.message);
        if !no_ack {
            let clock = self.clock;
            self.channel_mut(ch)
                .unacked
                .insert(delivery_tag, Unacked { source, message }, clock);
        }
    }

    /// The server cancels a consumer (its queue was deleted): tell the client.
    /// Only that very consumer: a cancel that crossed the client's own basic.cancel and a new
    /// basic.consume with the same tag leaves the new consumer alone.
    pub(crate) fn server_cancel(&mut self, ch: u16, source: &Arc<Source>) {
        let Some(consumer_tag) = source.consumer_tag.as_ref() else {
            return;
        };
        let Some(channel) = self.open_channel(ch) else {
            return;
        };
        let this_one = channel
            .consumers
            .get(&**consumer_tag)
            .is_some_and(|c| Arc::ptr_eq(&c.source, source));
        if !this_one {
            return;
        }
        channel.consumers.remove(&**consumer_tag);
        if self.tuning.cancel_notify {
            send_basic(
                self,
                ch,
                basic::AMQPMethod::Cancel(basic::Cancel {
                    consumer_tag: short(consumer_tag),
                    nowait: true,
                }),
            );
        }
    }

    fn write_content(&mut self, ch: u16, message: &Message) {
        self.out.write_content(ch, message, self.tuning.frame_max);
    }
}
