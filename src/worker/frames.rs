//! The frames of one decoded batch, held in memory up to a bound and
//! spilled to a temporary file beyond it.
//!
//! The reorder buffer hands a committed transaction to the plugin all at
//! once, so a 10,000,000-row transaction arrives as 10,000,000 frames in one
//! call. Keeping them all in memory would take gigabytes; here at most
//! [`MEMORY_BYTES`] stay in memory and the rest go, in order, to a file in
//! the data directory's `base/pgsql_tmp` (which Postgres empties at every
//! start, so a crash leaves nothing behind). The file is plain Rust I/O on
//! the worker's main thread.
//!
//! Frames are grouped by transaction ([`Span`]): the applier can apply the
//! whole batch at once, or one transaction at a time when the batch failed.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::PathBuf;

/// Bytes of frames kept in memory before spilling.
pub const MEMORY_BYTES: usize = 16 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Location {
    /// Index into the in-memory frames.
    Memory(usize),
    /// Byte offset into the spill file.
    File(u64),
}

/// The frames of one transaction (from its begin frame), or of a run of
/// frames outside any transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    start: Location,
    pub frames: usize,
}

struct Spill {
    path: PathBuf,
    writer: BufWriter<File>,
    /// Bytes written so far (the next frame's offset).
    written: u64,
}

#[derive(Default)]
pub struct FrameBuffer {
    memory: Vec<(u64, Vec<u8>)>,
    memory_bytes: usize,
    spill: Option<Spill>,
    spans: Vec<Span>,
    total: usize,
    /// The first spill I/O error; the batch is then incomplete.
    failed: Option<String>,
}

impl FrameBuffer {
    /// Appends one frame; `begins` says it opens a transaction.
    pub fn push(&mut self, lsn: u64, frame: &[u8], begins: bool) {
        if self.failed.is_some() {
            return;
        }
        if self.memory_bytes + frame.len() <= MEMORY_BYTES && self.spill.is_none() {
            self.note_span(Location::Memory(self.memory.len()), begins);
            self.memory_bytes += frame.len();
            self.memory.push((lsn, frame.to_vec()));
            return;
        }
        if let Err(e) = self.spill_one(lsn, frame, begins) {
            self.failed = Some(format!("could not write decoded changes to a temporary file: {e}"));
        }
    }

    fn spill_one(&mut self, lsn: u64, frame: &[u8], begins: bool) -> std::io::Result<()> {
        if self.spill.is_none() {
            let dir = PathBuf::from("base/pgsql_tmp");
            std::fs::create_dir_all(&dir)?;
            let path = dir.join(format!("pgsql_tmp_changerelay.{}.spill", std::process::id()));
            let file = std::fs::OpenOptions::new()
                .create(true)
                .truncate(true)
                .read(true)
                .write(true)
                .open(&path)?;
            self.spill = Some(Spill {
                path,
                writer: BufWriter::with_capacity(1 << 20, file),
                written: 0,
            });
        }
        let offset = self.spill.as_ref().map_or(0, |s| s.written);
        self.note_span(Location::File(offset), begins);
        let Some(spill) = self.spill.as_mut() else {
            return Ok(());
        };
        spill.writer.write_all(&lsn.to_le_bytes())?;
        spill.writer.write_all(&(frame.len() as u64).to_le_bytes())?;
        spill.writer.write_all(frame)?;
        spill.written += 16 + frame.len() as u64;
        Ok(())
    }

    fn note_span(&mut self, at: Location, begins: bool) {
        self.total += 1;
        match self.spans.last_mut() {
            Some(last) if !begins => last.frames += 1,
            _ => self.spans.push(Span { start: at, frames: 1 }),
        }
    }

    pub fn len(&self) -> usize {
        self.total
    }

    pub fn is_empty(&self) -> bool {
        self.total == 0
    }

    /// Bytes written to the spill file (0: everything fitted in memory).
    pub fn spilled_bytes(&self) -> u64 {
        self.spill.as_ref().map_or(0, |s| s.written)
    }

    /// The batch's transactions, in commit order.
    pub fn spans(&self) -> &[Span] {
        &self.spans
    }

    /// Why the batch is incomplete, if it is.
    pub fn failure(&self) -> Option<&str> {
        self.failed.as_deref()
    }

    /// Calls `f` with every frame of `spans` (consecutive, in order).
    pub fn for_each<E>(&mut self, spans: &[Span], mut f: impl FnMut(u64, &[u8]) -> Result<(), E>) -> Result<(), E>
    where
        E: From<String>,
    {
        let Some(first) = spans.first() else { return Ok(()) };
        let mut left: usize = spans.iter().map(|s| s.frames).sum();
        let mut at = first.start;
        if let Location::Memory(mut i) = at {
            while left > 0 && i < self.memory.len() {
                let (lsn, frame) = &self.memory[i];
                f(*lsn, frame)?;
                i += 1;
                left -= 1;
            }
            at = Location::File(0);
        }
        if left == 0 {
            return Ok(());
        }
        let Location::File(offset) = at else { return Ok(()) };
        let mut reader = self
            .file_reader(offset)
            .map_err(|e| E::from(format!("could not read spilled changes: {e}")))?;
        let mut frame = Vec::new();
        while left > 0 {
            let lsn = read_u64(&mut reader).map_err(|e| E::from(format!("could not read spilled changes: {e}")))?;
            let len = read_u64(&mut reader).map_err(|e| E::from(format!("could not read spilled changes: {e}")))?;
            frame.resize(len as usize, 0);
            reader
                .read_exact(&mut frame)
                .map_err(|e| E::from(format!("could not read spilled changes: {e}")))?;
            f(lsn, &frame)?;
            left -= 1;
        }
        Ok(())
    }

    fn file_reader(&mut self, offset: u64) -> std::io::Result<BufReader<File>> {
        let Some(spill) = self.spill.as_mut() else {
            return Err(std::io::Error::other("no spilled changes"));
        };
        spill.writer.flush()?;
        let mut file = File::open(&spill.path)?;
        file.seek(SeekFrom::Start(offset))?;
        Ok(BufReader::with_capacity(1 << 20, file))
    }
}

fn read_u64(r: &mut impl Read) -> std::io::Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_le_bytes(b))
}

impl Drop for FrameBuffer {
    fn drop(&mut self) {
        if let Some(spill) = self.spill.take() {
            drop(spill.writer);
            let _ = std::fs::remove_file(&spill.path);
        }
    }
}
