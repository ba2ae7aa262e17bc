//! The server's `/metrics` (Prometheus text) over a bare HTTP/1.1 GET, parsed generically: every sample
//! line becomes (series, value), and sums by metric name give e.g. the forwarded-packet count over all
//! shards. A hand-rolled GET keeps hyper out of the harness.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Parsed samples: full series text (`name{labels}`) → value.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Samples(pub BTreeMap<String, f64>);

/// Metric names the harness reads.
pub const PACKETS_IN: &str = "talkgroup_packets_in_total";
pub const PACKETS_FORWARDED: &str = "talkgroup_packets_forwarded_total";
pub const PACKETS_DROPPED: &str = "talkgroup_packets_dropped_total";
pub const RELAY_SENT: &str = "talkgroup_relay_sent_total";
pub const RELAY_IN: &str = "talkgroup_relay_in_total";
pub const RELAY_DROPPED: &str = "talkgroup_relay_dropped_total";

impl Samples {
    /// Parse Prometheus text exposition: comments skipped, an optional timestamp after the value ignored,
    /// label values may hold spaces.
    pub fn parse(text: &str) -> Samples {
        let mut m = BTreeMap::new();
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (series, rest) = match line.rfind('}') {
                Some(i) if line.contains('{') => (&line[..=i], &line[i + 1..]),
                _ => match line.split_once(char::is_whitespace) {
                    Some((s, r)) => (s, r),
                    None => continue,
                },
            };
            let Some(v) = rest.split_whitespace().next() else {
                continue;
            };
            let v = match v {
                "+Inf" => f64::INFINITY,
                "-Inf" => f64::NEG_INFINITY,
                _ => match v.parse::<f64>() {
                    Ok(v) => v,
                    Err(_) => continue,
                },
            };
            m.insert(series.trim().to_string(), v);
        }
        Samples(m)
    }

    /// The same samples with `key="value"` added first to every series' labels (several nodes' samples
    /// in one set stay apart).
    pub fn with_label(&self, key: &str, value: &str) -> Samples {
        Samples(
            self.0
                .iter()
                .map(|(k, v)| {
                    let name = metric_name(k);
                    let l = labels(k);
                    let rest = l
                        .strip_prefix('{')
                        .and_then(|l| l.strip_suffix('}'))
                        .unwrap_or(l);
                    let sep = if rest.is_empty() { "" } else { "," };
                    (format!("{name}{{{key}=\"{value}\"{sep}{rest}}}"), *v)
                })
                .collect(),
        )
    }

    /// Sum of every series of metric `name`; `None` when there is none.
    pub fn sum(&self, name: &str) -> Option<f64> {
        let mut found = false;
        let mut total = 0.0;
        for (k, v) in &self.0 {
            if metric_name(k) == name {
                found = true;
                total += v;
            }
        }
        found.then_some(total)
    }

    /// Series of metric `name` with their labels, e.g. the drop reasons.
    pub fn series(&self, name: &str) -> Vec<(String, f64)> {
        self.0
            .iter()
            .filter(|(k, _)| metric_name(k) == name)
            .map(|(k, v)| (labels(k).to_string(), *v))
            .collect()
    }
}

/// Increase of metric `name` from `a` to `b` summed by the value of label `key` (non-zero ones only).
pub fn delta_by_label(a: &Samples, b: &Samples, name: &str, key: &str) -> BTreeMap<String, f64> {
    let value_of = |labels: &str| -> String {
        let pat = format!("{key}=\"");
        labels
            .find(&pat)
            .map(|i| &labels[i + pat.len()..])
            .and_then(|r| r.split('"').next())
            .unwrap_or("")
            .to_string()
    };
    let mut m = BTreeMap::new();
    for (l, v) in b.series(name) {
        *m.entry(value_of(&l)).or_insert(0.0) += v;
    }
    for (l, v) in a.series(name) {
        *m.entry(value_of(&l)).or_insert(0.0) -= v;
    }
    m.retain(|_, v| *v != 0.0);
    m
}

fn metric_name(series: &str) -> &str {
    series.split('{').next().unwrap_or(series)
}

fn labels(series: &str) -> &str {
    match series.find('{') {
        Some(i) => &series[i..],
        None => "",
    }
}

/// GET `path` from `addr`; returns (status, body). Bounded in time.
pub async fn http_get(
    addr: SocketAddr,
    path: &str,
    timeout: Duration,
) -> Result<(u16, String), String> {
    let fut = async {
        let mut s = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect {addr}: {e}"))?;
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nAccept: */*\r\n\r\n"
        );
        s.write_all(req.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.map_err(|e| e.to_string())?;
        parse_http_response(&buf)
    };
    tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| format!("GET http://{addr}{path}: timed out"))?
}

/// Split an HTTP/1.1 response; handles `Transfer-Encoding: chunked`.
pub fn parse_http_response(buf: &[u8]) -> Result<(u16, String), String> {
    let text = String::from_utf8_lossy(buf);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or("malformed HTTP response")?;
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or("malformed HTTP status line")?;
    let chunked = head.lines().any(|l| {
        l.to_ascii_lowercase().starts_with("transfer-encoding:")
            && l.to_ascii_lowercase().contains("chunked")
    });
    if !chunked {
        return Ok((status, body.to_string()));
    }
    let mut out = String::new();
    let mut rest = body;
    while let Some((size_line, after)) = rest.split_once("\r\n") {
        let size = usize::from_str_radix(size_line.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| "bad chunk size")?;
        if size == 0 || after.len() < size {
            break;
        }
        out.push_str(&after[..size]);
        rest = after[size..].strip_prefix("\r\n").unwrap_or(&after[size..]);
    }
    Ok((status, out))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "# HELP talkgroup_packets_in_total Packets received\n\
# TYPE talkgroup_packets_in_total counter\n\
talkgroup_packets_in_total{shard=\"0\"} 100\n\
talkgroup_packets_in_total{shard=\"1\"} 50 1700000000000\n\
talkgroup_packets_forwarded_total{shard=\"0\"} 300\n\
talkgroup_packets_dropped_total{shard=\"0\",reason=\"not holder\"} 7\n\
talkgroup_packets_dropped_total{shard=\"0\",reason=\"unknown_source\"} 2\n\
talkgroup_members 12\n\
process_thing NaN\n";

    #[test]
    fn parses_and_sums_generically() {
        let s = Samples::parse(TEXT);
        assert_eq!(s.sum(PACKETS_IN), Some(150.0));
        assert_eq!(s.sum(PACKETS_FORWARDED), Some(300.0));
        assert_eq!(s.sum(PACKETS_DROPPED), Some(9.0));
        assert_eq!(s.sum("talkgroup_members"), Some(12.0));
        assert_eq!(s.sum("nope"), None);
        let d = s.series(PACKETS_DROPPED);
        assert_eq!(d.len(), 2);
        assert!(d.iter().any(|(l, v)| l.contains("not holder") && *v == 7.0));
    }

    #[test]
    fn http_plain_and_chunked() {
        let plain = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
        assert_eq!(parse_http_response(plain).unwrap(), (200, "ok".into()));
        let chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n";
        assert_eq!(parse_http_response(chunked).unwrap(), (200, "abcde".into()));
        assert!(parse_http_response(b"garbage").is_err());
    }

    #[test]
    fn node_labels_keep_nodes_apart() {
        let a = Samples::parse("talkgroup_relay_in_total{shard=\"0\"} 5\nup 1\n");
        let mut all = a.with_label("node", "0");
        all.0.extend(a.with_label("node", "1").0);
        assert_eq!(all.sum("talkgroup_relay_in_total"), Some(10.0));
        assert_eq!(all.sum("up"), Some(2.0));
        assert!(all
            .0
            .contains_key("talkgroup_relay_in_total{node=\"1\",shard=\"0\"}"));
        assert!(all.0.contains_key("up{node=\"0\"}"));
    }

    #[test]
    fn deltas_by_label() {
        let a = Samples::parse("x{shard=\"0\",reason=\"stale\"} 1\nx{shard=\"1\",reason=\"stale\"} 2\nx{shard=\"0\",reason=\"mac\"} 4\n");
        let b = Samples::parse("x{shard=\"0\",reason=\"stale\"} 5\nx{shard=\"1\",reason=\"stale\"} 2\nx{shard=\"0\",reason=\"mac\"} 4\n");
        let d = delta_by_label(&a, &b, "x", "reason");
        assert_eq!(
            d.into_iter().collect::<Vec<_>>(),
            [("stale".to_string(), 4.0)]
        );
    }
}
