//! One talk burst as an Ogg/Opus file (RFC 7845): `OpusHead`, `OpusTags`, then the burst's Opus packets
//! unchanged, with granule positions from the RTP timestamps. A gap in the timestamps (uplink loss, a
//! speaker pausing) is filled with Opus silence frames, so players keep time with the original.

use std::io::Write;

use ogg::writing::{PacketWriteEndInfo, PacketWriter};

/// Opus's clock: granule positions count 48 kHz samples.
const RATE: u32 = 48_000;
/// A 20 ms Opus frame of silence (CELT, mono): TOC 0xF8 (config 31, 20 ms, one frame), then a frame
/// that decodes to silence.
const SILENCE_20MS: [u8; 3] = [0xf8, 0xff, 0xfe];
const SILENCE_SAMPLES: u32 = RATE / 50;
/// Longest gap filled with silence (a longer jump is not a pause but a restarted sender).
const MAX_GAP: u32 = 10 * RATE;

/// How many 48 kHz samples one Opus packet carries (RFC 6716 §3.1: the TOC byte's configuration gives
/// the frame length, its last two bits the frame count); `None` for a malformed packet.
pub fn opus_samples(packet: &[u8]) -> Option<u32> {
    let toc = *packet.first()?;
    let config = toc >> 3;
    // Frame length in 48 kHz samples by configuration (SILK 0-11, Hybrid 12-15, CELT 16-31).
    let frame: u32 = match config {
        0..=11 => [480, 960, 1920, 2880][usize::from(config % 4)],
        12..=15 => [480, 960][usize::from(config % 2)],
        _ => [120, 240, 480, 960][usize::from(config % 4)],
    };
    let frames = match toc & 0x3 {
        0 => 1,
        1 | 2 => 2,
        _ => u32::from(*packet.get(1)? & 0x3f),
    };
    let samples = frame * frames;
    // RFC 6716 §3.2.5: at most 120 ms in one packet.
    (frames > 0 && samples <= 5760).then_some(samples)
}

/// Writes one burst.
pub struct OggOpusWriter<W: Write> {
    ogg: PacketWriter<'static, W>,
    serial: u32,
    /// RTP timestamp of the first packet, and the next expected one.
    first_ts: Option<u32>,
    next_ts: u32,
    /// Samples written so far (the granule position).
    granule: u64,
    /// The last packet, held back so the stream's final packet can end the stream.
    held: Option<(Vec<u8>, u64)>,
}

impl<W: Write> OggOpusWriter<W> {
    /// Starts a stream on `out` with the two header packets, each on its own page.
    pub fn new(out: W, serial: u32) -> std::io::Result<Self> {
        let mut ogg = PacketWriter::new(out);
        let mut head = Vec::with_capacity(19);
        head.extend_from_slice(b"OpusHead");
        head.push(1); // version
        head.push(1); // channels: mono voice
        head.extend_from_slice(&0u16.to_le_bytes()); // pre-skip: packets are forwarded mid-stream
        head.extend_from_slice(&RATE.to_le_bytes()); // input sample rate, informational
        head.extend_from_slice(&0i16.to_le_bytes()); // output gain
        head.push(0); // channel mapping family 0
        ogg.write_packet(head, serial, PacketWriteEndInfo::EndPage, 0)?;
        let vendor = b"talkgroup";
        let mut tags = Vec::new();
        tags.extend_from_slice(b"OpusTags");
        tags.extend_from_slice(&(vendor.len() as u32).to_le_bytes());
        tags.extend_from_slice(vendor);
        tags.extend_from_slice(&0u32.to_le_bytes()); // no comments
        ogg.write_packet(tags, serial, PacketWriteEndInfo::EndPage, 0)?;
        Ok(OggOpusWriter {
            ogg,
            serial,
            first_ts: None,
            next_ts: 0,
            granule: 0,
            held: None,
        })
    }

    /// Adds one Opus packet with its RTP timestamp. A packet older than the last one is dropped (the
    /// recording keeps the order it was forwarded in); a gap is filled with silence.
    pub fn push(&mut self, ts: u32, packet: &[u8]) -> std::io::Result<()> {
        let Some(samples) = opus_samples(packet) else {
            return Ok(());
        };
        if self.first_ts.is_none() {
            self.first_ts = Some(ts);
            self.next_ts = ts;
        }
        let ahead = ts.wrapping_sub(self.next_ts);
        if ahead > u32::MAX / 2 {
            return Ok(()); // late or repeated
        }
        if ahead <= MAX_GAP {
            let mut gap = ahead;
            while gap >= SILENCE_SAMPLES {
                self.write(SILENCE_20MS.to_vec(), SILENCE_SAMPLES)?;
                gap -= SILENCE_SAMPLES;
            }
        }
        self.next_ts = ts.wrapping_add(samples);
        self.write(packet.to_vec(), samples)
    }

    fn write(&mut self, packet: Vec<u8>, samples: u32) -> std::io::Result<()> {
        self.granule += u64::from(samples);
        if let Some((held, granule)) = self.held.replace((packet, self.granule)) {
            self.ogg
                .write_packet(held, self.serial, PacketWriteEndInfo::NormalPacket, granule)?;
        }
        Ok(())
    }

    /// Ends the stream (the last packet closes it) and returns the writer and the duration in samples.
    pub fn finish(mut self) -> std::io::Result<(W, u64)> {
        match self.held.take() {
            Some((last, granule)) => {
                self.ogg
                    .write_packet(last, self.serial, PacketWriteEndInfo::EndStream, granule)?;
            }
            // No audio at all: end the stream with one silence frame so the file is complete.
            None => {
                self.granule = u64::from(SILENCE_SAMPLES);
                self.ogg.write_packet(
                    SILENCE_20MS.to_vec(),
                    self.serial,
                    PacketWriteEndInfo::EndStream,
                    self.granule,
                )?;
            }
        }
        Ok((self.ogg.into_inner(), self.granule))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opus_packet_durations_come_from_the_toc() {
        assert_eq!(opus_samples(&[0xf8, 0xff, 0xfe]), Some(960), "CELT 20 ms");
        assert_eq!(
            opus_samples(&[0x78]),
            Some(960),
            "SILK 20 ms (config 15 hybrid)"
        );
        assert_eq!(
            opus_samples(&[0x08 | 0x01]),
            Some(1920),
            "SILK 20 ms, two frames"
        );
        assert_eq!(opus_samples(&[0xfb, 0x03]), Some(2880), "CELT 20 ms x 3");
        assert_eq!(
            opus_samples(&[0xfb, 0x3f]),
            None,
            "63 frames of 20 ms is too long"
        );
        assert_eq!(opus_samples(&[]), None);
    }

    #[test]
    fn a_burst_with_a_gap_keeps_its_duration() {
        let mut w = OggOpusWriter::new(Vec::new(), 7).unwrap();
        let frame = [0xf8u8, 1, 2, 3];
        for i in 0..10u32 {
            w.push(1000 + i * 960, &frame).unwrap();
        }
        // 100 ms lost, then five more frames; one late repeat is dropped.
        for i in 15..20u32 {
            w.push(1000 + i * 960, &frame).unwrap();
        }
        w.push(1000, &frame).unwrap();
        let (bytes, samples) = w.finish().unwrap();
        assert_eq!(samples, 20 * 960, "the gap became silence");
        assert!(bytes.starts_with(b"OggS"));
        let head = bytes.windows(8).position(|w| w == b"OpusHead");
        let tags = bytes.windows(8).position(|w| w == b"OpusTags");
        assert!(head.is_some() && tags > head);
    }
}
