//! A full disk: appends get a typed error, what was acknowledged stays readable, and
//! once space is back the same database takes writes again, and reopens intact.
//!
//! Needs to mount a tmpfs (root, or CAP_SYS_ADMIN), as CI on this project's machines has.

use std::path::{Path, PathBuf};
use std::process::Command;

use bytes::Bytes;
use kafka_protocol::records::Compression;
use weir::storage::{Log, LogOptions, StorageError, TopicConfig, WriteError};
use weir_wire::record_batch::build::{NewRecord, batch};

/// A tmpfs of `size`, unmounted on drop.
struct Tmpfs {
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Tmpfs {
        let dir = tempfile::tempdir().unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .expect("run mount");
        assert!(
            status.success(),
            "mounting a tmpfs failed: this test needs root (or CAP_SYS_ADMIN)"
        );
        Tmpfs {
            path: dir.path().to_owned(),
            _dir: dir,
        }
    }

    fn resize(&self, size: &str) {
        let status = Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.path)
            .status()
            .expect("run mount");
        assert!(status.success(), "remount failed");
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.path).status();
    }
}

fn batch_of(tag: u32) -> Bytes {
    let records: Vec<NewRecord> = (0..16)
        .map(|i| NewRecord {
            key: Some(Bytes::from(format!("{tag}-{i}"))),
            value: Some(Bytes::from(vec![(tag % 251) as u8; 1000])),
            timestamp_ms: 0,
            ..Default::default()
        })
        .collect();
    batch(&records, Compression::None).unwrap()
}

fn read_all(log: &Log) -> Vec<Bytes> {
    let hw = log.offsets("t", 0).unwrap().high_watermark;
    let mut out = Vec::new();
    let mut next = 0;
    while next < hw {
        for b in log.read("t", 0, next, 1 << 20).unwrap().batches {
            next = b.base_offset() as u64 + b.offset_count();
            out.push(b.into_bytes());
        }
    }
    out
}

#[test]
fn full_disk_fails_appends_and_recovers() {
    let fs = Tmpfs::mount("4m");
    let dir: &Path = &fs.path;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let log = Log::open(LogOptions::new(dir)).unwrap();
        log.create_topic("t", 1, TopicConfig::default())
            .await
            .unwrap();
        let mut acked = Vec::new();
        let mut error = None;
        for tag in 0..10_000 {
            match log.append("t", 0, batch_of(tag)).await {
                Ok(out) => acked.push((out.base_offset, tag)),
                Err(e) => {
                    error = Some(e);
                    break;
                }
            }
        }
        let error = error.expect("a 4 MiB disk filled up");
        assert!(
            matches!(&error, WriteError::Storage(e) if e.is_disk_full()),
            "expected a disk-full storage error, got {error}"
        );
        assert!(!acked.is_empty());
        eprintln!("disk full after {} batches: {error}", acked.len());

        // Still full: another append fails the same way, nothing panics, reads work.
        let again = log.append("t", 0, batch_of(99_999)).await.unwrap_err();
        assert!(
            matches!(&again, WriteError::Storage(StorageError::DiskFull { .. })),
            "{again}"
        );
        let stored = read_all(&log);
        assert_eq!(
            stored.len(),
            acked.len(),
            "every acknowledged batch is readable while full"
        );

        // Space comes back: the same open log takes writes again.
        fs.resize("64m");
        let out = log
            .append("t", 0, batch_of(7))
            .await
            .expect("append after space came back");
        assert_eq!(out.base_offset, acked.last().unwrap().0 + 16);
        log.close().await.unwrap();

        let log = Log::open(LogOptions::new(dir)).unwrap();
        let stored = read_all(&log);
        assert_eq!(stored.len(), acked.len() + 1);
        for ((base, tag), bytes) in acked.iter().zip(&stored) {
            let expected = weir_wire::record_batch::RecordBatch::parse(batch_of(*tag))
                .unwrap()
                .with_base_offset(*base as i64, 0)
                .into_bytes();
            assert_eq!(&expected, bytes);
        }
        log.close().await.unwrap();
    });
}
