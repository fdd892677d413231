//! Dead-lettering, as RabbitMQ 3.10's classic queues do it: a message rejected without
//! requeue (`rejected`), expired (`expired`) or pushed out by a length limit (`maxlen`) in a
//! queue declared with `x-dead-letter-exchange` is published to that exchange, with the
//! routing key `x-dead-letter-routing-key` or its own (and its `CC` keys), its `expiration`
//! property removed and its `x-death` header saying why. A message that would come back to a queue it expired
//! from, with no rejection on the way, is dropped (a cycle).
//!
//! Queues hand their dead letters to the vhost's [`Outbox`](crate::mailbox::Outbox) while the
//! lock is held; the vhost publishes them before the lock is released
//! (`VhostState::route_dead_letters`).

use crate::channel::Publication;
use crate::message::{Message, MessageBuilder, encode_properties};
use crate::methods::queue::integer_value;
use crate::sender_selected::{cc_keys, without};
use amq_protocol::protocol::BasicProperties;
use amq_protocol::protocol::basic::parse_properties;
use amq_protocol::types::{AMQPValue, FieldArray, FieldTable, LongString, ShortString};
use std::collections::BTreeMap;
use std::sync::Arc;

/// Where a queue's dead letters go.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct DeadLetterTarget {
    /// The exchange (`x-dead-letter-exchange`; may be the default exchange, `""`).
    pub(crate) exchange: Arc<str>,
    /// The routing key (`x-dead-letter-routing-key`); the message's own when `None`.
    pub(crate) routing_key: Option<Arc<str>>,
}

/// Why a message was dead-lettered, as `x-death` names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum DeathReason {
    /// basic.reject or basic.nack with `requeue=false`.
    Rejected,
    /// Its TTL ran out in the queue.
    Expired,
    /// The queue was past its length limit (`x-max-length`, `x-max-length-bytes`).
    Maxlen,
    /// A quorum queue had it back more times than its `x-delivery-limit`.
    DeliveryLimit,
}

impl DeathReason {
    fn name(self) -> &'static str {
        match self {
            Self::Rejected => "rejected",
            Self::Expired => "expired",
            Self::Maxlen => "maxlen",
            Self::DeliveryLimit => "delivery_limit",
        }
    }
}

/// A message leaving a queue for its dead-letter exchange.
#[derive(Debug)]
pub(crate) struct DeadLetter {
    /// The queue it leaves.
    pub(crate) queue: Arc<str>,
    /// The queue's dead-letter exchange and routing key.
    pub(crate) target: DeadLetterTarget,
    /// Why.
    pub(crate) reason: DeathReason,
    /// The message as it was in the queue.
    pub(crate) message: Message,
    /// Whether it leaves a quorum queue, whose `x-delivery-count` header it drops (that
    /// header belongs to a delivery, not to the message).
    pub(crate) from_quorum: bool,
}

/// The message to publish to the dead-letter exchange, and how to route it (its headers, for
/// a headers exchange, and its `CC` keys unless the queue sets the routing key); `None` if its
/// properties cannot be read (they were checked when it was published, so this does not
/// happen).
pub(crate) fn dead_lettered(letter: &DeadLetter, now_secs: u64) -> Option<(Message, Publication)> {
    let message = &letter.message;
    let (_, properties) = parse_properties(message.properties()).ok()?;
    let cc = cc_keys(properties.headers().as_ref());
    let mut death: BTreeMap<ShortString, AMQPValue> = BTreeMap::new();
    let text = |s: &str| AMQPValue::LongString(LongString::from(s));
    death.insert("reason".into(), text(letter.reason.name()));
    death.insert("queue".into(), text(&letter.queue));
    death.insert("time".into(), AMQPValue::Timestamp(now_secs));
    death.insert("exchange".into(), text(message.exchange()));
    let keys = std::iter::once(message.routing_key())
        .chain(cc.iter().map(String::as_str))
        .map(text)
        .collect::<Vec<_>>();
    death.insert(
        "routing-keys".into(),
        AMQPValue::FieldArray(FieldArray::from(keys)),
    );
    if let Some(expiration) = properties.expiration() {
        death.insert("original-expiration".into(), text(expiration.as_str()));
    }
    let kept = match properties.headers() {
        Some(headers) if letter.from_quorum => Some(without(headers, "x-delivery-count")),
        other => other.clone(),
    };
    let mut headers = with_death(
        kept.as_ref(),
        death,
        &letter.queue,
        letter.reason,
        message.exchange(),
    );
    // A routing key of the queue's replaces the message's key and its `CC` keys.
    let (routing_key, extra_routing_keys) = match letter.target.routing_key.as_deref() {
        Some(routing_key) => {
            headers = without(&headers, "CC");
            (routing_key, Vec::new())
        }
        // Its `BCC` keys too, which the message kept when the header went (x-death's
        // `routing-keys` does not list them).
        None => (
            message.routing_key(),
            cc.into_iter()
                .chain(message.bcc_keys().map(str::to_owned))
                .collect(),
        ),
    };
    let properties = without_expiration(&properties).with_headers(headers.clone());
    let raw = encode_properties(&properties);
    let body = message.body();
    let mut builder = MessageBuilder::new(
        &letter.target.exchange,
        routing_key,
        &raw,
        body.len() as u64,
    );
    builder.push(body);
    let publication = Publication {
        headers: Some(headers),
        extra_routing_keys,
        priority: properties.priority().unwrap_or(0),
        ..Publication::default()
    };
    Some((builder.finish(), publication))
}

/// `headers` with this death recorded as RabbitMQ records it: an `x-death` entry for the same
/// queue and reason has its count raised and moves to the front (keeping its other fields); a
/// new one starts at count 1 in front; the first death of all also sets the
/// `x-first-death-*` headers.
fn with_death(
    headers: Option<&FieldTable>,
    mut death: BTreeMap<ShortString, AMQPValue>,
    queue: &str,
    reason: DeathReason,
    exchange: &str,
) -> FieldTable {
    let mut headers: BTreeMap<ShortString, AMQPValue> =
        headers.map(|h| h.inner().clone()).unwrap_or_default();
    let deaths = match headers.get("x-death") {
        Some(AMQPValue::FieldArray(deaths)) => deaths.as_slice().to_vec(),
        Some(_) => Vec::new(),
        None => {
            let text = |s: &str| AMQPValue::LongString(LongString::from(s));
            headers.insert("x-first-death-reason".into(), text(reason.name()));
            headers.insert("x-first-death-queue".into(), text(queue));
            headers.insert("x-first-death-exchange".into(), text(exchange));
            Vec::new()
        }
    };
    let same = |entry: &AMQPValue| match entry {
        AMQPValue::FieldTable(t) => {
            text_of(t.inner().get("queue")) == Some(queue)
                && text_of(t.inner().get("reason")) == Some(reason.name())
        }
        _ => false,
    };
    let (matching, mut others): (Vec<AMQPValue>, Vec<AMQPValue>) =
        deaths.into_iter().partition(same);
    let entry = match matching.into_iter().next() {
        Some(AMQPValue::FieldTable(old)) => {
            let mut old = old.inner().clone();
            let count = old.get("count").and_then(integer_value).unwrap_or(0);
            old.insert("count".into(), AMQPValue::LongLongInt(count + 1));
            old
        }
        _ => {
            death.insert("count".into(), AMQPValue::LongLongInt(1));
            death
        }
    };
    others.insert(0, AMQPValue::FieldTable(entry.into()));
    headers.insert(
        "x-death".into(),
        AMQPValue::FieldArray(FieldArray::from(others)),
    );
    headers.into()
}

/// Whether a message dead-lettered for `reason` with these headers would be going round in a
/// cycle if routed to `queue`: it died in `queue` before, and no death since (that one
/// included) was a rejection. Rejections break cycles: a consumer chose each of them.
pub(crate) fn is_cycle(reason: DeathReason, headers: &FieldTable, queue: &str) -> bool {
    if reason == DeathReason::Rejected {
        return false;
    }
    let Some(AMQPValue::FieldArray(deaths)) = headers.inner().get("x-death") else {
        return false;
    };
    let deaths = deaths.as_slice();
    let died_here = |d: &AMQPValue| match d {
        AMQPValue::FieldTable(t) => text_of(t.inner().get("queue")) == Some(queue),
        _ => false,
    };
    let Some(last_here) = deaths.iter().position(died_here) else {
        return false;
    };
    deaths[..=last_here].iter().all(|d| match d {
        AMQPValue::FieldTable(t) => text_of(t.inner().get("reason")) != Some("rejected"),
        _ => false,
    })
}

fn text_of(value: Option<&AMQPValue>) -> Option<&str> {
    match value? {
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok(),
        AMQPValue::ShortString(s) => Some(s.as_str()),
        _ => None,
    }
}

/// The same properties without `expiration` (amq-protocol has no way to unset one).
fn without_expiration(p: &BasicProperties) -> BasicProperties {
    let mut out = BasicProperties::default();
    macro_rules! keep {
        ($($get:ident => $set:ident),* $(,)?) => {
            $(if let Some(v) = p.$get() {
                out = out.$set(v.clone());
            })*
        };
    }
    keep!(
        content_type => with_content_type,
        content_encoding => with_content_encoding,
        headers => with_headers,
        delivery_mode => with_delivery_mode,
        priority => with_priority,
        correlation_id => with_correlation_id,
        reply_to => with_reply_to,
        message_id => with_message_id,
        timestamp => with_timestamp,
        kind => with_type,
        user_id => with_user_id,
        app_id => with_app_id,
        cluster_id => with_cluster_id,
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(entries: &[(&str, AMQPValue)]) -> FieldTable {
        let mut t = FieldTable::default();
        for (k, v) in entries {
            t.insert((*k).into(), v.clone());
        }
        t
    }

    fn long(s: &str) -> AMQPValue {
        AMQPValue::LongString(s.into())
    }

    fn death(queue: &str, reason: &str, count: i64) -> AMQPValue {
        AMQPValue::FieldTable(table(&[
            ("queue", long(queue)),
            ("reason", long(reason)),
            ("count", AMQPValue::LongLongInt(count)),
        ]))
    }

    fn deaths(headers: &FieldTable) -> Vec<(String, String, i64)> {
        let Some(AMQPValue::FieldArray(a)) = headers.inner().get("x-death") else {
            return Vec::new();
        };
        a.as_slice()
            .iter()
            .map(|d| match d {
                AMQPValue::FieldTable(t) => (
                    text_of(t.inner().get("queue")).unwrap_or("").to_owned(),
                    text_of(t.inner().get("reason")).unwrap_or("").to_owned(),
                    t.inner().get("count").and_then(integer_value).unwrap_or(-1),
                ),
                _ => Default::default(),
            })
            .collect()
    }

    #[test]
    fn a_repeated_death_counts_up_and_moves_to_the_front_and_a_new_one_goes_first() {
        let headers = table(&[(
            "x-death",
            AMQPValue::FieldArray(vec![death("a", "expired", 1), death("b", "rejected", 2)].into()),
        )]);
        let again = with_death(
            Some(&headers),
            BTreeMap::new(),
            "b",
            DeathReason::Rejected,
            "",
        );
        assert_eq!(
            deaths(&again),
            [
                ("b".into(), "rejected".into(), 3),
                ("a".into(), "expired".into(), 1)
            ]
        );
        assert!(
            !again.contains_key("x-first-death-queue"),
            "only the first death sets x-first-death-*"
        );
        let fields = |queue: &str, reason: &str| {
            let mut f = BTreeMap::new();
            f.insert("queue".into(), long(queue));
            f.insert("reason".into(), long(reason));
            f
        };
        let first = with_death(
            None,
            fields("q", "expired"),
            "q",
            DeathReason::Expired,
            "ex",
        );
        assert_eq!(deaths(&first), [("q".into(), "expired".into(), 1)]);
        assert_eq!(
            text_of(first.inner().get("x-first-death-exchange")),
            Some("ex")
        );
    }

    #[test]
    fn only_deaths_without_a_rejection_since_the_queue_make_a_cycle() {
        let h = |d: Vec<AMQPValue>| table(&[("x-death", AMQPValue::FieldArray(d.into()))]);
        let expired_here = h(vec![death("q", "expired", 1)]);
        assert!(is_cycle(DeathReason::Expired, &expired_here, "q"));
        assert!(!is_cycle(DeathReason::Expired, &expired_here, "other"));
        assert!(!is_cycle(DeathReason::Rejected, &expired_here, "q"));
        let rejected_on_the_way = h(vec![death("p", "rejected", 1), death("q", "expired", 1)]);
        assert!(!is_cycle(DeathReason::Expired, &rejected_on_the_way, "q"));
        let expired_twice = h(vec![death("p", "expired", 1), death("q", "expired", 1)]);
        assert!(is_cycle(DeathReason::Expired, &expired_twice, "q"));
    }

    #[test]
    fn a_dead_letter_goes_to_its_target_without_its_expiration() {
        let properties = BasicProperties::default()
            .with_expiration("60000".into())
            .with_correlation_id("c1".into())
            .with_delivery_mode(2);
        let raw = encode_properties(&properties);
        let mut builder = MessageBuilder::new("", "work", &raw, 4);
        builder.push(b"body");
        let letter = DeadLetter {
            queue: "work".into(),
            target: DeadLetterTarget {
                exchange: "dlx".into(),
                routing_key: Some("parked".into()),
            },
            reason: DeathReason::Rejected,
            message: builder.finish(),
            from_quorum: false,
        };
        let (message, publication) = dead_lettered(&letter, 1_700_000_000).unwrap();
        let headers = publication.headers.unwrap();
        assert_eq!(
            (message.exchange(), message.routing_key(), message.body()),
            ("dlx", "parked", &b"body"[..])
        );
        let (_, props) = parse_properties(message.properties()).unwrap();
        assert_eq!(props.expiration(), &None);
        assert_eq!(props.correlation_id(), &Some("c1".into()));
        assert_eq!(props.delivery_mode(), &Some(2));
        assert_eq!(props.headers().as_ref(), Some(&headers));
        let Some(AMQPValue::FieldArray(a)) = headers.inner().get("x-death") else {
            panic!("no x-death");
        };
        let AMQPValue::FieldTable(entry) = &a.as_slice()[0] else {
            panic!("not a table");
        };
        let entry = entry.inner();
        assert_eq!(text_of(entry.get("original-expiration")), Some("60000"));
        assert_eq!(text_of(entry.get("exchange")), Some(""));
        assert_eq!(
            entry.get("time"),
            Some(&AMQPValue::Timestamp(1_700_000_000))
        );
        assert_eq!(
            entry.get("routing-keys"),
            Some(&AMQPValue::FieldArray(vec![long("work")].into()))
        );
    }
}
