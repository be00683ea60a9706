//! The replica's chunk decoder on untrusted bytes: header, checksum, decompression and
//! records. A frame with a valid checksum is rebuilt around the input so the decoder
//! past the CRC is reached too.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wire::chunk::{CheckedFrame, CHUNK_HEADER_LEN};

fn decode(bytes: &[u8]) {
    if let Ok(frame) = CheckedFrame::check(bytes) {
        let mut scratch = Vec::new();
        if let Ok(records) = frame.records(&mut scratch) {
            for record in records {
                if record.is_err() {
                    break;
                }
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    decode(data);
    // Same bytes as a body behind a well-formed header with a correct CRC.
    if data.len() < 2 || data.len() > (2 << 20) {
        return;
    }
    let deflate = data[0] & 1;
    let raw_len = u32::from(data[1]) * 1024 + 1;
    let body = &data[2..];
    let mut frame = vec![0u8; CHUNK_HEADER_LEN];
    frame[..4].copy_from_slice(b"BRXC");
    frame[4] = 1;
    frame[5] = deflate;
    let raw_len = if deflate == 1 { raw_len } else { u32::try_from(body.len()).unwrap_or(0) };
    frame[20..24].copy_from_slice(&raw_len.to_le_bytes());
    frame[24..28].copy_from_slice(&u32::try_from(body.len()).unwrap_or(0).to_le_bytes());
    frame.extend_from_slice(body);
    let crc = crc32c::crc32c_append(crc32c::crc32c(&frame[..28]), &frame[CHUNK_HEADER_LEN..]);
    frame[28..32].copy_from_slice(&crc.to_le_bytes());
    decode(&frame);
});
