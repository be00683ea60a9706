//! The replica's chunk decoder on untrusted bytes: header, checksum, decompression and
//! records. A frame with a valid checksum is rebuilt around the input so the decoder
//! past the CRC is reached too, with each body codec; and a zstd frame made of the
//! input, then damaged, reaches zstd's decoder past its frame header.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wire::chunk::{CheckedFrame, CHUNK_HEADER_LEN, FLAG_DEFLATE, FLAG_ZSTD};

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

/// `body` behind a well-formed header with a correct CRC.
fn framed(flags: u8, raw_len: u32, body: &[u8]) -> Vec<u8> {
    let mut frame = vec![0u8; CHUNK_HEADER_LEN];
    frame[..4].copy_from_slice(b"BRXC");
    frame[4] = 1;
    frame[5] = flags;
    frame[20..24].copy_from_slice(&raw_len.to_le_bytes());
    frame[24..28].copy_from_slice(&u32::try_from(body.len()).unwrap_or(0).to_le_bytes());
    frame.extend_from_slice(body);
    let crc = crc32c::crc32c_append(crc32c::crc32c(&frame[..28]), &frame[CHUNK_HEADER_LEN..]);
    frame[28..32].copy_from_slice(&crc.to_le_bytes());
    frame
}

fuzz_target!(|data: &[u8]| {
    decode(data);
    if data.len() < 4 || data.len() > (2 << 20) {
        return;
    }
    // Byte 0 picks the body, byte 1 the declared size, bytes 2-3 a byte to damage.
    let declared = u32::from(data[1]) * 1024 + 1;
    let body = &data[4..];
    match data[0] % 5 {
        0 => decode(&framed(0, u32::try_from(body.len()).unwrap_or(0), body)),
        1 => decode(&framed(FLAG_DEFLATE, declared, body)),
        2 => decode(&framed(FLAG_ZSTD, declared, body)),
        3 => decode(&framed(FLAG_DEFLATE | FLAG_ZSTD, declared, body)),
        _ => {
            let Ok(mut compressed) = zstd::bulk::compress(body, 1) else {
                return;
            };
            let at = usize::from(u16::from_le_bytes([data[2], data[3]]));
            if let Some(byte) = compressed.get_mut(at) {
                *byte ^= data[1] | 1;
            }
            let raw_len = u32::try_from(body.len()).unwrap_or(0);
            decode(&framed(FLAG_ZSTD, raw_len, &compressed));
            // The same frame under a smaller declared size must stop at that size.
            decode(&framed(FLAG_ZSTD, declared.min(raw_len), &compressed));
        }
    }
});
