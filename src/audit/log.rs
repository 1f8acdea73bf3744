//! The sidecar's audit chain: `audit.redb` in its data directory (separate from
//! `sidecar.redb`, so auditing never contends with decisions).
//!
//! Events are sent over a bounded channel to one writer thread, which links them in order
//! (seq, prev_hash, hash) and appends each batch it finds waiting in one durable redb
//! transaction (`Durability::Immediate`), together with the head (`meta`: `seq`, `head`).
//! A request is therefore on disk a few milliseconds after it was answered (always well
//! within 200 ms unless the disk stalls). Tables: `events` (seq → event JSON), `meta`.

use std::path::{Path, PathBuf};

use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::{mpsc, oneshot};

use super::{AuditEvent, BrokenLink, Entry, GENESIS, Verifier, VerifyReport};

/// File name of the sidecar's audit chain in its data directory.
pub const FILE_NAME: &str = "audit.redb";

pub const EVENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("events");
pub const META: TableDefinition<&str, &str> = TableDefinition::new("meta");

/// Events waiting for the writer at most (a full queue delays the request that audits).
const QUEUE: usize = 8192;
/// Events appended in one transaction at most.
const BATCH: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum AuditLogError {
    #[error("audit log {0}: {1}")]
    Db(PathBuf, String),
    #[error("audit log: the writer has stopped")]
    Stopped,
    #[error("audit log: stored event {0} is unreadable: {1}")]
    Corrupt(u64, String),
}

enum Msg {
    Append(Box<Entry>),
    Flush(oneshot::Sender<Result<(), String>>),
    Close(oneshot::Sender<Result<(), String>>),
}

/// Handle of the sidecar's audit chain; cheap to clone.
#[derive(Clone, Debug)]
pub struct AuditLog {
    tx: mpsc::Sender<Msg>,
    path: PathBuf,
}

impl std::fmt::Debug for Msg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Msg::Append(_) => "Append",
            Msg::Flush(_) => "Flush",
            Msg::Close(_) => "Close",
        })
    }
}

fn db_err(path: &Path, e: impl std::fmt::Display) -> AuditLogError {
    AuditLogError::Db(path.to_path_buf(), e.to_string())
}

/// The recorded head: `(seq, hash)` of the last event.
fn read_head(db: &Database, path: &Path) -> Result<(u64, String), AuditLogError> {
    let rtx = db.begin_read().map_err(|e| db_err(path, e))?;
    let meta = match rtx.open_table(META) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok((0, GENESIS.to_string())),
        Err(e) => return Err(db_err(path, e)),
    };
    let seq = meta
        .get("seq")
        .map_err(|e| db_err(path, e))?
        .map(|v| v.value().parse::<u64>().unwrap_or(0))
        .unwrap_or(0);
    let head = meta
        .get("head")
        .map_err(|e| db_err(path, e))?
        .map(|v| v.value().to_string())
        .unwrap_or_else(|| GENESIS.to_string());
    Ok((seq, head))
}

impl AuditLog {
    /// Opens (creating) the chain at `path` and starts its writer thread.
    pub fn open(path: &Path) -> Result<AuditLog, AuditLogError> {
        let db = Database::create(path).map_err(|e| db_err(path, e))?;
        {
            let wtx = db.begin_write().map_err(|e| db_err(path, e))?;
            wtx.open_table(EVENTS).map_err(|e| db_err(path, e))?;
            wtx.open_table(META).map_err(|e| db_err(path, e))?;
            wtx.commit().map_err(|e| db_err(path, e))?;
        }
        let head = read_head(&db, path)?;
        let (tx, rx) = mpsc::channel(QUEUE);
        let writer_path = path.to_path_buf();
        std::thread::Builder::new()
            .name("roony-audit".into())
            .spawn(move || writer(db, writer_path, head, rx))
            .map_err(|e| db_err(path, e))?;
        Ok(AuditLog {
            tx,
            path: path.to_path_buf(),
        })
    }

    /// Opens `audit.redb` in a sidecar data directory.
    pub fn open_in(data_dir: &Path) -> Result<AuditLog, AuditLogError> {
        Self::open(&data_dir.join(FILE_NAME))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Queues an event (waits only while the queue is full).
    pub async fn append(&self, entry: Entry) -> Result<(), AuditLogError> {
        self.tx
            .send(Msg::Append(Box::new(entry)))
            .await
            .map_err(|_| AuditLogError::Stopped)
    }

    /// Waits until every event queued before is durable.
    pub async fn flush(&self) -> Result<(), AuditLogError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Msg::Flush(tx))
            .await
            .map_err(|_| AuditLogError::Stopped)?;
        rx.await
            .map_err(|_| AuditLogError::Stopped)?
            .map_err(|e| AuditLogError::Db(self.path.clone(), e))
    }

    /// Writes what is queued, closes the file and stops the writer (later appends fail
    /// with [`AuditLogError::Stopped`]).
    pub async fn close(&self) -> Result<(), AuditLogError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Msg::Close(tx))
            .await
            .map_err(|_| AuditLogError::Stopped)?;
        rx.await
            .map_err(|_| AuditLogError::Stopped)?
            .map_err(|e| AuditLogError::Db(self.path.clone(), e))
    }
}

/// Appends `entries` after `head` in one durable transaction; returns the new head.
fn append_batch(
    db: &Database,
    head: &(u64, String),
    entries: Vec<Entry>,
) -> Result<(u64, String), String> {
    let (mut seq, mut hash) = head.clone();
    let mut wtx = db.begin_write().map_err(|e| e.to_string())?;
    wtx.set_durability(Durability::Immediate)
        .map_err(|e| e.to_string())?;
    {
        let mut events = wtx.open_table(EVENTS).map_err(|e| e.to_string())?;
        for entry in entries {
            seq += 1;
            let event = entry.link(seq, &hash);
            let bytes = serde_json::to_vec(&event).map_err(|e| e.to_string())?;
            events
                .insert(seq, bytes.as_slice())
                .map_err(|e| e.to_string())?;
            hash = event.hash;
        }
        let mut meta = wtx.open_table(META).map_err(|e| e.to_string())?;
        let seq_text = seq.to_string();
        meta.insert("seq", seq_text.as_str())
            .map_err(|e| e.to_string())?;
        meta.insert("head", hash.as_str())
            .map_err(|e| e.to_string())?;
    }
    wtx.commit().map_err(|e| e.to_string())?;
    Ok((seq, hash))
}

fn writer(db: Database, path: PathBuf, mut head: (u64, String), mut rx: mpsc::Receiver<Msg>) {
    while let Some(first) = rx.blocking_recv() {
        let mut entries = Vec::new();
        let mut waiting = Vec::new();
        let mut close = None;
        let mut next = Some(first);
        while let Some(msg) = next.take() {
            match msg {
                Msg::Append(e) => entries.push(*e),
                Msg::Flush(reply) => waiting.push(reply),
                Msg::Close(reply) => {
                    close = Some(reply);
                    break;
                }
            }
            if entries.len() >= BATCH {
                break;
            }
            next = rx.try_recv().ok();
        }
        let result = if entries.is_empty() {
            Ok(())
        } else {
            let n = entries.len();
            match append_batch(&db, &head, entries) {
                Ok(h) => {
                    head = h;
                    Ok(())
                }
                Err(e) => {
                    tracing::error!(error = %e, path = %path.display(), events = n, "cannot append to the audit log; events lost");
                    Err(e)
                }
            }
        };
        for reply in waiting {
            let _ = reply.send(result.clone());
        }
        if let Some(reply) = close {
            drop(db);
            let _ = reply.send(result);
            return;
        }
    }
}

/// Reads every event of `path` (the sidecar must be stopped: redb locks its file) and
/// verifies the chain, then the recorded head.
pub fn verify_file(path: &Path) -> Result<Result<VerifyReport, BrokenLink>, AuditLogError> {
    let db = Database::open(path).map_err(|e| db_err(path, e))?;
    let (seq, head) = read_head(&db, path)?;
    let rtx = db.begin_read().map_err(|e| db_err(path, e))?;
    let events = match rtx.open_table(EVENTS) {
        Ok(t) => Some(t),
        Err(redb::TableError::TableDoesNotExist(_)) => None,
        Err(e) => return Err(db_err(path, e)),
    };
    let mut v = Verifier::new();
    if let Some(events) = events {
        for item in events.iter().map_err(|e| db_err(path, e))? {
            let (k, bytes) = item.map_err(|e| db_err(path, e))?;
            let key = k.value();
            let event: AuditEvent = match serde_json::from_slice(bytes.value()) {
                Ok(e) => e,
                Err(_) => {
                    // An unreadable record is a broken link too: it is not what was written.
                    return Ok(Err(BrokenLink {
                        seq: key,
                        id: "(unreadable)".into(),
                        reason: "hash_mismatch",
                    }));
                }
            };
            if event.seq != key {
                return Ok(Err(BrokenLink {
                    seq: key,
                    id: event.id,
                    reason: "seq_gap",
                }));
            }
            if let Err(b) = v.check(&event) {
                return Ok(Err(b));
            }
        }
    }
    if let Err(b) = v.check_head(seq, &head) {
        return Ok(Err(b));
    }
    Ok(Ok(v.report()))
}

/// Every event of a closed log, in order (tests, diagnostics).
pub fn read_all(path: &Path) -> Result<Vec<AuditEvent>, AuditLogError> {
    let db = Database::open(path).map_err(|e| db_err(path, e))?;
    let rtx = db.begin_read().map_err(|e| db_err(path, e))?;
    let events = rtx.open_table(EVENTS).map_err(|e| db_err(path, e))?;
    let mut out = Vec::new();
    for item in events.iter().map_err(|e| db_err(path, e))? {
        let (k, bytes) = item.map_err(|e| db_err(path, e))?;
        out.push(
            serde_json::from_slice(bytes.value())
                .map_err(|e| AuditLogError::Corrupt(k.value(), e.to_string()))?,
        );
    }
    Ok(out)
}
