//! Resource alarms, as RabbitMQ raises them when it runs low on memory or disk: a test raises
//! one ([`crate::BrokerHandle::raise_alarm`]) to see what its publishers do when the broker
//! stops taking their messages. A connection is blocked at its first publish while an alarm is
//! raised: that publish's frames and everything after them stay unread until the alarms clear
//! (nothing is lost), heartbeat monitoring pauses, and a client with the `connection.blocked`
//! capability is told (`connection.blocked`, then `connection.unblocked`). Connections that do
//! not publish go on as usual, deliveries too.

use amq_protocol::protocol::{AMQPClass, connection};

/// A resource alarm of RabbitMQ's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResourceAlarm {
    /// Memory use above the high watermark (`connection.blocked` reason `low on memory`).
    Memory,
    /// Free disk space below the limit (`low on disk`).
    Disk,
}

/// The alarms raised, one bit each.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Alarms(u8);

impl Alarms {
    /// These alarms with `alarm` raised or cleared.
    pub(crate) fn with(self, alarm: ResourceAlarm, raised: bool) -> Self {
        let bit = match alarm {
            ResourceAlarm::Memory => 1,
            ResourceAlarm::Disk => 2,
        };
        Self(if raised { self.0 | bit } else { self.0 & !bit })
    }

    fn any(self) -> bool {
        self.0 != 0
    }

    /// `connection.blocked`'s reason, in RabbitMQ's words.
    fn reason(self) -> String {
        let names: Vec<&str> = [(1, "memory"), (2, "disk")]
            .into_iter()
            .filter(|(bit, _)| self.0 & bit != 0)
            .map(|(_, name)| name)
            .collect();
        format!("low on {}", names.join(" & "))
    }
}

/// A connection's publisher throttling, as RabbitMQ's reader does it.
#[derive(Debug, Default)]
pub(crate) struct Throttle {
    alarms: Alarms,
    blocked: bool,
    /// The client was sent connection.blocked (and not yet connection.unblocked).
    notified: bool,
    /// The client takes connection.blocked (capability `connection.blocked`).
    notify: bool,
}

impl Throttle {
    /// A connection's throttle, with the alarms raised when it opened.
    pub(crate) fn new(alarms: Alarms, notify: bool) -> Self {
        Self {
            alarms,
            notify,
            ..Self::default()
        }
    }

    /// Whether its input is held until the alarms clear.
    pub(crate) fn is_blocked(&self) -> bool {
        self.blocked
    }

    /// A publish arrived: with an alarm raised the connection is blocked. Returns the
    /// connection.blocked to send, if the client takes it and was not told already.
    pub(crate) fn publish_received(&mut self) -> Option<AMQPClass> {
        if !self.alarms.any() {
            return None;
        }
        self.blocked = true;
        if !self.notify || self.notified {
            return None;
        }
        self.notified = true;
        let reason = crate::error::short_string_lossy(&self.alarms.reason());
        Some(AMQPClass::Connection(connection::AMQPMethod::Blocked(
            connection::Blocked { reason },
        )))
    }

    /// The alarms changed: once none is left the connection is unblocked. Returns the
    /// connection.unblocked to send, if the client was told it was blocked.
    pub(crate) fn set_alarms(&mut self, alarms: Alarms) -> Option<AMQPClass> {
        self.alarms = alarms;
        if alarms.any() {
            return None;
        }
        self.blocked = false;
        if !std::mem::take(&mut self.notified) {
            return None;
        }
        Some(AMQPClass::Connection(connection::AMQPMethod::Unblocked(
            connection::Unblocked {},
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_publish_under_an_alarm_blocks_and_tells_the_client_once() {
        let memory = Alarms::default().with(ResourceAlarm::Memory, true);
        let mut throttle = Throttle::new(memory, true);
        assert!(!throttle.is_blocked(), "not before it publishes");
        let Some(AMQPClass::Connection(connection::AMQPMethod::Blocked(blocked))) =
            throttle.publish_received()
        else {
            panic!("connection.blocked expected");
        };
        assert_eq!(blocked.reason.as_str(), "low on memory");
        assert!(throttle.is_blocked());
        assert!(throttle.publish_received().is_none(), "told once");
        let both = memory.with(ResourceAlarm::Disk, true);
        assert!(throttle.set_alarms(both).is_none(), "still blocked");
        assert!(throttle.is_blocked());
        assert!(
            throttle
                .set_alarms(both.with(ResourceAlarm::Memory, false))
                .is_none()
        );
        assert!(matches!(
            throttle.set_alarms(Alarms::default()),
            Some(AMQPClass::Connection(connection::AMQPMethod::Unblocked(_)))
        ));
        assert!(!throttle.is_blocked());
    }

    #[test]
    fn the_reason_names_every_alarm_and_a_client_without_the_capability_is_not_told() {
        let both = Alarms::default()
            .with(ResourceAlarm::Disk, true)
            .with(ResourceAlarm::Memory, true);
        assert_eq!(both.reason(), "low on memory & disk");
        let mut quiet = Throttle::new(both, false);
        assert!(quiet.publish_received().is_none());
        assert!(quiet.is_blocked());
        assert!(quiet.set_alarms(Alarms::default()).is_none());
        assert!(!quiet.is_blocked());
    }
}
