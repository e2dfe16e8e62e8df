//! The agent protocol as a peer sends it: a byte stream of frames, each
//! decoded into a message. Both ends read what the other wrote (the host
//! reads a guest it does not trust), so nothing may panic, allocate past the
//! frame limit, or decode into a message that does not survive a round trip.

#![no_main]

use ferry_protocol::{read_frame, write_frame, Message, ProtocolError, MAX_FRAME_LEN};
use libfuzzer_sys::fuzz_target;

/// A message must read back as itself once written.
fn round_trip(m: &Message) {
    let mut buf = Vec::new();
    match write_frame(&mut buf, m) {
        Ok(()) => {
            let back = read_frame(&mut &buf[..]).expect("a written frame reads back");
            assert_eq!(&back, m, "message changed across a round trip");
        }
        // Only a message too large for a frame may fail to be written; one
        // that was read from a frame fits in one.
        Err(e) => panic!("cannot re-encode a decoded message: {e}"),
    }
}

fuzz_target!(|data: &[u8]| {
    // The first byte decides how the rest is read: as a stream of frames, or
    // as one message body of type `data[1]`.
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode & 1 == 0 {
        let mut r = rest;
        loop {
            match read_frame(&mut r) {
                Ok(m) => round_trip(&m),
                Err(ProtocolError::Closed) => break,
                Err(ProtocolError::FrameTooLarge { size, max }) => {
                    assert!(size > max && max == u64::from(MAX_FRAME_LEN));
                    break;
                }
                // Malformed frames end the connection they arrived on.
                Err(_) => break,
            }
        }
    } else if let Some((&t, payload)) = rest.split_first() {
        if let Ok(m) = Message::decode(t, payload) {
            round_trip(&m);
            let (t2, p2) = m.encode();
            assert_eq!(t2, t, "type byte changed");
            // Canonical encodings only: decoding accepted no bytes that the
            // encoder would write differently. (A main command's environment
            // is a map: its order and duplicate names are not kept.)
            if !matches!(m, Message::StartMain(_)) {
                assert_eq!(p2, payload, "non-canonical payload accepted");
            }
        }
    }
});
