//! The sinks thread's way back to the worker: reads of history (answered later as [`ToSinks::Page`]) and
//! progress reports, on a channel the worker drains when its wake socket is readable.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::sync::mpsc;
use std::time::Duration;

use tokio::sync::oneshot;

use crate::api::{FromSinks, Page, PageError, Position, Report};

/// Longest wait for the worker to answer a read (it answers between batches; a turn is short).
const READ_TIMEOUT: Duration = Duration::from_secs(60);

pub(crate) struct Outbox {
    tx: mpsc::Sender<FromSinks>,
    /// Write end of the wake socket pair (non-blocking).
    wake: UnixStream,
    next_id: Cell<u64>,
    waiting: RefCell<HashMap<u64, oneshot::Sender<Result<Page, PageError>>>>,
}

impl Outbox {
    pub fn new(tx: mpsc::Sender<FromSinks>, wake: UnixStream) -> Outbox {
        Outbox {
            tx,
            wake,
            next_id: Cell::new(1),
            waiting: RefCell::new(HashMap::new()),
        }
    }

    fn send(&self, msg: FromSinks) -> bool {
        if self.tx.send(msg).is_err() {
            return false;
        }
        // A full socket already wakes the worker.
        let _ = (&self.wake).write(&[1]);
        true
    }

    /// Asks the worker for the rows of `labels` after `after`.
    pub async fn read(&self, sink: &str, labels: &[String], after: Position, max: u32) -> Result<Page, PageError> {
        let id = self.next_id.get();
        self.next_id.set(id + 1);
        let (tx, rx) = oneshot::channel();
        self.waiting.borrow_mut().insert(id, tx);
        let sent = self.send(FromSinks::Read {
            id,
            sink: sink.to_string(),
            labels: labels.to_vec(),
            after,
            max,
        });
        if !sent {
            self.waiting.borrow_mut().remove(&id);
            return Err(PageError::Failed("the relay worker is gone".into()));
        }
        let answer = tokio::time::timeout(READ_TIMEOUT, rx).await;
        self.waiting.borrow_mut().remove(&id);
        match answer {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(PageError::Failed("the read was dropped".into())),
            Err(_) => Err(PageError::Failed(
                "the relay worker did not answer a read in 60 s".into(),
            )),
        }
    }

    /// Hands the worker's answer to the read waiting for it (none: the sink was dropped meanwhile).
    pub fn answer(&self, id: u64, result: Result<Page, PageError>) {
        if let Some(tx) = self.waiting.borrow_mut().remove(&id) {
            let _ = tx.send(result);
        }
    }

    pub fn report(&self, report: Report) {
        self.send(FromSinks::Report(report));
    }
}
