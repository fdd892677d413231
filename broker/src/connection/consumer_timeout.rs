//! RabbitMQ's consumer timeout: a channel whose oldest unacknowledged delivery waited longer
//! than [`crate::BrokerConfig::consumer_timeout`] is closed with 406, its messages requeued.
//! Deliveries are stamped with a coarse clock the connection advances every [`Steps::period`]
//! (no clock read per delivery), and each step looks at every channel's oldest delivery.

use super::{ConnState, Connection};
use crate::channel::ChannelState;
use crate::error::AmqpError;
use std::time::Duration;

/// Steps a timeout is checked in (more: closer to the timeout, more wake-ups).
const STEPS_PER_TIMEOUT: u32 = 4;
/// The longest step (RabbitMQ checks once a minute).
const LONGEST_STEP: Duration = Duration::from_secs(60);

/// The clock's steps for one timeout.
#[derive(Clone, Copy, Debug)]
pub(super) struct Steps {
    timeout: Duration,
    /// Time between clock steps.
    pub(super) period: Duration,
    /// Steps that make up the timeout, rounded up.
    steps: u32,
}

impl Steps {
    pub(super) fn new(timeout: Duration) -> Self {
        let period = (timeout / STEPS_PER_TIMEOUT).clamp(Duration::from_millis(1), LONGEST_STEP);
        let steps = timeout.as_nanos().div_ceil(period.as_nanos()) as u32;
        Self {
            timeout,
            period,
            steps,
        }
    }

    /// Whether a delivery stamped `at` has waited longer than the timeout when the clock
    /// reads `now`: it was made before step `at + 1`, so by step `at + steps + 1` it has
    /// waited at least `steps` periods (never early, at most a step late).
    fn expired(&self, at: u32, now: u32) -> bool {
        now.wrapping_sub(at) > self.steps
    }
}

impl Connection {
    /// Advances the clock one step and closes the channels whose oldest delivery timed out.
    pub(super) fn consumer_timeout_step(&mut self, steps: Steps) {
        self.clock = self.clock.wrapping_add(1);
        if self.state != ConnState::Open {
            return;
        }
        let now = self.clock;
        let mut expired: Vec<u16> = self
            .channels
            .iter_mut()
            .filter(|(_, c)| c.state == ChannelState::Open)
            .filter_map(|(&id, c)| {
                let at = c.unacked.oldest_delivered_at()?;
                steps.expired(at, now).then_some(id)
            })
            .collect();
        expired.sort_unstable();
        let ms = steps.timeout.as_millis();
        for ch in expired {
            self.fail(
                ch,
                AmqpError::precondition_failed(format!(
                    "delivery acknowledgement on channel {ch} timed out. Timeout value used: {ms} ms. This timeout value can be configured, see consumers doc guide to learn more"
                )),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_delivery_expires_after_the_timeout_and_at_most_a_step_late() {
        let steps = Steps::new(Duration::from_millis(1000));
        assert_eq!(steps.period, Duration::from_millis(250));
        // Stamped 7: made between 1750 and 2000 ms.
        assert!(
            !steps.expired(7, 11),
            "at 2750 ms it may have waited only 750 ms"
        );
        assert!(steps.expired(7, 12), "at 3000 ms it waited over 1000 ms");
        let long = Steps::new(Duration::from_secs(30 * 60));
        assert_eq!(long.period, LONGEST_STEP);
        assert!(!long.expired(0, 30));
        assert!(long.expired(0, 31));
        assert!(long.expired(u32::MAX, 31), "the clock wraps");
    }
}
