//! The raw bytes a WebSocket server has read since its last complete message, kept by
//! following the frames (RFC 6455, 5.2) as they are read: what must travel with a migrated
//! connection so that the successor parses exactly what tungstenite had not delivered.
//!
//! Sans-IO: fed the bytes of each read, in order.

use crate::migration::{MigrationError, MAX_LEFTOVER_BYTES};

/// The longest frame header: 2 bytes, a 64-bit length, a 4-byte mask.
const MAX_HEADER: usize = 14;

/// Where the parser is within the current frame.
#[derive(Debug, Clone, Copy)]
enum Position {
    /// Reading the header: `have` of its bytes so far.
    Header { bytes: [u8; MAX_HEADER], have: u8 },
    /// Reading the payload of a frame whose header said `fin` and `opcode`.
    Payload { remaining: u64, fin: bool, opcode: u8 },
}

/// Follows the frames read from a client and keeps the bytes since the last message boundary.
///
/// Inside a fragmented message, a complete control frame (a Ping between two fragments) has
/// been handled already: its bytes are cut out of what is kept, so the successor does not
/// handle it twice. Idle, it holds an empty `Vec` (no allocation): a message that arrives in
/// one read is never copied.
#[derive(Debug)]
pub(super) struct Frames {
    /// Since the last boundary, control frames already handled cut out. Emptied (and freed)
    /// at each boundary.
    kept: Vec<u8>,
    position: Position,
    /// Where the current frame starts in `kept` plus the bytes of this read not yet kept.
    frame_start: usize,
    /// A data message has started (FIN clear) and not ended.
    fragmented: bool,
    /// More than [`MAX_LEFTOVER_BYTES`] since the last boundary: not kept, cannot travel
    /// until the next boundary.
    overflow: bool,
    /// A frame had RSV1 set: a compression extension, whose state does not move.
    compressed: bool,
    /// The client's Close has been read: the connection is closing.
    closed: bool,
}

impl Default for Frames {
    fn default() -> Self {
        Self {
            kept: Vec::new(),
            position: Position::Header {
                bytes: [0; MAX_HEADER],
                have: 0,
            },
            frame_start: 0,
            fragmented: false,
            overflow: false,
            compressed: false,
            closed: false,
        }
    }
}

/// Why the bytes read cannot travel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Stuck {
    /// The client negotiated or used compression (RSV1).
    Compressed,
    /// More than [`MAX_LEFTOVER_BYTES`] read of a message not complete yet.
    TooLarge,
    /// The client's Close was read.
    Closed,
}

impl Stuck {
    /// Why the WebSocket cannot migrate, as a migration's error.
    pub(super) fn into_error(self) -> MigrationError {
        match self {
            Stuck::Compressed => MigrationError::Compressed,
            Stuck::Closed => MigrationError::Closed,
            Stuck::TooLarge => MigrationError::UnfinishedMessageTooLarge {
                limit: MAX_LEFTOVER_BYTES,
            },
        }
    }
}

impl Frames {
    /// The bytes read since the last complete message (control frames already handled cut
    /// out): exactly what a new parser must be given to go on where this one is.
    pub(super) fn leftover(&self) -> Result<&[u8], Stuck> {
        if self.closed {
            Err(Stuck::Closed)
        } else if self.compressed {
            Err(Stuck::Compressed)
        } else if self.overflow {
            Err(Stuck::TooLarge)
        } else {
            Ok(&self.kept)
        }
    }

    /// Follows `data`, the next bytes read.
    pub(super) fn observe(&mut self, data: &[u8]) {
        // `data[from..i]` is pending: since the last boundary, not yet copied into `kept`.
        let mut from = 0;
        let mut i = 0;
        while i < data.len() {
            match &mut self.position {
                Position::Header { bytes, have } => {
                    if *have == 0 {
                        self.frame_start = self.kept.len() + (i - from);
                    }
                    let need = header_len(&bytes[..*have as usize]);
                    let take = (need - *have as usize).min(data.len() - i);
                    bytes[*have as usize..*have as usize + take].copy_from_slice(&data[i..i + take]);
                    *have += take as u8;
                    i += take;
                    let have = *have as usize;
                    // The length of the header is known only once its first two bytes are.
                    if have < header_len(&bytes[..have]) {
                        continue;
                    }
                    let header = parse_header(&bytes[..have]);
                    self.compressed |= header.rsv1;
                    self.position = Position::Payload {
                        remaining: header.payload,
                        fin: header.fin,
                        opcode: header.opcode,
                    };
                }
                Position::Payload { remaining, .. } => {
                    let take = (*remaining).min((data.len() - i) as u64);
                    *remaining -= take;
                    i += take as usize;
                }
            }
            if let Position::Payload {
                remaining: 0,
                fin,
                opcode,
            } = self.position
            {
                self.position = Position::Header {
                    bytes: [0; MAX_HEADER],
                    have: 0,
                };
                self.closed |= opcode == OPCODE_CLOSE;
                // Opcodes 0x8 to 0xF are control frames.
                self.frame_ended(fin, opcode & 0x08 != 0, data, &mut from, i);
            }
        }
        self.keep(&data[from..]);
    }

    /// A frame ended at `data[end]`.
    fn frame_ended(&mut self, fin: bool, control: bool, data: &[u8], from: &mut usize, end: usize) {
        if control && self.fragmented {
            // Handled by tungstenite between two fragments: cut it out.
            self.cut_frame(data, from, end);
        } else if control || fin {
            // A message (or a control frame between messages) is complete: a boundary.
            self.fragmented = false;
            self.kept = Vec::new();
            self.overflow = false;
            *from = end;
        } else {
            self.fragmented = true;
        }
    }

    /// Drops the frame that starts at `frame_start` and ends at `data[end]`.
    fn cut_frame(&mut self, data: &[u8], from: &mut usize, end: usize) {
        if self.overflow {
            // Nothing is kept until the next boundary.
        } else if self.frame_start >= self.kept.len() {
            // It started in this read: keep what precedes it.
            let upto = *from + (self.frame_start - self.kept.len());
            self.keep(&data[*from..upto]);
        } else {
            self.kept.truncate(self.frame_start);
        }
        *from = end;
    }

    fn keep(&mut self, bytes: &[u8]) {
        if self.overflow || bytes.is_empty() {
            return;
        }
        if self.kept.len() + bytes.len() > MAX_LEFTOVER_BYTES {
            self.overflow = true;
            self.kept = Vec::new();
            return;
        }
        self.kept.extend_from_slice(bytes);
    }
}

/// The length of a header whose first bytes are `start` (2 until those two are known).
fn header_len(start: &[u8]) -> usize {
    if start.len() < 2 {
        return 2;
    }
    let extended = match start[1] & 0x7f {
        126 => 2,
        127 => 8,
        _ => 0,
    };
    let mask = if start[1] & 0x80 != 0 { 4 } else { 0 };
    2 + extended + mask
}

/// The opcode of a Close frame.
const OPCODE_CLOSE: u8 = 0x8;

struct Header {
    fin: bool,
    rsv1: bool,
    opcode: u8,
    payload: u64,
}

/// A whole header (`header_len(bytes) == bytes.len()`).
fn parse_header(bytes: &[u8]) -> Header {
    let payload = match bytes[1] & 0x7f {
        126 => u64::from(u16::from_be_bytes([bytes[2], bytes[3]])),
        127 => u64::from_be_bytes(bytes[2..10].try_into().expect("8 bytes")),
        short => u64::from(short),
    };
    Header {
        fin: bytes[0] & 0x80 != 0,
        rsv1: bytes[0] & 0x40 != 0,
        opcode: bytes[0] & 0x0f,
        payload,
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// A client frame (masked, as clients send them) of `opcode` with `payload`.
    pub(in crate::drain::websocket) fn frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = vec![if fin { 0x80 } else { 0 } | opcode];
        match payload.len() {
            n if n < 126 => out.push(0x80 | n as u8),
            n if n <= 0xffff => {
                out.push(0x80 | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(0x80 | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        let mask = [0x37, 0xfa, 0x21, 0x3d];
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        out
    }

    /// Feeds `bytes` in reads of `chunk` bytes.
    fn fed(bytes: &[u8], chunk: usize) -> Frames {
        let mut frames = Frames::default();
        for piece in bytes.chunks(chunk) {
            frames.observe(piece);
        }
        frames
    }

    #[test]
    fn whole_messages_leave_nothing_and_allocate_nothing() {
        let mut bytes = frame(true, 1, b"hello");
        bytes.extend(frame(true, 2, &[7; 300]));
        let frames = fed(&bytes, bytes.len());
        assert_eq!(frames.leftover(), Ok(&[][..]));
        assert_eq!(frames.kept.capacity(), 0);
    }

    #[test]
    fn a_partial_frame_is_kept_whatever_the_reads() {
        let whole = frame(true, 1, b"first");
        let next = frame(true, 1, &[b'x'; 70_000]);
        for chunk in [1, 2, 3, 7, 100, 4096] {
            let mut bytes = whole.clone();
            bytes.extend_from_slice(&next[..20]);
            let frames = fed(&bytes, chunk);
            assert_eq!(frames.leftover(), Ok(&next[..20]), "reads of {chunk}");
        }
    }

    #[test]
    fn a_fragmented_message_is_kept_from_its_first_fragment_with_pings_cut_out() {
        let first = frame(false, 1, b"hel");
        let ping = frame(true, 9, b"are you there");
        let second = frame(false, 0, b"lo ");
        let last = frame(true, 0, b"room");
        let mut bytes = [first.clone(), ping.clone(), second.clone()].concat();
        bytes.extend_from_slice(&last[..3]);
        let expected = [first, second, last[..3].to_vec()].concat();
        for chunk in [1, 5, 9, 1000] {
            assert_eq!(fed(&bytes, chunk).leftover(), Ok(&expected[..]), "reads of {chunk}");
        }
        // Once the last fragment is whole, nothing is left.
        let mut frames = fed(&bytes, 4);
        frames.observe(&last[3..]);
        assert_eq!(frames.leftover(), Ok(&[][..]));
    }

    #[test]
    fn a_ping_between_messages_is_a_boundary() {
        let bytes = [frame(true, 9, b"ping"), frame(true, 1, b"hi")[..4].to_vec()].concat();
        assert_eq!(fed(&bytes, 3).leftover(), Ok(&frame(true, 1, b"hi")[..4]));
    }

    #[test]
    fn lengths_of_16_and_64_bits_are_followed() {
        for len in [125, 126, 65_535, 65_536, 100_000] {
            let mut bytes = frame(true, 2, &vec![1; len]);
            bytes.extend(frame(true, 1, b"tail")[..2].to_vec());
            let frames = fed(&bytes, 1000);
            assert_eq!(frames.leftover(), Ok(&[0x81, 0x84][..]), "a payload of {len}");
        }
    }

    #[test]
    fn more_than_the_leftover_limit_cannot_travel_until_the_next_boundary() {
        let big = frame(true, 2, &vec![1; MAX_LEFTOVER_BYTES + 10]);
        let mut frames = fed(&big[..MAX_LEFTOVER_BYTES + 5], 4096);
        assert_eq!(frames.leftover(), Err(Stuck::TooLarge));
        assert_eq!(frames.kept.capacity(), 0, "freed");
        frames.observe(&big[MAX_LEFTOVER_BYTES + 5..]);
        assert_eq!(frames.leftover(), Ok(&[][..]));
    }

    #[test]
    fn a_close_is_remembered() {
        let bytes = [frame(true, 1, b"bye"), frame(true, 8, &[0x03, 0xe8])].concat();
        assert_eq!(fed(&bytes, 5).leftover(), Err(Stuck::Closed));
    }

    /// The leftover after each read, whatever the reads: the bytes since the last boundary.
    fn split_everywhere(bytes: &[u8], expected: &[u8]) {
        for at in 0..=bytes.len() {
            let mut frames = Frames::default();
            frames.observe(&bytes[..at]);
            frames.observe(&bytes[at..]);
            assert_eq!(frames.leftover(), Ok(expected), "split at {at}");
        }
    }

    #[test]
    fn a_read_split_at_any_byte_changes_nothing() {
        let first = frame(false, 1, b"hel");
        let ping = frame(true, 9, b"are you there");
        let second = frame(false, 0, &[b'l'; 130]);
        let last = frame(true, 0, b"room");
        let whole = [frame(true, 2, &[1; 200]), frame(true, 10, b"")].concat();
        let bytes = [&whole[..], &first, &ping, &second, &last[..7]].concat();
        split_everywhere(&bytes, &[&first[..], &second, &last[..7]].concat());
        split_everywhere(&[&bytes[..], &last[7..]].concat(), &[]);
    }

    #[test]
    fn hostile_lengths_neither_panic_nor_grow_past_the_limit() {
        for length in [u64::MAX, 1 << 63, (1 << 63) - 1, u64::from(u32::MAX) + 1] {
            let mut header = vec![0x82, 0x80 | 127];
            header.extend_from_slice(&length.to_be_bytes());
            header.extend_from_slice(&[1, 2, 3, 4]);
            let mut frames = fed(&header, 3);
            assert_eq!(frames.leftover(), Ok(&header[..]), "length {length}");
            for _ in 0..(MAX_LEFTOVER_BYTES / 4096 + 2) {
                frames.observe(&[0xaa; 4096]);
            }
            assert_eq!(frames.leftover(), Err(Stuck::TooLarge), "length {length}");
            assert_eq!(frames.kept.capacity(), 0, "length {length}");
        }
    }

    #[test]
    fn protocol_errors_do_not_panic() {
        // tungstenite refuses all of these (the connection then fails and does not move):
        // following them must only not panic nor grow.
        let streams = [
            frame(true, 9, &[0; 300]),                                   // a control frame over 125
            [frame(false, 9, b"a"), frame(true, 0, b"b")].concat(),      // a fragmented control frame
            frame(true, 0, b"orphan"),                                   // a continuation without a start
            [frame(false, 1, b"a"), frame(true, 2, b"b")].concat(),      // a new message inside one
            [frame(false, 1, b"a"), frame(true, 9, &[0; 200])].concat(), // a big Ping inside one
        ];
        for bytes in streams {
            for chunk in 1..=bytes.len() {
                let frames = fed(&bytes, chunk);
                assert!(frames.leftover().map_or(true, |kept| kept.len() <= bytes.len()));
            }
        }
    }

    #[test]
    fn rsv1_marks_compression() {
        let mut bytes = frame(true, 1, b"squeezed");
        bytes[0] |= 0x40;
        assert_eq!(fed(&bytes, 64).leftover(), Err(Stuck::Compressed));
    }
}
