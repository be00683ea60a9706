//! The unsynced state of one file: the pages written since its last sync and its
//! size, overlaid on the backing file.
//!
//! Contract: the backing file is never written except by [`FileCache::persist`].
//! Invariant: `floor <= size`, and only backing bytes below `floor` are visible (a
//! truncation below the backing file's end hides the rest until the next sync,
//! which then truncates the backing file too).

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

/// Cache granularity.
pub const PAGE: u64 = 4096;
const PAGE_LEN: usize = 4096;

/// One cached page: written bytes, or zeroes (a punched or zeroed range).
#[derive(Debug)]
enum Page {
    Data(Box<[u8; PAGE_LEN]>),
    Zero,
}

/// What a file holds that its backing file does not.
#[derive(Debug)]
pub struct FileCache {
    pages: BTreeMap<u64, Page>,
    size: u64,
    floor: u64,
    backing_len: u64,
}

impl FileCache {
    /// A clean cache over a backing file of `backing_len` bytes.
    pub fn new(backing_len: u64) -> FileCache {
        FileCache {
            pages: BTreeMap::new(),
            size: backing_len,
            floor: backing_len,
            backing_len,
        }
    }

    /// The size readers see.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// True if a sync would change the backing file.
    pub fn is_dirty(&self) -> bool {
        !self.pages.is_empty() || self.size != self.backing_len || self.floor != self.backing_len
    }

    /// Bytes of cached pages, which a power cut loses.
    pub fn unsynced_bytes(&self) -> u64 {
        self.pages.len() as u64 * PAGE
    }

    /// Reads `len` bytes at `offset`, clipped to the size.
    pub fn read(&self, backing: &File, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        let end = self.size.min(offset.saturating_add(len as u64));
        if offset >= end {
            return Ok(Vec::new());
        }
        let mut out = vec![0u8; to_usize(end - offset)];
        for span in spans(offset, end) {
            let dest = &mut out[to_usize(span.at - offset)..][..span.len];
            match self.pages.get(&span.index) {
                Some(Page::Data(page)) => dest.copy_from_slice(&page[span.in_page..][..span.len]),
                Some(Page::Zero) => dest.fill(0),
                None => self.read_backing(backing, span.at, dest)?,
            }
        }
        Ok(out)
    }

    /// Writes `data` at `offset` into the cache, extending the size if needed.
    pub fn write(&mut self, backing: &File, offset: u64, data: &[u8]) -> io::Result<()> {
        let end = offset + data.len() as u64;
        for span in spans(offset, end) {
            let page = self.page_mut(backing, span.index)?;
            page[span.in_page..][..span.len]
                .copy_from_slice(&data[to_usize(span.at - offset)..][..span.len]);
        }
        self.size = self.size.max(end);
        Ok(())
    }

    /// Makes `offset..offset+len` read as zeroes (whole pages become zero pages).
    pub fn zero(&mut self, backing: &File, offset: u64, len: u64) -> io::Result<()> {
        for span in spans(offset, offset + len) {
            if span.len == PAGE_LEN {
                self.pages.insert(span.index, Page::Zero);
            } else {
                self.page_mut(backing, span.index)?[span.in_page..][..span.len].fill(0);
            }
        }
        Ok(())
    }

    /// Sets the size: a shrink drops the pages beyond and hides the backing bytes
    /// beyond; a growth reads as zeroes.
    pub fn set_size(&mut self, backing: &File, size: u64) -> io::Result<()> {
        if size < self.size {
            if size % PAGE != 0 {
                let in_page = to_usize(size % PAGE);
                self.page_mut(backing, size / PAGE)?[in_page..].fill(0);
            }
            let first_gone = size.div_ceil(PAGE);
            self.pages.split_off(&first_gone);
            self.floor = self.floor.min(size);
        }
        self.size = size;
        Ok(())
    }

    /// Writes everything to the backing file and syncs it; the cache is clean after.
    /// Returns the bytes written.
    pub fn persist(&mut self, backing: &File) -> io::Result<u64> {
        if self.floor < self.backing_len {
            backing.set_len(self.floor)?;
        }
        let mut written = 0;
        let zeroes = [0u8; PAGE_LEN];
        for (&index, page) in &self.pages {
            let at = index * PAGE;
            let len = to_usize(PAGE.min(self.size.saturating_sub(at)));
            let bytes = match page {
                Page::Data(page) => &page[..len],
                Page::Zero => &zeroes[..len],
            };
            backing.write_all_at(bytes, at)?;
            written += len as u64;
        }
        if backing.metadata()?.len() != self.size {
            backing.set_len(self.size)?;
        }
        backing.sync_data()?;
        self.pages.clear();
        self.backing_len = self.size;
        self.floor = self.size;
        Ok(written)
    }

    fn page_mut(&mut self, backing: &File, index: u64) -> io::Result<&mut [u8; PAGE_LEN]> {
        if !matches!(self.pages.get(&index), Some(Page::Data(_))) {
            let mut page = Box::new([0u8; PAGE_LEN]);
            if !self.pages.contains_key(&index) {
                self.read_backing(backing, index * PAGE, &mut page[..])?;
            }
            self.pages.insert(index, Page::Data(page));
        }
        match self.pages.get_mut(&index) {
            Some(Page::Data(page)) => Ok(page),
            _ => unreachable!("the page was just made a data page"),
        }
    }

    /// Fills `dest` with the backing bytes at `at`, zeroes at and beyond the floor.
    fn read_backing(&self, backing: &File, at: u64, dest: &mut [u8]) -> io::Result<()> {
        dest.fill(0);
        let visible = to_usize(self.floor.saturating_sub(at).min(dest.len() as u64));
        let mut done = 0;
        while done < visible {
            match backing.read_at(&mut dest[done..visible], at + done as u64)? {
                0 => break,
                n => done += n,
            }
        }
        Ok(())
    }
}

/// The part of one page a byte range covers.
struct Span {
    /// Offset in the file.
    at: u64,
    index: u64,
    in_page: usize,
    len: usize,
}

/// The pieces of `start..end`, page by page.
fn spans(start: u64, end: u64) -> impl Iterator<Item = Span> {
    let mut at = start;
    std::iter::from_fn(move || {
        if at >= end {
            return None;
        }
        let step = (PAGE - at % PAGE).min(end - at);
        let span = Span {
            at,
            index: at / PAGE,
            in_page: to_usize(at % PAGE),
            len: to_usize(step),
        };
        at += step;
        Some(span)
    })
}

fn to_usize(n: u64) -> usize {
    usize::try_from(n).expect("a page-bounded length fits usize")
}
