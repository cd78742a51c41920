//! The control buffer of `recvmsg` (ancillary data), parsed as a plain byte slice.
//!
//! The parser is pure: it reads descriptor numbers and credentials out of bytes and owns
//! nothing, so it can be fed arbitrary buffers in tests. Turning the numbers into owned
//! descriptors is the receiver's separate step ([`super::fd_passing`]), done for every number
//! found even when the buffer ends in a malformed record, so none of them leaks.
//!
//! The layout is the kernel's (`include/linux/socket.h`): each record is a header
//! `{ cmsg_len: usize, cmsg_level: i32, cmsg_type: i32 }`, padded to a multiple of `usize`,
//! followed by `cmsg_len - header` bytes of data; the next record starts at `cmsg_len`
//! rounded up to a multiple of `usize`.

use std::mem::size_of;
use std::os::fd::RawFd;

use nix::sys::socket::UnixCredentials;

/// The size of a record header, padded (`CMSG_ALIGN(sizeof(struct cmsghdr))`).
const HEADER: usize = align(size_of::<usize>() + 2 * size_of::<i32>());

/// The data of `SCM_CREDENTIALS`: `struct ucred { pid: i32, uid: u32, gid: u32 }`.
const UCRED: usize = 3 * size_of::<u32>();

/// `CMSG_ALIGN`: rounds up to a multiple of `usize`, saturating instead of wrapping.
const fn align(len: usize) -> usize {
    let mask = size_of::<usize>() - 1;
    match len.checked_add(mask) {
        Some(padded) => padded & !mask,
        None => usize::MAX & !mask,
    }
}

/// What a control buffer holds, as far as it could be read.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Ancillary {
    /// Every descriptor number of every complete `SCM_RIGHTS` record, in order.
    pub(crate) fds: Vec<RawFd>,
    /// The last `SCM_CREDENTIALS` record.
    pub(crate) credentials: Option<UnixCredentials>,
    /// Why the parse stopped early, if it did; everything before that point is in `fds`.
    pub(crate) malformed: Option<&'static str>,
}

/// Reads every record of `control`, the first `msg_controllen` bytes of a control buffer.
///
/// Records of other levels or types are skipped. A header that is cut short, or a length that
/// is smaller than a header or runs past the buffer, ends the parse (`malformed` says which);
/// so does an `SCM_RIGHTS` record whose data is not a whole number of descriptors, after its
/// whole ones are taken.
pub(crate) fn parse(control: &[u8]) -> Ancillary {
    let mut found = Ancillary::default();
    let mut rest = control;
    while !rest.is_empty() {
        let Some(header) = rest.get(..HEADER) else {
            found.malformed = Some("a control message header is cut short");
            break;
        };
        let len = usize::from_ne_bytes(bytes(header, 0));
        let level = i32::from_ne_bytes(bytes(header, size_of::<usize>()));
        let kind = i32::from_ne_bytes(bytes(header, size_of::<usize>() + size_of::<i32>()));
        let Some(data) = rest.get(HEADER..len) else {
            found.malformed = Some("a control message length is out of bounds");
            break;
        };
        if level == libc::SOL_SOCKET && kind == libc::SCM_RIGHTS {
            let fds = data.chunks_exact(size_of::<RawFd>());
            let partial = !fds.remainder().is_empty();
            found.fds.extend(fds.map(|fd| RawFd::from_ne_bytes(bytes(fd, 0))));
            if partial {
                found.malformed = Some("a descriptor list ends in a partial descriptor");
                break;
            }
        } else if level == libc::SOL_SOCKET && kind == libc::SCM_CREDENTIALS {
            if data.len() < UCRED {
                found.malformed = Some("credentials are cut short");
                break;
            }
            found.credentials = Some(UnixCredentials::from(libc::ucred {
                pid: i32::from_ne_bytes(bytes(data, 0)),
                uid: u32::from_ne_bytes(bytes(data, 4)),
                gid: u32::from_ne_bytes(bytes(data, 8)),
            }));
        }
        // The last record need not carry its padding.
        rest = rest.get(align(len)..).unwrap_or_default();
    }
    found
}

/// The `N` bytes of `slice` at `at`; the callers have checked the bounds.
fn bytes<const N: usize>(slice: &[u8], at: usize) -> [u8; N] {
    let mut out = [0; N];
    out.copy_from_slice(&slice[at..at + N]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// One record as the kernel lays it out, padded unless it is `last`.
    fn record(level: i32, kind: i32, data: &[u8], last: bool) -> Vec<u8> {
        let len = HEADER + data.len();
        let mut out = Vec::new();
        out.extend_from_slice(&len.to_ne_bytes());
        out.extend_from_slice(&level.to_ne_bytes());
        out.extend_from_slice(&kind.to_ne_bytes());
        out.resize(HEADER, 0);
        out.extend_from_slice(data);
        if !last {
            out.resize(align(len), 0);
        }
        out
    }

    fn rights(fds: &[RawFd], last: bool) -> Vec<u8> {
        let data: Vec<u8> = fds.iter().flat_map(|fd| fd.to_ne_bytes()).collect();
        record(libc::SOL_SOCKET, libc::SCM_RIGHTS, &data, last)
    }

    fn credentials(pid: i32, uid: u32, gid: u32) -> Vec<u8> {
        let data: Vec<u8> = [pid.to_ne_bytes(), uid.to_ne_bytes(), gid.to_ne_bytes()].concat();
        record(libc::SOL_SOCKET, libc::SCM_CREDENTIALS, &data, false)
    }

    #[test]
    fn the_header_is_the_kernels() {
        // SAFETY: CMSG_LEN only computes a length.
        let kernel = unsafe { libc::CMSG_LEN(0) } as usize;
        assert_eq!(HEADER, kernel);
    }

    #[test]
    fn credentials_then_descriptors_as_the_kernel_orders_them() {
        let buffer = [credentials(7, 1000, 100), rights(&[3, 4, 5], true)].concat();
        let found = parse(&buffer);
        assert_eq!(found.fds, [3, 4, 5]);
        let ucred = found.credentials.expect("credentials");
        assert_eq!((ucred.pid(), ucred.uid(), ucred.gid()), (7, 1000, 100));
        assert_eq!(found.malformed, None);
    }

    #[test]
    fn descriptors_before_a_malformed_record_are_kept() {
        let mut buffer = rights(&[10, 11], false);
        buffer.extend_from_slice(&rights(&[12], false)[..HEADER - 1]);
        let found = parse(&buffer);
        assert_eq!(found.fds, [10, 11]);
        assert_eq!(found.malformed, Some("a control message header is cut short"));
    }

    #[test]
    fn a_length_past_the_end_or_inside_the_header_stops_the_parse() {
        let mut past = rights(&[3], true);
        past[..size_of::<usize>()].copy_from_slice(&usize::MAX.to_ne_bytes());
        assert!(parse(&past).fds.is_empty());
        assert_eq!(
            parse(&past).malformed,
            Some("a control message length is out of bounds")
        );
        let mut short = rights(&[3], true);
        short[..size_of::<usize>()].copy_from_slice(&1usize.to_ne_bytes());
        assert_eq!(
            parse(&short).malformed,
            Some("a control message length is out of bounds")
        );
    }

    #[test]
    fn other_records_are_skipped() {
        let buffer = [record(libc::SOL_IP, 1, &[1, 2, 3], false), rights(&[9], true)].concat();
        assert_eq!(parse(&buffer).fds, [9 as RawFd]);
    }

    #[test]
    fn a_partial_descriptor_is_not_a_descriptor() {
        let mut buffer = record(libc::SOL_SOCKET, libc::SCM_RIGHTS, &[5, 0, 0, 0, 6, 0], true);
        let found = parse(&buffer);
        assert_eq!(found.fds, [RawFd::from_ne_bytes([5, 0, 0, 0])]);
        assert_eq!(found.malformed, Some("a descriptor list ends in a partial descriptor"));
        buffer.truncate(HEADER); // its length now runs past the end
        assert!(parse(&buffer).fds.is_empty());
    }

    /// A record the generator can build, and what the parser must find in it.
    #[derive(Debug, Clone)]
    enum Record {
        Rights(Vec<RawFd>),
        Credentials(i32, u32, u32),
        Other(i32, i32, Vec<u8>),
    }

    fn any_record() -> impl Strategy<Value = Record> {
        prop_oneof![
            proptest::collection::vec(any::<RawFd>(), 0..40).prop_map(Record::Rights),
            (any::<i32>(), any::<u32>(), any::<u32>()).prop_map(|(p, u, g)| Record::Credentials(p, u, g)),
            // Any level but SOL_SOCKET, so a record never reads as rights by accident.
            (
                any::<i32>().prop_filter("not SOL_SOCKET", |l| *l != libc::SOL_SOCKET),
                any::<i32>(),
                proptest::collection::vec(any::<u8>(), 0..64)
            )
                .prop_map(|(l, t, d)| Record::Other(l, t, d)),
        ]
    }

    fn encode(records: &[Record]) -> (Vec<u8>, Vec<usize>) {
        let mut buffer = Vec::new();
        let mut ends = Vec::new();
        for r in records {
            buffer.extend(match r {
                Record::Rights(fds) => rights(fds, false),
                Record::Credentials(p, u, g) => credentials(*p, *u, *g),
                Record::Other(l, t, d) => record(*l, *t, d, false),
            });
            ends.push(buffer.len());
        }
        (buffer, ends)
    }

    proptest! {
        // Cheap cases; a few thousand run in well under a second.
        #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

        /// On arbitrary bytes the parser never panics, and every descriptor it yields is four
        /// bytes that are really in the buffer, inside a record's data.
        #[test]
        fn arbitrary_bytes_never_yield_a_descriptor_not_present(buffer in proptest::collection::vec(any::<u8>(), 0..512)) {
            let found = parse(&buffer);
            prop_assert!(found.fds.len() * size_of::<RawFd>() <= buffer.len().saturating_sub(HEADER));
            for fd in &found.fds {
                let needle = fd.to_ne_bytes();
                prop_assert!(buffer[HEADER.min(buffer.len())..].windows(4).any(|w| w == needle));
            }
        }

        /// A well-formed buffer, cut anywhere and followed by anything, yields exactly the
        /// descriptors of the records wholly before the cut, in order, and never one more.
        #[test]
        fn a_cut_buffer_yields_a_prefix_of_the_descriptors(
            records in proptest::collection::vec(any_record(), 0..8),
            cut in any::<prop::sample::Index>(),
            junk in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            let (buffer, ends) = encode(&records);
            let all: Vec<RawFd> = records.iter().flat_map(|r| match r {
                Record::Rights(fds) => fds.clone(),
                _ => Vec::new(),
            }).collect();
            prop_assert_eq!(&parse(&buffer).fds, &all);
            prop_assert_eq!(parse(&buffer).malformed, None);

            let at = cut.index(buffer.len() + 1);
            let mut damaged = buffer[..at].to_vec();
            damaged.extend_from_slice(&junk);
            let found = parse(&damaged);
            // Only the rights of records that end at or before the cut are certain; junk after
            // the cut may add records, but only ones made of bytes actually present there.
            let whole = ends.iter().take_while(|end| **end <= at).count();
            let certain: Vec<RawFd> = records[..whole].iter().flat_map(|r| match r {
                Record::Rights(fds) => fds.clone(),
                _ => Vec::new(),
            }).collect();
            prop_assert!(found.fds.starts_with(&certain), "{:?} does not start with {:?}", found.fds, certain);
            if junk.is_empty() {
                prop_assert!(all.starts_with(&found.fds));
            }
        }
    }
}
