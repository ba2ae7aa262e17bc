//! The harness's own floor: the same stamping and clock as the real run, over a bare loopback socket
//! pair, before any load. No forwarding latency can be measured below it.

use crate::stamp::Stamp;
use crate::stats::LatencyHist;
use crate::sys::{mono_ns, wait_until};

/// The harness's own floor: one-way latency of `n` packets over loopback from a paced sender to a blocking
/// receiver, same stamping and clock as the real run. Whatever the forwarding latency is, it cannot be
/// measured below this.
pub fn loopback_floor(n: u32, interval: std::time::Duration) -> std::io::Result<LatencyHist> {
    let rx = std::net::UdpSocket::bind("127.0.0.1:0")?;
    rx.set_read_timeout(Some(std::time::Duration::from_millis(200)))?;
    let to = rx.local_addr()?;
    let tx = std::net::UdpSocket::bind("127.0.0.1:0")?;
    let sender = std::thread::spawn(move || {
        crate::sys::tight_timer_slack();
        let mut buf = [0u8; 100];
        let start = mono_ns();
        for i in 0..n {
            let due = start + i as u64 * interval.as_nanos() as u64;
            wait_until(due);
            Stamp {
                channel: 0,
                speaker: 0,
                spurt: 1,
                seq: i,
                sched_ns: due,
            }
            .write(&mut buf[12..]);
            let _ = tx.send_to(&buf, to);
        }
    });
    let mut h = LatencyHist::new();
    let mut buf = [0u8; 200];
    while h.len() < n as u64 {
        match rx.recv_from(&mut buf) {
            Ok((len, _)) => {
                let now = mono_ns();
                if let Some(st) = Stamp::parse(&buf[12..len]) {
                    h.record(now.saturating_sub(st.sched_ns));
                }
            }
            Err(_) => break,
        }
    }
    let _ = sender.join();
    Ok(h)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_floor_is_small() {
        let h = loopback_floor(50, std::time::Duration::from_micros(500)).unwrap();
        assert_eq!(h.len(), 50);
        assert!(h.quantile(0.5) < 20_000_000, "{:?}", h.summary());
    }
}
