//! Policies: queue and exchange options set from outside the protocol, for every queue or
//! exchange whose name matches a pattern, as `rabbitmqctl set_policy` sets them.
//!
//! Operators often give queues their dead-lettering, TTL or length limit by policy rather than
//! by declaration arguments, so a service's own declarations carry none. A test of such a
//! service sets the same policy on its broker ([`crate::BrokerHandle::set_policy`]).
//!
//! As in RabbitMQ 3.10: of the policies whose pattern matches a name (and that apply to its
//! kind), the one of highest priority applies, alone (ties: the first name in byte order). A
//! policy takes effect at once on existing queues and exchanges too (a new `max-length` drops
//! the head of a queue over it) and stops when cleared. Where a queue's declaration argument
//! and its policy both set a key, the smaller number wins for `message-ttl`, `expires`,
//! `max-length`, `max-length-bytes` and `delivery-limit`, and the argument wins for
//! `overflow`, `dead-letter-exchange`, `dead-letter-routing-key` and `alternate-exchange`
//! (each key on its own).

mod inert;

use std::collections::BTreeMap;
use std::sync::Arc;

use amq_protocol::types::FieldTable;
use fancy_regex::Regex;

use crate::dead_letter::DeadLetterTarget;
use crate::message::MAX_TTL_MS;
use crate::methods::queue::string_value;
use crate::queue::{LengthLimits, Overflow, QueueArgs};

/// A policy, as `rabbitmqctl set_policy NAME PATTERN DEFINITION --apply-to ... --priority ...`
/// sets one.
///
/// ```
/// use warren_broker::{ApplyTo, Overflow, Policy};
///
/// let policy = Policy::new("jobs-limit", "^jobs\\.")
///     .apply_to(ApplyTo::Queues)
///     .max_length(1_000)
///     .overflow(Overflow::RejectPublish)
///     .dead_letter_exchange("jobs.dlx");
/// assert_eq!(policy.definition.max_length, Some(1_000));
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    /// The vhost it is set in (`/` unless said otherwise).
    pub vhost: String,
    /// Its name; setting a policy of the same name in its vhost replaces it.
    pub name: String,
    /// A regular expression matched against queue and exchange names (unanchored, like
    /// RabbitMQ's: `^` and `$` anchor it), in PCRE's syntax as RabbitMQ's, look-around and
    /// back-references included: `^(?!amq\.)` matches every name but those starting `amq.`.
    pub pattern: String,
    /// What it applies to.
    pub apply_to: ApplyTo,
    /// Of the policies matching a name, the highest priority applies.
    pub priority: i32,
    /// What it sets.
    pub definition: PolicyDefinition,
}

/// What a policy applies to (`--apply-to`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ApplyTo {
    /// Queues and exchanges (RabbitMQ's default).
    #[default]
    All,
    /// Queues only.
    Queues,
    /// Exchanges only.
    Exchanges,
}

impl ApplyTo {
    /// Its name for `rabbitmqctl --apply-to`: `all`, `queues` or `exchanges`.
    pub fn as_str(self) -> &'static str {
        match self {
            ApplyTo::All => "all",
            ApplyTo::Queues => "queues",
            ApplyTo::Exchanges => "exchanges",
        }
    }
}

/// The keys a policy sets (its JSON definition in `rabbitmqctl`); `None` leaves a key unset.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PolicyDefinition {
    /// `message-ttl`, in milliseconds.
    pub message_ttl: Option<u64>,
    /// `expires`: a queue unused this long (milliseconds, at least 1) is deleted.
    pub expires: Option<u64>,
    /// `max-length`: ready messages a queue keeps.
    pub max_length: Option<u64>,
    /// `max-length-bytes`: body bytes of the ready messages a queue keeps.
    pub max_length_bytes: Option<u64>,
    /// `overflow`: what a publish past the length limits does.
    pub overflow: Option<Overflow>,
    /// `dead-letter-exchange`.
    pub dead_letter_exchange: Option<String>,
    /// `dead-letter-routing-key`.
    pub dead_letter_routing_key: Option<String>,
    /// `delivery-limit` (quorum queues).
    pub delivery_limit: Option<u64>,
    /// `alternate-exchange` (exchanges).
    pub alternate_exchange: Option<String>,
    /// Keys RabbitMQ 3.10 accepts that change nothing on one in-memory node: `ha-*`
    /// (mirroring), `queue-mode`, `queue-version`, `queue-master-locator`,
    /// `queue-leader-locator`, `max-in-memory-length`, `max-in-memory-bytes`, `max-age`,
    /// `stream-max-segment-size-bytes`, `initial-cluster-size`. [`Policy::from_json`] takes
    /// them (a definitions export of a real broker carries them) and keeps them here as given.
    pub inert: BTreeMap<String, serde_json::Value>,
}

impl PolicyDefinition {
    /// Whether it sets nothing (RabbitMQ refuses such a policy).
    fn is_empty(&self) -> bool {
        self == &Self::default()
    }
}

impl Policy {
    /// A policy named `name` for the names `pattern` matches, applying to queues and
    /// exchanges at priority 0, setting nothing yet.
    pub fn new(name: impl Into<String>, pattern: impl Into<String>) -> Self {
        Self {
            vhost: "/".to_owned(),
            name: name.into(),
            pattern: pattern.into(),
            apply_to: ApplyTo::All,
            priority: 0,
            definition: PolicyDefinition::default(),
        }
    }

    /// Sets it in vhost `vhost` rather than `/`.
    pub fn vhost(mut self, vhost: impl Into<String>) -> Self {
        self.vhost = vhost.into();
        self
    }

    /// Applies it to queues, exchanges or both.
    pub fn apply_to(mut self, apply_to: ApplyTo) -> Self {
        self.apply_to = apply_to;
        self
    }

    /// Sets its priority.
    pub fn priority(mut self, priority: i32) -> Self {
        self.priority = priority;
        self
    }

    /// Sets `message-ttl` (milliseconds).
    pub fn message_ttl(mut self, ms: u64) -> Self {
        self.definition.message_ttl = Some(ms);
        self
    }

    /// Sets `expires` (milliseconds).
    pub fn expires(mut self, ms: u64) -> Self {
        self.definition.expires = Some(ms);
        self
    }

    /// Sets `max-length`.
    pub fn max_length(mut self, messages: u64) -> Self {
        self.definition.max_length = Some(messages);
        self
    }

    /// Sets `max-length-bytes`.
    pub fn max_length_bytes(mut self, bytes: u64) -> Self {
        self.definition.max_length_bytes = Some(bytes);
        self
    }

    /// Sets `overflow`.
    pub fn overflow(mut self, overflow: Overflow) -> Self {
        self.definition.overflow = Some(overflow);
        self
    }

    /// Sets `dead-letter-exchange`.
    pub fn dead_letter_exchange(mut self, exchange: impl Into<String>) -> Self {
        self.definition.dead_letter_exchange = Some(exchange.into());
        self
    }

    /// Sets `dead-letter-routing-key`.
    pub fn dead_letter_routing_key(mut self, routing_key: impl Into<String>) -> Self {
        self.definition.dead_letter_routing_key = Some(routing_key.into());
        self
    }

    /// Sets `delivery-limit`.
    pub fn delivery_limit(mut self, deliveries: u64) -> Self {
        self.definition.delivery_limit = Some(deliveries);
        self
    }

    /// Sets `alternate-exchange`.
    pub fn alternate_exchange(mut self, exchange: impl Into<String>) -> Self {
        self.definition.alternate_exchange = Some(exchange.into());
        self
    }

    /// A policy from JSON in the shape of the `policies` entries of RabbitMQ's definitions
    /// export (`rabbitmqctl export_definitions`): `name`, `pattern`, `definition` (the keys
    /// `rabbitmqctl set_policy` takes), and optionally `apply-to`, `priority` and `vhost`
    /// (`/` by default), refused in `rabbitmqctl`'s words where it would refuse them.
    ///
    /// ```
    /// use warren_broker::{ApplyTo, Policy};
    ///
    /// let policy = Policy::from_json(
    ///     r#"{"name": "DLX", "pattern": "^jobs$", "apply-to": "queues",
    ///         "definition": {"dead-letter-exchange": "dlx", "message-ttl": 60000}}"#,
    /// )
    /// .unwrap();
    /// assert_eq!(policy.apply_to, ApplyTo::Queues);
    /// assert_eq!(policy.definition.message_ttl, Some(60_000));
    /// assert!(Policy::from_json(r#"{"name": "p", "pattern": ".*", "definition": {"expires": 0}}"#).is_err());
    /// ```
    ///
    /// # Errors
    /// [`PolicyError::InvalidDefinition`] for malformed JSON, a missing field, a value out of
    /// range or a key policies do not have.
    pub fn from_json(text: &str) -> Result<Self, PolicyError> {
        let invalid = |text: String| PolicyError::InvalidDefinition(text);
        let json: serde_json::Value =
            serde_json::from_str(text).map_err(|e| invalid(format!("JSON decoding error: {e}")))?;
        let field = |key: &str| json.get(key);
        let text_field = |key: &str| -> Result<Option<String>, PolicyError> {
            match field(key) {
                None => Ok(None),
                Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
                Some(other) => Err(invalid(format!("{other} is not a valid {key}"))),
            }
        };
        let name = text_field("name")?.ok_or_else(|| invalid("no name".into()))?;
        let pattern = text_field("pattern")?.ok_or_else(|| invalid("no pattern".into()))?;
        let vhost = text_field("vhost")?.unwrap_or_else(|| "/".to_owned());
        let apply_to = match text_field("apply-to")?.as_deref() {
            None | Some("all") => ApplyTo::All,
            Some("queues") => ApplyTo::Queues,
            Some("exchanges") => ApplyTo::Exchanges,
            Some(other) => {
                return Err(invalid(format!(
                    "apply-to '{other}' unrecognised; should be 'queues', 'exchanges' or 'all'"
                )));
            }
        };
        let priority = match field("priority") {
            None => 0,
            Some(p) => p
                .as_i64()
                .and_then(|p| i32::try_from(p).ok())
                .ok_or_else(|| invalid(format!("{p} is not a valid priority")))?,
        };
        let Some(serde_json::Value::Object(keys)) = field("definition") else {
            return Err(invalid("no policy provided".into()));
        };
        let mut definition = PolicyDefinition::default();
        let mut unknown = Vec::new();
        for (key, value) in keys {
            let number = |what: &str, min: u64| {
                value
                    .as_u64()
                    .filter(|n| *n >= min)
                    .ok_or_else(|| invalid(format!("{value} is not a valid {what}")))
            };
            let string = |what: &str| {
                value
                    .as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| invalid(format!("{value} is not a valid {what}")))
            };
            match key.as_str() {
                "message-ttl" => definition.message_ttl = Some(number("message TTL", 0)?),
                "expires" => definition.expires = Some(number("queue expiry", 1)?),
                "max-length" => definition.max_length = Some(number("maximum length", 0)?),
                "max-length-bytes" => {
                    definition.max_length_bytes = Some(number("maximum length in bytes", 0)?);
                }
                "delivery-limit" => {
                    definition.delivery_limit = Some(number("delivery limit", 0)?);
                }
                "overflow" => {
                    definition.overflow =
                        Some(value.as_str().and_then(Overflow::parse).ok_or_else(|| {
                            invalid(format!("{value} is not a valid overflow value"))
                        })?);
                }
                "dead-letter-exchange" => {
                    definition.dead_letter_exchange = Some(string("dead-letter-exchange")?);
                }
                "dead-letter-routing-key" => {
                    definition.dead_letter_routing_key = Some(string("dead-letter-routing-key")?);
                }
                "alternate-exchange" => {
                    definition.alternate_exchange = Some(string("alternate-exchange")?);
                }
                key if inert::is_inert(key) => {
                    definition.inert.insert(key.to_owned(), value.clone());
                }
                _ => unknown.push(format!("{key}: {value}")),
            }
        }
        if !unknown.is_empty() {
            return Err(invalid(format!(
                "[{}] are not recognised policy settings",
                unknown.join(", ")
            )));
        }
        let policy = Self {
            vhost,
            name,
            pattern,
            apply_to,
            priority,
            definition,
        };
        validate(&policy.definition)?;
        Ok(policy)
    }

    /// Checks it as RabbitMQ does when it is set; gives its compiled pattern.
    pub(crate) fn check(&self) -> Result<Regex, PolicyError> {
        let pattern =
            Regex::new(&self.pattern).map_err(|e| PolicyError::InvalidPattern(e.to_string()))?;
        validate(&self.definition)?;
        Ok(pattern)
    }

    /// Whether it applies to queues.
    fn for_queues(&self) -> bool {
        self.apply_to != ApplyTo::Exchanges
    }

    /// Whether it applies to exchanges.
    fn for_exchanges(&self) -> bool {
        self.apply_to != ApplyTo::Queues
    }
}

/// Why a policy was refused, in `rabbitmqctl`'s words.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// Its pattern is not a regular expression.
    #[error("pattern should be regular expression but is invalid: {0}")]
    InvalidPattern(String),
    /// A value of its definition is out of range, or it sets nothing.
    #[error("Validation failed: {0}")]
    InvalidDefinition(String),
    /// No policy has that name (clearing one).
    #[error("Parameter does not exist")]
    NotFound,
    /// The vhost does not exist.
    #[error("Virtual host '{0}' does not exist")]
    NoVhost(String),
}

/// A vhost's policies, with their patterns compiled.
#[derive(Debug, Default)]
pub(crate) struct Policies {
    /// By descending priority, then name.
    list: Vec<(Arc<Policy>, Regex)>,
}

impl Policies {
    /// Adds a policy, replacing one of the same name, after checking it as RabbitMQ does.
    pub(crate) fn set(&mut self, policy: Policy) -> Result<(), PolicyError> {
        let pattern = policy.check()?;
        self.list.retain(|(p, _)| p.name != policy.name);
        self.list.push((Arc::new(policy), pattern));
        self.list.sort_by(|(a, _), (b, _)| {
            b.priority
                .cmp(&a.priority)
                .then_with(|| a.name.cmp(&b.name))
        });
        Ok(())
    }

    /// Removes a policy.
    pub(crate) fn clear(&mut self, name: &str) -> Result<(), PolicyError> {
        let before = self.list.len();
        self.list.retain(|(p, _)| p.name != name);
        if self.list.len() == before {
            return Err(PolicyError::NotFound);
        }
        Ok(())
    }

    /// Every policy, by descending priority.
    pub(crate) fn all(&self) -> Vec<Policy> {
        self.list.iter().map(|(p, _)| Policy::clone(p)).collect()
    }

    /// The policy that applies to the queue `name`, if any.
    pub(crate) fn for_queue(&self, name: &str) -> Option<&Arc<Policy>> {
        self.first(name, Policy::for_queues)
    }

    /// The policy that applies to the exchange `name`, if any.
    pub(crate) fn for_exchange(&self, name: &str) -> Option<&Arc<Policy>> {
        self.first(name, Policy::for_exchanges)
    }

    fn first(&self, name: &str, applies: fn(&Policy) -> bool) -> Option<&Arc<Policy>> {
        self.list
            .iter()
            // A pattern that backtracks past its limit on a name (a catastrophic one) does not
            // match it.
            .find(|(p, pattern)| applies(p) && pattern.is_match(name).unwrap_or(false))
            .map(|(p, _)| p)
    }
}

/// Checks a definition's values as RabbitMQ 3.10 does (`rabbit_policies:validate_policy`).
fn validate(definition: &PolicyDefinition) -> Result<(), PolicyError> {
    let invalid = |text: String| Err(PolicyError::InvalidDefinition(text));
    if definition.is_empty() {
        return invalid("no policy provided".into());
    }
    if definition.expires == Some(0) {
        return invalid("0 is not a valid queue expiry".into());
    }
    inert::validate(&definition.inert).map_err(PolicyError::InvalidDefinition)
}

/// A queue's behaviour from its declaration `arguments` (already checked into `declared`)
/// and the policy that applies to it, if any: see the module's documentation for which wins.
pub(crate) fn queue_args(
    mut declared: QueueArgs,
    arguments: &FieldTable,
    policy: Option<&PolicyDefinition>,
) -> QueueArgs {
    let Some(policy) = policy else {
        return declared;
    };
    // Times past RabbitMQ's argument limit (ten years) act as that limit: the same in a test,
    // and no instant arithmetic can overflow.
    let time = |ms: Option<u64>| ms.map(|ms| ms.min(MAX_TTL_MS));
    declared.message_ttl = smaller(declared.message_ttl, time(policy.message_ttl));
    declared.expires = smaller(declared.expires, time(policy.expires));

    let (max_length, max_bytes) = match declared.limits.take() {
        Some(l) => (l.max_length, l.max_bytes),
        None => (None, None),
    };
    let max_length = smaller(max_length, policy.max_length);
    let max_bytes = smaller(max_bytes, policy.max_length_bytes);
    if max_length.is_some() || max_bytes.is_some() {
        // The argument's overflow when it was given (with limits of its own or not).
        let declared_overflow = arguments
            .inner()
            .get("x-overflow")
            .and_then(string_value)
            .and_then(|text| Overflow::parse(&text));
        // A quorum queue takes the policy's first (`policy_has_precedence` in RabbitMQ 3.10).
        let overflow = if declared.quorum.is_some() {
            policy.overflow.or(declared_overflow)
        } else {
            declared_overflow.or(policy.overflow)
        };
        declared.limits = Some(LengthLimits {
            max_length,
            max_bytes,
            overflow: Overflow::of_queue(overflow, declared.quorum.is_some()),
        });
    }

    let (exchange, routing_key) = match declared.dead_letter.take() {
        Some(t) => (Some(t.exchange), t.routing_key),
        None => (None, None),
    };
    let exchange = exchange.or_else(|| policy.dead_letter_exchange.as_deref().map(Arc::from));
    let routing_key =
        routing_key.or_else(|| policy.dead_letter_routing_key.as_deref().map(Arc::from));
    declared.dead_letter = exchange.map(|exchange| DeadLetterTarget {
        exchange,
        routing_key,
    });

    if let Some(quorum) = &mut declared.quorum {
        let limit = policy
            .delivery_limit
            .map(|n| i64::try_from(n).unwrap_or(i64::MAX));
        quorum.delivery_limit = match (quorum.delivery_limit, limit) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
    }
    declared
}

/// The smaller of two optional numbers, or the one that is set.
fn smaller(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use amq_protocol::types::{AMQPValue, LongString};

    fn table(pairs: &[(&str, AMQPValue)]) -> FieldTable {
        let mut t = FieldTable::default();
        for (k, v) in pairs {
            t.insert((*k).into(), v.clone());
        }
        t
    }

    fn text(s: &str) -> AMQPValue {
        AMQPValue::LongString(LongString::from(s))
    }

    #[test]
    fn the_highest_priority_then_the_first_name_applies() {
        let mut policies = Policies::default();
        policies.set(Policy::new("b", "^q").max_length(1)).unwrap();
        policies.set(Policy::new("a", "^q").max_length(2)).unwrap();
        assert_eq!(policies.for_queue("q1").unwrap().name, "a");
        policies
            .set(Policy::new("c", "1$").priority(3).message_ttl(5))
            .unwrap();
        assert_eq!(policies.for_queue("q1").unwrap().name, "c");
        assert_eq!(policies.for_queue("q2").unwrap().name, "a");
        // Replacing keeps one policy of a name; exchanges only see policies for them.
        policies
            .set(
                Policy::new("c", "1$")
                    .apply_to(ApplyTo::Queues)
                    .message_ttl(5),
            )
            .unwrap();
        assert_eq!(policies.all().len(), 3);
        assert_eq!(policies.for_exchange("q1").unwrap().name, "a");
        assert_eq!(policies.clear("zz"), Err(PolicyError::NotFound));
    }

    #[test]
    fn numbers_take_the_smaller_and_arguments_win_the_rest_key_by_key() {
        let arguments = table(&[
            ("x-message-ttl", AMQPValue::LongInt(100)),
            ("x-overflow", text("reject-publish")),
            ("x-dead-letter-exchange", text("arg-dlx")),
        ]);
        let declared = QueueArgs {
            message_ttl: Some(100),
            dead_letter: Some(DeadLetterTarget {
                exchange: "arg-dlx".into(),
                routing_key: None,
            }),
            ..QueueArgs::default()
        };
        let policy = Policy::new("p", ".*")
            .message_ttl(50)
            .expires(1_000)
            .max_length(3)
            .overflow(Overflow::DropHead)
            .dead_letter_exchange("policy-dlx")
            .dead_letter_routing_key("policy-key");
        let args = queue_args(declared, &arguments, Some(&policy.definition));
        assert_eq!(args.message_ttl, Some(50));
        assert_eq!(args.expires, Some(1_000));
        // The argument's overflow, though it came without a limit of its own.
        let limits = args.limits.unwrap();
        assert_eq!(
            (limits.max_length, limits.max_bytes, limits.overflow),
            (Some(3), None, Overflow::RejectPublish)
        );
        let target = args.dead_letter.unwrap();
        assert_eq!(&*target.exchange, "arg-dlx");
        assert_eq!(target.routing_key.as_deref(), Some("policy-key"));
    }

    #[test]
    fn a_routing_key_alone_dead_letters_nothing_and_times_are_capped() {
        let policy = Policy::new("p", ".*")
            .dead_letter_routing_key("k")
            .message_ttl(u64::MAX)
            .delivery_limit(3);
        let args = queue_args(
            QueueArgs::default(),
            &FieldTable::default(),
            Some(&policy.definition),
        );
        assert!(args.dead_letter.is_none());
        assert_eq!(args.message_ttl, Some(MAX_TTL_MS));
        // A delivery limit is for quorum queues only.
        assert!(args.quorum.is_none());
    }

    #[test]
    fn definitions_are_checked_as_rabbitmq_checks_them() {
        let mut policies = Policies::default();
        assert!(matches!(
            policies.set(Policy::new("p", ".*")),
            Err(PolicyError::InvalidDefinition(_))
        ));
        assert!(matches!(
            policies.set(Policy::new("p", ".*").expires(0)),
            Err(PolicyError::InvalidDefinition(_))
        ));
        assert!(matches!(
            policies.set(Policy::new("p", "(").max_length(1)),
            Err(PolicyError::InvalidPattern(_))
        ));
        assert!(policies.all().is_empty());
    }
}
