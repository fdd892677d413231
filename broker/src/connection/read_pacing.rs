//! How much a connection reads at a time, and when it lets other tasks run.

use crate::mailbox::Spread;
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
/// Input a connection reads before it lets other tasks run while its publishes' deliveries are
/// spread thin: a hold of the vhost lock sent to [`SPREAD_MAILBOXES`] mailboxes or more, and
/// none came to hold [`SPREAD_MAX_HELD`]. Each consumer connection writes its share of a turn at
/// once, so with 100 of them a 1 MiB turn gives each write ~100 small deliveries, and every
/// write is a system call and a wake-up of its peer (scale 1000 q / 100 conn: +19% embedded,
/// +26% standalone; the rows with one consumer connection unchanged). The cost is latency for
/// the other tasks: 4 MiB of small publishes is 10-20 ms of work.
const READ_PER_TURN_SPREAD: usize = 4 * 1024 * 1024;
/// Mailboxes one hold of the vhost lock must send to for its turn to count as spread thin
/// (one such hold is enough, until a mailbox holds [`SPREAD_MAX_HELD`]).
const SPREAD_MAILBOXES: usize = 8;
/// Memory of deliveries (see `mailbox::bytes_held`) one mailbox may hold in a spread-thin
/// turn: about 2,000 small messages (one consumer connection gets ~10,000 from 1 MiB of input).
const SPREAD_MAX_HELD: usize = 256 * 1024;

/// The read side's sizing and turn-taking, kept across the connection's loop.
#[derive(Debug)]
pub(crate) struct ReadPacing {
    /// Room to offer the next read.
    room: usize,
    /// Room offered to the read in progress.
    offered: usize,
    /// Bytes read since the connection last let other tasks run.
    since_yield: usize,
    /// How the deliveries of the publishes read since then (or since a read that emptied
    /// the socket) spread: the most mailboxes a hold of the vhost lock sent to, and the most
    /// memory one of them held (none before the first hold).
    spread: Spread,
}

impl Default for ReadPacing {
    fn default() -> Self {
        Self {
            room: READ_ROOM,
            offered: 0,
            since_yield: 0,
            spread: Spread::default(),
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
            // The socket is empty: what came before says nothing of what comes next.
            self.spread = Spread::default();
            READ_ROOM
        };
        self.since_yield += n;
    }

    /// Notes how a hold of the vhost lock that routed publishes spread their deliveries.
    pub(crate) fn fed(&mut self, hold: Spread) {
        self.spread.mailboxes = self.spread.mailboxes.max(hold.mailboxes);
        self.spread.fullest = self.spread.fullest.max(hold.fullest);
    }

    /// Once the input read is handled: gives a large buffer back when the connection is quiet
    /// and the buffer empty, and says whether to let other tasks run before reading more: after
    /// [`READ_PER_TURN`], or [`READ_PER_TURN_SPREAD`] while the turn's deliveries are spread
    /// thin.
    pub(super) fn after_handling(&mut self, rbuf: &mut BytesMut) -> bool {
        if self.room == READ_ROOM && rbuf.is_empty() && rbuf.capacity() > 2 * READ_ROOM {
            *rbuf = BytesMut::new();
        }
        let spread_thin =
            self.spread.mailboxes >= SPREAD_MAILBOXES && self.spread.fullest < SPREAD_MAX_HELD;
        let turn = if spread_thin {
            READ_PER_TURN_SPREAD
        } else {
            READ_PER_TURN
        };
        if self.since_yield < turn {
            return false;
        }
        self.since_yield = 0;
        self.spread = Spread::default();
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
        assert!(!pacing.after_handling(&mut rbuf));
        pacing.prepare(&mut rbuf);
        assert!(
            rbuf.capacity() >= READ_ROOM_BUSY,
            "a full read earns a larger room"
        );
        pacing.read(10);
        rbuf.clear();
        assert!(!pacing.after_handling(&mut rbuf));
        assert!(
            rbuf.capacity() <= 2 * READ_ROOM,
            "a quiet connection gives the buffer back"
        );
    }

    /// A read that fills the room offered: its size.
    fn full_read(pacing: &mut ReadPacing, rbuf: &mut BytesMut) -> usize {
        pacing.prepare(rbuf);
        pacing.read(pacing.offered);
        pacing.offered
    }

    /// Reads that fill their room, `total` bytes in all, each routing publishes whose
    /// deliveries spread as `hold` (if any): how many turns end.
    fn turns(total: usize, hold: Option<Spread>) -> usize {
        let mut pacing = ReadPacing::default();
        let mut rbuf = BytesMut::new();
        let mut turns = 0;
        let mut read = 0;
        while read < total {
            read += full_read(&mut pacing, &mut rbuf);
            if let Some(hold) = hold {
                pacing.fed(hold);
            }
            turns += usize::from(pacing.after_handling(&mut rbuf));
        }
        turns
    }

    fn spread(mailboxes: usize, fullest: usize) -> Spread {
        Spread { mailboxes, fullest }
    }

    #[test]
    fn a_turn_ends_after_read_per_turn_bytes_unless_spread_thin() {
        // No deliveries; a mailbox fed as much as one consumer connection gets; few mailboxes.
        assert_eq!(turns(2 * READ_PER_TURN, None), 2);
        assert_eq!(
            turns(2 * READ_PER_TURN, Some(spread(100, SPREAD_MAX_HELD))),
            2
        );
        assert_eq!(turns(2 * READ_PER_TURN, Some(spread(2, 1000))), 2);
        // Deliveries spread over many connections, none of them fed much.
        assert_eq!(turns(2 * READ_PER_TURN, Some(spread(100, 1000))), 0);
        assert_eq!(turns(2 * READ_PER_TURN_SPREAD, Some(spread(100, 1000))), 2);
    }

    #[test]
    fn a_spread_thin_turn_ends_once_a_mailbox_fills_or_the_socket_empties() {
        let mut pacing = ReadPacing::default();
        let mut rbuf = BytesMut::new();
        let mut read = 0;
        while read < 2 * READ_PER_TURN {
            read += full_read(&mut pacing, &mut rbuf);
            pacing.fed(spread(100, 1000));
            assert!(!pacing.after_handling(&mut rbuf), "spread thin at {read}");
        }
        full_read(&mut pacing, &mut rbuf);
        pacing.fed(spread(100, SPREAD_MAX_HELD));
        assert!(pacing.after_handling(&mut rbuf), "one mailbox filled up");

        // After a read that empties the socket, the spread is measured again.
        let mut pacing = ReadPacing::default();
        pacing.fed(spread(100, 1000));
        let mut read = 0;
        while read < READ_PER_TURN {
            read += full_read(&mut pacing, &mut rbuf);
        }
        assert!(!pacing.after_handling(&mut rbuf), "still spread thin");
        pacing.prepare(&mut rbuf);
        pacing.read(10);
        assert!(pacing.after_handling(&mut rbuf), "nothing fed since");
    }
}
