//! How much a connection reads at a time, and when it lets other tasks run.

use bytes::BytesMut;

/// Room for input offered to each socket read, normally. A read that fills it raises the room
/// to [`READ_ROOM_BUSY`] for the next read: under load, each read is a system call and on
/// loopback also a TCP window update that wakes the peer, so fewer and larger reads are much
/// cheaper. The large buffer is dropped after a read that did not fill it, once it is empty.
const READ_ROOM: usize = 16 * 1024;
/// Room for input offered to a read after a read that filled its room.
const READ_ROOM_BUSY: usize = 128 * 1024;
/// Input a connection reads before it lets other tasks run. Without a bound, a publisher that
/// always has input reads up to tokio's budget (128 reads, 16 MiB) per turn while the consumers
/// of what it publishes wait, and its queues swell (a 4 KiB pubsub run peaked at 1.4 GB RSS).
/// A small bound costs throughput: consumers then run after every read, each with a few
/// deliveries, so each write carries few (16 KiB: 14x the writes of 1 MiB with 100 consumer
/// connections, and 35% fewer messages/s). 1 MiB of input is a few milliseconds of work.
const READ_PER_TURN: usize = 1024 * 1024;
/// Input a connection reads before it lets other tasks run when its deliveries are spread
/// thin: some went to consumers, and none of their mailboxes came to hold
/// [`FED_MAILBOX_FULL`]. Each consumer connection writes its share of a turn at once, so with
/// 100 of them a 1 MiB turn gives each write ~100 small deliveries, and every write is a
/// system call and a wake-up of its peer (scale 1000 q / 100 conn: +13-15%, 5 rounds, with
/// the rows of one consumer connection unchanged). The cost is latency for the other tasks:
/// 4 MiB of small publishes is 10-20 ms of work.
const READ_PER_TURN_SPREAD: usize = 4 * 1024 * 1024;
/// Memory of deliveries (see `mailbox::bytes_held`) one mailbox may hold before a turn's
/// deliveries count as concentrated, ending the turn at [`READ_PER_TURN`]: about 2,000 small
/// messages (a single consumer connection gets ~10,000 from 1 MiB of input).
const FED_MAILBOX_FULL: usize = 256 * 1024;

/// The read side's sizing and turn-taking, kept across the connection's loop.
#[derive(Debug)]
pub(super) struct ReadPacing {
    /// Room to offer the next read.
    room: usize,
    /// Room offered to the read in progress.
    offered: usize,
    /// Bytes read since the connection last let other tasks run.
    since_yield: usize,
}

impl Default for ReadPacing {
    fn default() -> Self {
        Self {
            room: READ_ROOM,
            offered: 0,
            since_yield: 0,
        }
    }
}

impl ReadPacing {
    /// Makes room in `rbuf` for the next read.
    pub(super) fn prepare(&mut self, rbuf: &mut BytesMut) {
        if rbuf.capacity() - rbuf.len() < self.room {
            rbuf.reserve(self.room);
        }
        self.offered = rbuf.capacity() - rbuf.len();
    }

    /// Notes a read of `n` bytes into the room [`ReadPacing::prepare`] offered.
    pub(super) fn read(&mut self, n: usize) {
        self.room = if n == self.offered {
            READ_ROOM_BUSY
        } else {
            READ_ROOM
        };
        self.since_yield += n;
    }

    /// Once the input read is handled: gives a large buffer back when the connection is quiet
    /// and the buffer empty, and says whether to let other tasks run before reading more.
    /// `fed` is the most memory a consumer's mailbox held after the deliveries of this turn's
    /// publishes (0 if none): a turn spread thin over many consumer connections goes on past
    /// [`READ_PER_TURN`], up to [`READ_PER_TURN_SPREAD`]. The caller starts `fed` again at 0
    /// when this says to yield.
    pub(super) fn after_handling(&mut self, rbuf: &mut BytesMut, fed: usize) -> bool {
        if self.room == READ_ROOM && rbuf.is_empty() && rbuf.capacity() > 2 * READ_ROOM {
            *rbuf = BytesMut::new();
        }
        let spread_thin = fed > 0 && fed < FED_MAILBOX_FULL;
        let turn = if spread_thin {
            READ_PER_TURN_SPREAD
        } else {
            READ_PER_TURN
        };
        if self.since_yield < turn {
            return false;
        }
        self.since_yield = 0;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn room_grows_after_a_full_read_and_the_buffer_shrinks_when_quiet() {
        let mut pacing = ReadPacing::default();
        let mut rbuf = BytesMut::new();
        pacing.prepare(&mut rbuf);
        assert!(rbuf.capacity() >= READ_ROOM);
        pacing.read(pacing.offered);
        assert!(!pacing.after_handling(&mut rbuf, 0));
        pacing.prepare(&mut rbuf);
        assert!(
            rbuf.capacity() >= READ_ROOM_BUSY,
            "a full read earns a larger room"
        );
        pacing.read(10);
        rbuf.clear();
        assert!(!pacing.after_handling(&mut rbuf, 0));
        assert!(
            rbuf.capacity() <= 2 * READ_ROOM,
            "a quiet connection gives the buffer back"
        );
    }

    /// Reads of `READ_ROOM` bytes, `total` in all, each feeding a mailbox up to `fed`: how many
    /// turns end.
    fn turns(total: usize, fed: usize) -> usize {
        let mut pacing = ReadPacing::default();
        let mut rbuf = BytesMut::new();
        let mut turns = 0;
        for _ in 0..total / READ_ROOM {
            pacing.prepare(&mut rbuf);
            pacing.read(READ_ROOM);
            turns += usize::from(pacing.after_handling(&mut rbuf, fed));
        }
        turns
    }

    #[test]
    fn a_turn_ends_after_read_per_turn_bytes_unless_spread_thin() {
        // No deliveries, or a mailbox fed as much as one consumer connection gets.
        assert_eq!(turns(2 * READ_PER_TURN, 0), 2);
        assert_eq!(turns(2 * READ_PER_TURN, FED_MAILBOX_FULL), 2);
        // Deliveries spread over many connections, none of them fed much.
        assert_eq!(turns(2 * READ_PER_TURN, FED_MAILBOX_FULL / 100), 0);
        assert_eq!(turns(2 * READ_PER_TURN_SPREAD, FED_MAILBOX_FULL / 100), 2);
    }
}
