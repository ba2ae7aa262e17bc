//! Recording: each local talk burst of a recorded channel becomes an Ogg/Opus file,
//! `DIR/{channel}/{epoch}.ogg`, served at `/api/recordings/{channel}/{epoch}.ogg`.
//!
//! The shards never wait for it. A shard copies each forwarded payload of a recorded channel once into a
//! [`RecordEvent`] and `try_send`s it to the recorder thread through a bounded queue; a full queue is
//! counted (`record_dropped`) and the packet simply missing from the file — forwarding is never slowed.
//! The recorder thread owns the files: it opens one when a burst starts, appends as packets come, and
//! closes it (writing to `.part` and renaming, so a served file is always whole) when the burst ends —
//! or when nothing came for [`IDLE_CLOSE`], should the end be lost.

pub mod oggopus;

use std::collections::HashMap;
use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tracing::{info, warn};

use self::oggopus::OggOpusWriter;

/// Events the recorder thread can hold before shards start counting drops (≈ 40 s of one burst, or a
/// second of a few hundred).
pub const RECORD_QUEUE: usize = 16_384;
/// A burst whose end never came is closed after this long without a packet.
const IDLE_CLOSE: Duration = Duration::from_secs(10);

/// What a shard tells the recorder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecordEvent {
    /// One forwarded packet of a recorded channel's local burst.
    Packet {
        /// The channel.
        channel: String,
        /// The burst's epoch.
        epoch: u64,
        /// The speaker's RTP timestamp.
        timestamp: u32,
        /// The Opus payload (copied once from the receive buffer).
        payload: Vec<u8>,
    },
    /// The burst is over: close its file.
    End {
        /// The channel.
        channel: String,
        /// The burst's epoch.
        epoch: u64,
    },
}

/// Where a recording is: `{dir}/{channel}/{epoch}.ogg`.
pub fn recording_path(dir: &Path, channel: &str, epoch: u64) -> PathBuf {
    dir.join(channel).join(format!("{epoch}.ogg"))
}

/// The URL a recording is served at (in the history's `recording` field).
pub fn recording_url(channel: &str, epoch: u64) -> String {
    format!("/api/recordings/{channel}/{epoch}.ogg")
}

struct Open {
    writer: OggOpusWriter<BufWriter<File>>,
    part: PathBuf,
    last: Instant,
}

/// Starts the recorder thread writing under `dir`; returns the queue shards send to.
pub fn spawn(dir: PathBuf) -> std::io::Result<flume::Sender<RecordEvent>> {
    std::fs::create_dir_all(&dir)?;
    let (tx, rx) = flume::bounded(RECORD_QUEUE);
    std::thread::Builder::new()
        .name("recorder".into())
        .spawn(move || run(dir, rx))?;
    Ok(tx)
}

fn run(dir: PathBuf, rx: flume::Receiver<RecordEvent>) {
    let mut open: HashMap<(String, u64), Open> = HashMap::new();
    loop {
        match rx.recv_timeout(IDLE_CLOSE / 2) {
            Ok(RecordEvent::Packet {
                channel,
                epoch,
                timestamp,
                payload,
            }) => {
                let key = (channel, epoch);
                if !open.contains_key(&key) {
                    match start(&dir, &key.0, key.1) {
                        Ok(file) => {
                            open.insert(key.clone(), file);
                        }
                        Err(e) => {
                            warn!(channel = key.0, epoch, error = %e, "cannot record");
                            continue;
                        }
                    }
                }
                if let Some(file) = open.get_mut(&key) {
                    file.last = Instant::now();
                    if let Err(e) = file.writer.push(timestamp, &payload) {
                        warn!(channel = key.0, epoch, error = %e, "recording write failed");
                    }
                }
            }
            Ok(RecordEvent::End { channel, epoch }) => {
                if let Some(file) = open.remove(&(channel.clone(), epoch)) {
                    finish(&dir, &channel, epoch, file);
                }
            }
            Err(flume::RecvTimeoutError::Timeout) => {}
            Err(flume::RecvTimeoutError::Disconnected) => break,
        }
        let idle: Vec<(String, u64)> = open
            .iter()
            .filter(|(_, f)| f.last.elapsed() >= IDLE_CLOSE)
            .map(|(k, _)| k.clone())
            .collect();
        for key in idle {
            if let Some(file) = open.remove(&key) {
                finish(&dir, &key.0, key.1, file);
            }
        }
    }
    for ((channel, epoch), file) in open {
        finish(&dir, &channel, epoch, file);
    }
}

fn start(dir: &Path, channel: &str, epoch: u64) -> std::io::Result<Open> {
    let path = recording_path(dir, channel, epoch);
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let part = path.with_extension("ogg.part");
    let out = BufWriter::new(File::create(&part)?);
    // The epoch is unique per burst of a channel: its low bits make a fine stream serial.
    let writer = OggOpusWriter::new(out, epoch as u32)?;
    Ok(Open {
        writer,
        part,
        last: Instant::now(),
    })
}

fn finish(dir: &Path, channel: &str, epoch: u64, file: Open) {
    let path = recording_path(dir, channel, epoch);
    let done = file
        .writer
        .finish()
        .and_then(|(mut out, samples)| {
            std::io::Write::flush(&mut out)?;
            Ok(samples)
        })
        .and_then(|samples| std::fs::rename(&file.part, &path).map(|()| samples));
    match done {
        Ok(samples) => info!(
            channel,
            epoch,
            seconds = samples as f64 / 48_000.0,
            "recording written"
        ),
        Err(e) => warn!(channel, epoch, error = %e, "recording not finished"),
    }
}
