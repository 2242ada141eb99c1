//! Fuzzes `novacron_migration::frame`: `decode` over a stream of frames, and the payload
//! parsers directly (with a correct checksum, so the fuzzer need not find CRCs).
#![no_main]

use libfuzzer_sys::fuzz_target;
use novacron_migration::frame::{decode, decode_payload, Frame, FrameType, Header};

/// Walks a decoded frame: page iteration, and decode-then-encode is the identity.
fn exercise(frame: &Frame, original: &[u8], scratch: &mut Vec<u8>) {
    assert_eq!(frame.encode(), original, "encoding is not canonical");
    if let Frame::Pages(batch) = frame {
        if let Ok(pages) = batch.pages(scratch) {
            let mut n = 0;
            for (_, data) in pages {
                n += 1;
                assert_eq!(data.as_bytes().len(), novacron_migration::frame::PAGE_SIZE);
            }
            assert_eq!(n, batch.len());
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let mut scratch = Vec::new();

    // 1. The input as a stream of frames.
    let mut rest = data;
    while let Ok((frame, used)) = decode(rest) {
        exercise(&frame, &rest[..used], &mut scratch);
        rest = &rest[used..];
    }

    // 2. First byte = frame type, the rest = a payload with a valid header and checksum.
    if let Some((&ty, payload)) = data.split_first() {
        let Ok(frame_type) = FrameType::try_from(ty % 12) else {
            return;
        };
        let header = Header {
            frame_type,
            flags: 0,
            payload_len: payload.len() as u32,
            crc: crc32c::crc32c(payload),
        };
        if let Ok(frame) = decode_payload(&header, payload) {
            let mut framed = Vec::with_capacity(16 + payload.len());
            framed.extend_from_slice(&novacron_migration::frame::MAGIC.to_le_bytes());
            framed.extend_from_slice(&[1, frame_type as u8, 0, 0]);
            framed.extend_from_slice(&header.payload_len.to_le_bytes());
            framed.extend_from_slice(&header.crc.to_le_bytes());
            framed.extend_from_slice(payload);
            exercise(&frame, &framed, &mut scratch);
        }
    }
});
