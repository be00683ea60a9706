#![allow(clippy::unwrap_used)]
use super::*;
use proptest::prelude::*;
use std::hash::{DefaultHasher, Hasher};
use std::os::unix::fs::MetadataExt;

const HOLE_ZERO: u32 = NBD_STATE_HOLE | NBD_STATE_ZERO;
const ZERO_MODE: ZeroMode = ZeroMode {
    may_trim: true,
    fast_only: false,
};

/// An in-memory base. `allocation` reports each `granularity` chunk as a hole when
/// it is all zeroes, and answers at most `max_extents` extents (so the overlay meets
/// short answers). A `slow` base takes a while to read, like a real one, which
/// widens the windows concurrent read-modify-writes race in.
struct MemBase {
    data: Vec<u8>,
    granularity: u64,
    max_extents: usize,
    slow: bool,
}

impl MemBase {
    fn flags_at(&self, at: u64) -> u32 {
        let start = at / self.granularity * self.granularity;
        let end = (start + self.granularity).min(self.size());
        if self.data[idx(start)..idx(end)].iter().all(|&b| b == 0) {
            HOLE_ZERO
        } else {
            0
        }
    }
}

impl OverlayBase for MemBase {
    fn size(&self) -> u64 {
        len64(self.data.len())
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let start = idx(offset);
        let source = start
            .checked_add(buf.len())
            .and_then(|end| self.data.get(start..end))
            .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
        if self.slow {
            std::thread::sleep(std::time::Duration::from_micros(200));
        }
        buf.copy_from_slice(source);
        Ok(())
    }

    fn allocation(&self, offset: u64, len: u64) -> io::Result<Vec<Extent>> {
        assert!(len > 0 && offset + len <= self.size(), "{offset} + {len}");
        let end = offset + len;
        let mut extents = Vec::new();
        let mut at = offset;
        while at < end {
            let stop = ((at / self.granularity + 1) * self.granularity).min(end);
            let flags = self.flags_at(at);
            if extents.len() == self.max_extents
                && extents.last().is_some_and(|e: &Extent| e.flags != flags)
            {
                break;
            }
            push_extent(&mut extents, stop - at, flags);
            at = stop;
        }
        Ok(extents)
    }
}

/// A base read from a file opened read-only.
struct FileBase {
    file: File,
    size: u64,
}

impl OverlayBase for FileBase {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }
    fn allocation(&self, offset: u64, len: u64) -> io::Result<Vec<Extent>> {
        Ok(vec![Extent {
            length: len.min(self.size - offset),
            flags: 0,
        }])
    }
}

/// Base content: 256-byte chunks, each all zeroes or a pattern, chosen by `seed`.
fn base_content(size: usize, seed: u64) -> Vec<u8> {
    (0..size)
        .map(|i| {
            let chunk = i / 256;
            if (seed >> (chunk % 64)) & 1 == 0 {
                0
            } else {
                u8::try_from((i * 7 + chunk) % 255).unwrap() + 1
            }
        })
        .collect()
}

fn mem_overlay(
    dir: &tempfile::TempDir,
    data: Vec<u8>,
    block: u32,
    max_extents: usize,
) -> (Arc<MemBase>, Overlay) {
    let base = Arc::new(MemBase {
        data,
        granularity: 256,
        max_extents,
        slow: false,
    });
    let overlay = Overlay::create(base.clone(), &dir.path().join("overlay"), block).unwrap();
    (base, overlay)
}

/// The reference: what the disk reads and which blocks the overlay holds.
struct Model {
    current: Vec<u8>,
    states: Vec<BlockState>,
    block: usize,
}

impl Model {
    fn new(base: &[u8], block: u32) -> Self {
        let block = idx(u64::from(block));
        Model {
            current: base.to_vec(),
            states: vec![BlockState::Base; base.len().div_ceil(block)],
            block,
        }
    }

    fn bounds(&self, block: usize) -> (usize, usize) {
        let start = block * self.block;
        (start, (start + self.block).min(self.current.len()))
    }

    fn touched(&self, offset: usize, len: usize) -> std::ops::RangeInclusive<usize> {
        if len == 0 {
            #[allow(clippy::reversed_empty_ranges)]
            return 1..=0;
        }
        offset / self.block..=(offset + len - 1) / self.block
    }

    fn write(&mut self, offset: usize, data: &[u8]) {
        self.current[offset..offset + data.len()].copy_from_slice(data);
        for block in self.touched(offset, data.len()) {
            self.states[block] = BlockState::Data;
        }
    }

    fn zero(&mut self, offset: usize, len: usize) {
        self.current[offset..offset + len].fill(0);
        for block in self.touched(offset, len) {
            let (start, end) = self.bounds(block);
            if offset <= start && end <= offset + len {
                self.states[block] = BlockState::Zero;
            } else if self.states[block] != BlockState::Zero {
                self.states[block] = BlockState::Data;
            }
        }
    }

    fn extents(&self) -> Vec<OverlayExtent> {
        let mut extents: Vec<OverlayExtent> = Vec::new();
        for (block, &state) in self.states.iter().enumerate() {
            if state == BlockState::Base {
                continue;
            }
            let (start, end) = self.bounds(block);
            let zero = state == BlockState::Zero;
            match extents.last_mut() {
                Some(last) if last.zero == zero && last.offset + last.length == len64(start) => {
                    last.length += len64(end - start);
                }
                _ => extents.push(OverlayExtent {
                    offset: len64(start),
                    length: len64(end - start),
                    zero,
                }),
            }
        }
        extents
    }
}

/// Checks the shape and truth of `allocation(offset, len)` against the model.
fn check_allocation(overlay: &Overlay, base: &MemBase, model: &Model, offset: u64, len: u64) {
    let extents = overlay.allocation(offset, len).unwrap();
    if len == 0 {
        assert!(extents.is_empty());
        return;
    }
    assert!(!extents.is_empty(), "no extent for {offset}+{len}");
    let mut at = offset;
    for extent in &extents {
        assert!(extent.length > 0);
        let stop = at + extent.length;
        assert!(stop <= offset + len, "{extents:?} past {offset}+{len}");
        for byte in at..stop {
            let expected = match model.states[idx(byte) / model.block] {
                BlockState::Data => 0,
                BlockState::Zero => HOLE_ZERO,
                BlockState::Base => base.flags_at(byte),
            };
            assert_eq!(extent.flags, expected, "byte {byte} in {extents:?}");
            if extent.flags & NBD_STATE_ZERO != 0 {
                assert_eq!(model.current[idx(byte)], 0, "byte {byte}");
            }
        }
        at = stop;
    }
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    Read,
    Write,
    Zero,
    Trim,
    Allocation,
    Flush,
}

fn kind() -> impl Strategy<Value = Kind> {
    prop_oneof![
        2 => Just(Kind::Read),
        4 => Just(Kind::Write),
        2 => Just(Kind::Zero),
        1 => Just(Kind::Trim),
        2 => Just(Kind::Allocation),
        1 => Just(Kind::Flush),
    ]
}

/// An operation's range: anywhere, up to four blocks long; `aligned` snaps it to
/// block boundaries (the end may still be the disk's unaligned end).
fn resolve(size: u64, block: u64, a: u64, b: u64, aligned: bool) -> (u64, u64) {
    let mut offset = a % (size + 1);
    if aligned {
        offset = offset / block * block;
    }
    let room = (size - offset).min(4 * block);
    let mut len = b % (room + 1);
    if aligned {
        len = (len.div_ceil(block) * block).min(size - offset);
    }
    (offset, len)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn behaves_like_the_model(
        block in prop_oneof![Just(512u32), Just(1024), Just(4096)],
        blocks in 1u64..20,
        tail in 0u64..4096,
        seed in any::<u64>(),
        max_extents in prop_oneof![Just(1usize), Just(3), Just(1000)],
        ops in proptest::collection::vec(
            (kind(), any::<u64>(), any::<u64>(), any::<bool>(), any::<u8>()),
            1..40,
        ),
    ) {
        let size = blocks * u64::from(block) + tail % u64::from(block);
        let dir = tempfile::tempdir().unwrap();
        let data = base_content(idx(size), seed);
        let (base, overlay) = mem_overlay(&dir, data.clone(), block, max_extents);
        let mut model = Model::new(&data, block);
        let block64 = u64::from(block);
        for (kind, a, b, aligned, fill) in ops {
            let (offset, len) = resolve(size, block64, a, b, aligned);
            let (at, n) = (idx(offset), idx(len));
            match kind {
                Kind::Read => {
                    let mut buf = vec![0xee; n];
                    overlay.read_at(&mut buf, offset).unwrap();
                    prop_assert_eq!(&buf[..], &model.current[at..at + n]);
                }
                Kind::Write => {
                    let buf: Vec<u8> = (0..n)
                        .map(|i| fill.wrapping_add(u8::try_from(i % 199).unwrap()))
                        .collect();
                    overlay.write_at(&buf, offset, fill % 5 == 0).unwrap();
                    model.write(at, &buf);
                }
                Kind::Zero => {
                    let mode = ZeroMode { may_trim: fill % 2 == 0, fast_only: fill % 3 == 0 };
                    overlay.write_zeroes(offset, len, mode, fill % 5 == 0).unwrap();
                    model.zero(at, n);
                }
                Kind::Trim => {
                    overlay.trim(offset, len, fill % 5 == 0).unwrap();
                    model.zero(at, n);
                }
                Kind::Allocation => check_allocation(&overlay, &base, &model, offset, len),
                Kind::Flush => overlay.flush().unwrap(),
            }
        }
        let mut all = vec![0xee; idx(size)];
        overlay.read_at(&mut all, 0).unwrap();
        prop_assert_eq!(&all, &model.current);
        prop_assert_eq!(overlay.extents(), model.extents());
        let held: u64 = model.extents().iter().map(|e| e.length).sum();
        prop_assert_eq!(overlay.held_bytes(), held);
        check_allocation(&overlay, &base, &model, 0, size);
        // Whole-disk allocation, asked again from where each answer stopped.
        let mut at = 0;
        while at < size {
            let extents = overlay.allocation(at, size - at).unwrap();
            at += extents.iter().map(|e| e.length).sum::<u64>();
        }
        prop_assert_eq!(&base.data, &data);
    }

    #[test]
    fn any_range_is_checked_without_panicking(offset in any::<u64>(), len in any::<u64>()) {
        let dir = tempfile::tempdir().unwrap();
        let (_, overlay) = mem_overlay(&dir, vec![1; 5000], 512, 10);
        let inside = offset.checked_add(len).is_some_and(|end| end <= 5000);
        prop_assert_eq!(overlay.allocation(offset, len).is_ok(), inside);
        prop_assert_eq!(overlay.write_zeroes(offset, len, ZERO_MODE, false).is_ok(), inside);
        prop_assert_eq!(overlay.trim(offset, len, false).is_ok(), inside);
        prop_assert_eq!(overlay.cache(offset, len).is_ok(), inside);
        let short = len % 64;
        let inside = offset.checked_add(short).is_some_and(|end| end <= 5000);
        let mut buf = vec![0; idx(short)];
        prop_assert_eq!(overlay.read_at(&mut buf, offset).is_ok(), inside);
        prop_assert_eq!(overlay.write_at(&buf, offset, false).is_ok(), inside);
    }
}

#[test]
fn create_checks_its_arguments_and_discard_removes_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let base = Arc::new(MemBase {
        data: vec![3; 10_000],
        granularity: 256,
        max_extents: 10,
        slow: false,
    });
    for bad in [0, 256, 3000, 2 << 20] {
        let err = Overlay::create(base.clone(), &dir.path().join("x"), bad).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{bad}");
    }
    assert!(!dir.path().join("x").exists());
    let path = dir.path().join("overlay");
    let overlay = Overlay::create(base.clone(), &path, 4096).unwrap();
    assert_eq!(overlay.path(), path);
    assert_eq!(overlay.size(), 10_000);
    let meta = std::fs::metadata(&path).unwrap();
    assert_eq!(meta.len(), 10_000);
    assert_eq!(meta.mode() & 0o777, 0o600);
    assert_eq!(meta.blocks(), 0, "created sparse");
    // The path is taken: a second overlay there is refused.
    let err = Overlay::create(base.clone(), &path, 4096).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
    drop(overlay);
    assert!(path.exists(), "drop keeps the file");
    std::fs::remove_file(&path).unwrap();
    let overlay = Overlay::create(base, &path, 4096).unwrap();
    overlay.discard().unwrap();
    assert!(!path.exists());
}

#[test]
fn an_empty_base_makes_an_empty_overlay() {
    let dir = tempfile::tempdir().unwrap();
    let (_, overlay) = mem_overlay(&dir, Vec::new(), 4096, 10);
    overlay.read_at(&mut [], 0).unwrap();
    overlay.write_at(&[], 0, true).unwrap();
    overlay.write_zeroes(0, 0, ZERO_MODE, false).unwrap();
    overlay.trim(0, 0, false).unwrap();
    assert!(overlay.allocation(0, 0).unwrap().is_empty());
    assert!(overlay.allocation(0, 1).is_err());
    assert!(overlay.write_at(&[1], 0, false).is_err());
    assert!(overlay.extents().is_empty());
    assert_eq!(overlay.held_bytes(), 0);
}

#[test]
fn advertises_a_writable_trimmable_device() {
    let dir = tempfile::tempdir().unwrap();
    let (_, overlay) = mem_overlay(&dir, vec![0; 8192], 4096, 10);
    assert!(!overlay.read_only());
    assert!(overlay.can_trim());
    assert!(overlay.can_fast_zero());
    assert!(overlay.can_multi_conn());
    assert_eq!(
        overlay.block_size(),
        BlockSizeLimits {
            minimum: 1,
            preferred: 4096,
            maximum: 32 << 20
        }
    );
    assert_eq!(overlay.overlay_block_size(), 4096);
    overlay.cache(0, 8192).unwrap();
}

#[test]
fn extents_and_held_bytes_follow_the_operations() {
    let dir = tempfile::tempdir().unwrap();
    // Five blocks of 512 and a 100-byte sixth.
    let (base, overlay) = mem_overlay(&dir, vec![9; 2660], 512, 10);
    assert!(overlay.extents().is_empty());
    assert_eq!(overlay.held_bytes(), 0);
    overlay.write_at(b"abc", 510, false).unwrap(); // blocks 0 and 1, partially
    overlay.write_zeroes(1024, 1024, ZERO_MODE, false).unwrap(); // blocks 2 and 3, whole
    overlay.trim(2560, 100, false).unwrap(); // the short last block, whole
    let expected = vec![
        OverlayExtent {
            offset: 0,
            length: 1024,
            zero: false,
        },
        OverlayExtent {
            offset: 1024,
            length: 1024,
            zero: true,
        },
        OverlayExtent {
            offset: 2560,
            length: 100,
            zero: true,
        },
    ];
    assert_eq!(overlay.extents(), expected);
    assert_eq!(overlay.held_bytes(), 2148);
    let mut buf = vec![0; 2660];
    overlay.read_at(&mut buf, 0).unwrap();
    assert!(buf[..510].iter().all(|&b| b == 9));
    assert_eq!(&buf[510..513], b"abc");
    assert!(buf[513..1024].iter().all(|&b| b == 9));
    assert!(buf[1024..2048].iter().all(|&b| b == 0));
    assert!(buf[2048..2560].iter().all(|&b| b == 9));
    assert!(buf[2560..].iter().all(|&b| b == 0));
    // Allocation: data, hole, the base's data, hole.
    assert_eq!(
        overlay.allocation(0, 2660).unwrap(),
        vec![
            Extent {
                length: 1024,
                flags: 0
            },
            Extent {
                length: 1024,
                flags: HOLE_ZERO
            },
            Extent {
                length: 512,
                flags: 0
            },
            Extent {
                length: 100,
                flags: HOLE_ZERO
            },
        ]
    );
    // A partial zeroing of a Zero block keeps it Zero; of a Data block, Data.
    overlay.write_zeroes(1100, 10, ZERO_MODE, true).unwrap();
    overlay.write_zeroes(0, 10, ZERO_MODE, false).unwrap();
    assert_eq!(overlay.extents(), expected);
    // Writing into a Zero block makes it Data, zeroes around the write.
    overlay.write_at(b"z", 1500, false).unwrap();
    overlay.read_at(&mut buf[..512], 1024).unwrap();
    assert!(buf[..512]
        .iter()
        .enumerate()
        .all(|(i, &b)| b == if i == 476 { b'z' } else { 0 }));
    assert_eq!(
        overlay.extents()[..2],
        [
            OverlayExtent {
                offset: 0,
                length: 1536,
                zero: false,
            },
            OverlayExtent {
                offset: 1536,
                length: 512,
                zero: true,
            },
        ]
    );
    assert_eq!(base.data, vec![9; 2660]);
}

#[test]
fn whole_block_zeroing_punches_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let (_, overlay) = mem_overlay(&dir, vec![1; 4 << 20], 4096, 10);
    overlay.write_at(&vec![2; 2 << 20], 1 << 20, true).unwrap();
    let written = std::fs::metadata(overlay.path()).unwrap().blocks();
    assert!(written >= 4096, "{written} sectors allocated");
    overlay.trim(1 << 20, 2 << 20, false).unwrap();
    let after = std::fs::metadata(overlay.path()).unwrap().blocks();
    if after >= written {
        eprintln!("the filesystem cannot punch holes; skipping the space check");
    }
    let mut buf = vec![7; 2 << 20];
    overlay.read_at(&mut buf, 1 << 20).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
    assert_eq!(overlay.held_bytes(), 2 << 20);
}

#[test]
fn allocation_stops_where_a_short_base_answer_stops() {
    let dir = tempfile::tempdir().unwrap();
    // Chunks of 256: data, zero, data, zero...; the base answers one extent at a time.
    let data: Vec<u8> = (0..4096).map(|i| u8::from((i / 256) % 2 == 0)).collect();
    let (_, overlay) = mem_overlay(&dir, data, 512, 1);
    overlay.write_at(&[5; 512], 1024, false).unwrap();
    assert_eq!(
        overlay.allocation(0, 4096).unwrap(),
        vec![Extent {
            length: 256,
            flags: 0
        }]
    );
    // Hole (base), data (overlay) and the base's data merge; the base's one-extent
    // answer for blocks 3 and 4 ends the reply there.
    assert_eq!(
        overlay.allocation(768, 2048).unwrap(),
        vec![
            Extent {
                length: 256,
                flags: HOLE_ZERO
            },
            Extent {
                length: 768,
                flags: 0
            },
        ]
    );
}

fn file_checksum(path: &Path) -> u64 {
    let mut hasher = DefaultHasher::new();
    hasher.write(&std::fs::read(path).unwrap());
    hasher.finish()
}

#[test]
fn the_base_file_is_never_written() {
    let dir = tempfile::tempdir().unwrap();
    let base_path = dir.path().join("base.img");
    std::fs::write(&base_path, base_content(300_000, 0xdead_beef_f00d)).unwrap();
    let before = file_checksum(&base_path);
    let base = Arc::new(FileBase {
        file: File::open(&base_path).unwrap(),
        size: 300_000,
    });
    let overlay = Overlay::create(base, &dir.path().join("overlay"), 4096).unwrap();
    let mut model = Model::new(&std::fs::read(&base_path).unwrap(), 4096);
    for step in 0..200u64 {
        let offset = (step * 7919) % 290_000;
        let len = (step * 104_729) % 10_000;
        match step % 4 {
            0 | 1 => {
                let buf = vec![u8::try_from(step % 256).unwrap(); idx(len)];
                overlay.write_at(&buf, offset, false).unwrap();
                model.write(idx(offset), &buf);
            }
            2 => {
                overlay.write_zeroes(offset, len, ZERO_MODE, false).unwrap();
                model.zero(idx(offset), idx(len));
            }
            _ => {
                overlay.trim(offset, len, false).unwrap();
                model.zero(idx(offset), idx(len));
            }
        }
    }
    overlay.flush().unwrap();
    let mut all = vec![0; 300_000];
    overlay.read_at(&mut all, 0).unwrap();
    assert_eq!(all, model.current);
    assert_eq!(overlay.extents(), model.extents());
    assert_eq!(file_checksum(&base_path), before);
}

/// Writers own interleaved, unaligned 37-byte chunks of the same blocks (every
/// ninth chunk belongs to nobody) and start together on a slow base, so their
/// read-modify-writes of a block race; without the block locks writes get lost.
/// A reader checks meanwhile that nobody's chunks always read as the base, which
/// fails if a block is published as Data before its data is written.
#[test]
fn concurrent_writes_to_one_block_keep_each_other() {
    const CHUNK: usize = 37;
    const WRITERS: usize = 8;
    const ROUNDS: usize = 6;
    const SIZE: usize = 64 * 512;
    let value = |writer: usize, round: usize| u8::try_from(writer * 31 + round * 7 + 1).unwrap();
    let owner = |byte: usize| {
        let chunk = byte / CHUNK;
        (chunk < SIZE / CHUNK && chunk % (WRITERS + 1) < WRITERS).then_some(chunk % (WRITERS + 1))
    };
    let base: Vec<u8> = (0..SIZE)
        .map(|i| u8::try_from(i % 251).unwrap() | 0x80)
        .collect();
    for iteration in 0..16 {
        let dir = tempfile::tempdir().unwrap();
        let slow = Arc::new(MemBase {
            data: base.clone(),
            granularity: 256,
            max_extents: 10,
            slow: true,
        });
        let overlay = Overlay::create(slow, &dir.path().join("overlay"), 512).unwrap();
        let done = std::sync::atomic::AtomicBool::new(false);
        let start = std::sync::Barrier::new(WRITERS);
        std::thread::scope(|scope| {
            let reader = scope.spawn(|| {
                let mut buf = vec![0; SIZE];
                let mut reads = 0;
                while !done.load(Ordering::Acquire) || reads == 0 {
                    overlay.read_at(&mut buf, 0).unwrap();
                    for (byte, (&got, &want)) in buf.iter().zip(&base).enumerate() {
                        if owner(byte).is_none() {
                            assert_eq!(got, want, "unowned byte {byte}");
                        }
                    }
                    reads += 1;
                }
            });
            let writers: Vec<_> = (0..WRITERS)
                .map(|writer| {
                    let overlay = &overlay;
                    let start = &start;
                    scope.spawn(move || {
                        // Together, so the first writes of each block race.
                        start.wait();
                        for round in 0..ROUNDS {
                            let chunks = (writer..SIZE / CHUNK).step_by(WRITERS + 1);
                            for chunk in chunks {
                                let offset = len64(chunk * CHUNK);
                                if round % 4 == 2 {
                                    let len = len64(CHUNK);
                                    overlay.write_zeroes(offset, len, ZERO_MODE, false).unwrap();
                                } else {
                                    let data = [value(writer, round); CHUNK];
                                    overlay.write_at(&data, offset, false).unwrap();
                                }
                            }
                        }
                    })
                })
                .collect();
            for writer in writers {
                writer.join().unwrap();
            }
            done.store(true, Ordering::Release);
            reader.join().unwrap();
        });
        let mut buf = vec![0; SIZE];
        overlay.read_at(&mut buf, 0).unwrap();
        for (byte, &got) in buf.iter().enumerate() {
            let want = owner(byte).map_or(base[byte], |writer| value(writer, ROUNDS - 1));
            assert_eq!(got, want, "iteration {iteration}, byte {byte}");
        }
    }
}
