//! A connection's output waiting to be written: frames encoded into one buffer, with large
//! message bodies spliced in by reference and handed to the socket by a vectored write rather
//! than copied into the buffer (for 4 KiB bodies that copy was half of the broker's memcpy).

use crate::codec::{self, FRAME_END};
use crate::message::Message;
use bytes::Bytes;
use std::collections::VecDeque;
use std::io::IoSlice;

/// Body frame payloads at least this large are spliced in rather than copied: below it, the
/// copy costs less than the reference count and the extra slice.
pub(crate) const SPLICE_MIN: usize = 1024;
/// Most slices offered to one vectored write (the kernel takes up to 1024).
pub(crate) const MAX_SLICES: usize = 64;
/// Written bytes are dropped from the front of the buffer once there are this many and they
/// are at least half of it (so a slow socket never costs a move per partial write).
const COMPACT_AFTER: usize = 64 * 1024;

/// Output waiting to be written, in order: `bytes`, with each splice's body inserted at its
/// position.
#[derive(Debug, Default)]
pub(crate) struct Output {
    /// Encoded frames (everything but the spliced bodies).
    pub(crate) bytes: Vec<u8>,
    /// How much of `bytes` the socket took.
    sent: usize,
    /// Bodies to write before `bytes[at..]`, in order of `at`.
    splices: VecDeque<Splice>,
    /// Bytes of the front splice the socket took.
    front_sent: usize,
    /// Unwritten bytes of all splices.
    spliced: usize,
}

/// A body written by reference.
#[derive(Debug)]
struct Splice {
    /// Where in `bytes` it goes.
    at: usize,
    /// The payload.
    body: Bytes,
}

impl Output {
    /// Empty output with room for `capacity` encoded bytes.
    pub(crate) fn with_capacity(capacity: usize) -> Self {
        Self {
            bytes: Vec::with_capacity(capacity),
            ..Self::default()
        }
    }

    /// Bytes waiting to be written.
    pub(crate) fn pending(&self) -> usize {
        self.bytes.len() - self.sent + self.spliced
    }

    /// Appends a message's content: its header and its body in frames of at most `frame_max`
    /// bytes, large payloads by reference.
    pub(crate) fn write_content(&mut self, channel: u16, message: &Message, frame_max: u32) {
        let body = message.body();
        if body.len() < SPLICE_MIN {
            codec::write_content(
                &mut self.bytes,
                channel,
                message.properties(),
                body,
                frame_max,
            );
            return;
        }
        codec::write_content_header(&mut self.bytes, channel, message.properties(), body.len());
        for piece in codec::body_frames(body.len(), frame_max) {
            codec::write_body_frame_head(&mut self.bytes, channel, piece.len());
            if piece.len() >= SPLICE_MIN {
                self.spliced += piece.len();
                self.splices.push_back(Splice {
                    at: self.bytes.len(),
                    body: message.body_slice(piece),
                });
            } else {
                self.bytes.extend_from_slice(&body[piece]);
            }
            self.bytes.push(FRAME_END);
        }
    }

    /// Fills `slices` with the start of the unwritten output, in order; returns how many it
    /// filled (0 when nothing waits).
    pub(crate) fn slices<'a>(&'a self, slices: &mut [IoSlice<'a>; MAX_SLICES]) -> usize {
        let mut n = 0;
        let mut from = self.sent;
        for (i, splice) in self.splices.iter().enumerate() {
            if n + 2 > MAX_SLICES {
                return n;
            }
            if splice.at > from {
                slices[n] = IoSlice::new(&self.bytes[from..splice.at]);
                n += 1;
            }
            let skip = if i == 0 { self.front_sent } else { 0 };
            slices[n] = IoSlice::new(&splice.body[skip..]);
            n += 1;
            from = splice.at;
        }
        if from < self.bytes.len() && n < MAX_SLICES {
            slices[n] = IoSlice::new(&self.bytes[from..]);
            n += 1;
        }
        n
    }

    /// The socket took `n` more bytes of what [`Output::slices`] offered.
    pub(crate) fn wrote(&mut self, mut n: usize) {
        while n > 0 {
            match self.splices.front() {
                Some(splice) if self.sent < splice.at => {
                    let taken = n.min(splice.at - self.sent);
                    self.sent += taken;
                    n -= taken;
                }
                Some(splice) => {
                    let taken = n.min(splice.body.len() - self.front_sent);
                    self.front_sent += taken;
                    self.spliced -= taken;
                    n -= taken;
                    if self.front_sent == splice.body.len() {
                        self.splices.pop_front();
                        self.front_sent = 0;
                    }
                }
                None => {
                    self.sent += n;
                    n = 0;
                }
            }
        }
        if self.splices.is_empty() && self.sent == self.bytes.len() {
            self.bytes.clear();
            self.sent = 0;
        } else if self.sent >= COMPACT_AFTER && self.sent * 2 >= self.bytes.len() {
            self.bytes.drain(..self.sent);
            for splice in &mut self.splices {
                splice.at -= self.sent;
            }
            self.sent = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::MessageBuilder;

    fn message(body: &[u8]) -> Message {
        let mut builder = MessageBuilder::new("", "q", &[0, 0], body.len() as u64);
        builder.push(body);
        builder.finish()
    }

    /// Everything `output` would write, taken `step` bytes at a time (as partial writes), and
    /// whether written bytes were compacted away while splices were pending.
    fn drain(output: &mut Output, step: usize) -> (Vec<u8>, bool) {
        let mut written = Vec::new();
        let mut compacted = false;
        while output.pending() > 0 {
            let before = output.bytes.len();
            let mut slices = [IoSlice::new(&[]); MAX_SLICES];
            let filled = output.slices(&mut slices);
            assert!(filled > 0, "pending output offers a slice");
            let mut room = step;
            let mut took = 0;
            for slice in &slices[..filled] {
                let n = slice.len().min(room);
                written.extend_from_slice(&slice[..n]);
                room -= n;
                took += n;
                if room == 0 {
                    break;
                }
            }
            output.wrote(took);
            compacted |= !output.splices.is_empty() && output.bytes.len() < before;
        }
        (written, compacted)
    }

    #[test]
    fn spliced_bodies_are_written_exactly_as_copied_ones_whatever_the_partial_writes() {
        let bodies: Vec<Vec<u8>> = [10, 5000, 1024, 1023, 70_000, 0, 3000]
            .iter()
            .enumerate()
            .map(|(i, &n)| (0..n).map(|b| (b * 7 + i) as u8).collect())
            .collect();
        let mut expected = Vec::new();
        for body in &bodies {
            codec::write_content(&mut expected, 3, &[0, 0], body, 4096);
            expected.extend_from_slice(b"between");
        }
        for step in [1, 7, 1000, 4096, 9000, usize::MAX] {
            let mut output = Output::default();
            for body in &bodies {
                output.write_content(3, &message(body), 4096);
                output.bytes.extend_from_slice(b"between");
            }
            assert_eq!(output.pending(), expected.len());
            assert!(!output.splices.is_empty(), "large bodies are spliced");
            assert_eq!(drain(&mut output, step).0, expected, "steps of {step}");
            assert_eq!(output.pending(), 0);
            assert!(output.bytes.is_empty() && output.splices.is_empty());
        }
    }

    #[test]
    fn written_bytes_are_compacted_away_while_splices_wait() {
        let body = vec![5u8; 5000];
        let filler = vec![1u8; 10_000];
        let mut expected = Vec::new();
        let mut output = Output::default();
        for _ in 0..20 {
            codec::write_content(&mut expected, 2, &[0, 0], &body, 131_072);
            expected.extend_from_slice(&filler);
            output.write_content(2, &message(&body), 131_072);
            output.bytes.extend_from_slice(&filler);
        }
        let (written, compacted) = drain(&mut output, 7000);
        assert!(compacted, "written bytes went while splices were pending");
        assert_eq!(written, expected);
    }

    #[test]
    fn more_splices_than_one_write_takes_are_written_over_several() {
        let body = vec![9u8; 2000];
        let mut expected = Vec::new();
        let mut output = Output::default();
        for _ in 0..(MAX_SLICES * 3) {
            codec::write_content(&mut expected, 1, &[0, 0], &body, 131_072);
            output.write_content(1, &message(&body), 131_072);
        }
        assert_eq!(drain(&mut output, usize::MAX).0, expected);
    }
}
