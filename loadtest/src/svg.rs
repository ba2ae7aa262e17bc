//! A self-contained SVG of the run: the latency percentile distribution (HdrHistogram style, the tail
//! stretched on a log axis) and load versus latency (per-second samples, and the steps of a knee search).
//!
//! Written by hand, not with `plotters` (issue #10 item 6 asked which reads better). What this file spends
//! its lines on is the report's own vocabulary: the percentile axis (1/(1 − q) on a log scale, labelled
//! 90 %, 99 %, 99.9 % …), decade ticks in µs and ms, the knee's limit line and marker, talkgroup against
//! the raw forwarder. With plotters (svg backend, default features off) all of that stays, as coordinate
//! transforms, label formatters and custom elements; what it would replace — an axis mapping, a frame, a
//! polyline, a legend, about 100 lines — is less than the glue it needs, and it brings four crates
//! (plotters, plotters-backend, plotters-svg, num-traits) and text laid out from guessed font metrics
//! (no font backend). Hand-written, the output is a few KB of plain elements, stable enough for the tests
//! to read as text, and opens in any browser.

use crate::report::Report;
use std::fmt::Write as _;

const W: f64 = 1000.0;
const PANEL_H: f64 = 380.0;
const LEFT: f64 = 80.0;
const RIGHT: f64 = 230.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 50.0;

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A linear or log10 axis mapping data to pixels.
#[derive(Clone, Copy)]
struct Axis {
    lo: f64,
    hi: f64,
    log: bool,
    px0: f64,
    px1: f64,
}

impl Axis {
    fn map(&self, v: f64) -> f64 {
        let (lo, hi, v) = if self.log {
            (self.lo.log10(), self.hi.log10(), v.max(self.lo).log10())
        } else {
            (self.lo, self.hi, v)
        };
        let f = if hi > lo {
            ((v - lo) / (hi - lo)).clamp(0.0, 1.0)
        } else {
            0.0
        };
        self.px0 + f * (self.px1 - self.px0)
    }
}

/// Decade bounds around `[min, max]` µs for a log axis.
fn decades(min: f64, max: f64) -> (f64, f64) {
    let lo = 10f64.powf(min.max(0.1).log10().floor());
    let mut hi = 10f64.powf(max.max(min * 1.01).max(1.0).log10().ceil());
    if hi <= lo {
        hi = lo * 10.0;
    }
    (lo, hi)
}

fn fmt_us(us: f64) -> String {
    if us >= 1_000_000.0 {
        format!("{} s", us / 1e6)
    } else if us >= 1000.0 {
        format!("{} ms", us / 1e3)
    } else {
        format!("{us} µs")
    }
}

fn nice_step(range: f64) -> f64 {
    let raw = range / 5.0;
    let mag = 10f64.powf(raw.max(1e-9).log10().floor());
    let n = raw / mag;
    mag * if n < 1.5 {
        1.0
    } else if n < 3.5 {
        2.0
    } else if n < 7.5 {
        5.0
    } else {
        10.0
    }
}

fn frame(s: &mut String, y0: f64, title: &str, xlabel: &str, ylabel: &str) {
    let (x0, x1, yb) = (LEFT, W - RIGHT, y0 + PANEL_H - BOTTOM);
    let _ = writeln!(
        s,
        r#"<text x="{LEFT}" y="{}" font-size="15" font-weight="bold">{}</text>"#,
        y0 + 22.0,
        esc(title)
    );
    let _ = writeln!(
        s,
        r##"<rect x="{x0}" y="{}" width="{}" height="{}" fill="none" stroke="#444"/>"##,
        y0 + TOP,
        x1 - x0,
        yb - y0 - TOP
    );
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" font-size="12" text-anchor="middle">{}</text>"#,
        (x0 + x1) / 2.0,
        yb + 38.0,
        esc(xlabel)
    );
    let _ = writeln!(
        s,
        r#"<text x="18" y="{}" font-size="12" text-anchor="middle" transform="rotate(-90 18 {})">{}</text>"#,
        (y0 + TOP + yb) / 2.0,
        (y0 + TOP + yb) / 2.0,
        esc(ylabel)
    );
}

fn y_log_ticks(s: &mut String, ya: &Axis) {
    let mut v = ya.lo;
    while v <= ya.hi * 1.0001 {
        let y = ya.map(v);
        let _ = writeln!(
            s,
            r##"<line x1="{LEFT}" y1="{y:.1}" x2="{}" y2="{y:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" font-size="11" text-anchor="end">{}</text>"##,
            W - RIGHT,
            LEFT - 6.0,
            y + 4.0,
            esc(&fmt_us(v))
        );
        v *= 10.0;
    }
}

fn polyline(s: &mut String, pts: &[(f64, f64)], color: &str, dash: bool) {
    if pts.is_empty() {
        return;
    }
    let p: Vec<String> = pts.iter().map(|(x, y)| format!("{x:.1},{y:.1}")).collect();
    let _ = writeln!(
        s,
        r#"<polyline fill="none" stroke="{color}" stroke-width="2"{} points="{}"/>"#,
        if dash {
            r#" stroke-dasharray="6 4""#
        } else {
            ""
        },
        p.join(" ")
    );
}

fn legend(s: &mut String, y0: f64, items: &[(&str, &str)]) {
    for (i, (label, color)) in items.iter().enumerate() {
        let y = y0 + TOP + 10.0 + i as f64 * 20.0;
        let x = W - RIGHT + 12.0;
        let _ = writeln!(
            s,
            r#"<rect x="{x}" y="{}" width="14" height="4" fill="{color}"/><text x="{}" y="{}" font-size="12">{}</text>"#,
            y - 2.0,
            x + 20.0,
            y + 4.0,
            esc(label)
        );
    }
}

/// A panel's axes at `y0`: linear x over `0..=x_hi`, log y over the decades `lo..hi`; and the panel's
/// bottom edge.
fn axes(y0: f64, x_hi: f64, (lo, hi): (f64, f64)) -> (Axis, Axis, f64) {
    let yb = y0 + PANEL_H - BOTTOM;
    let xa = Axis {
        lo: 0.0,
        hi: x_hi,
        log: false,
        px0: LEFT,
        px1: W - RIGHT,
    };
    let ya = Axis {
        lo,
        hi,
        log: true,
        px0: yb,
        px1: y0 + TOP,
    };
    (xa, ya, yb)
}

fn no_samples(s: &mut String, y0: f64) {
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" font-size="13">no samples</text>"#,
        LEFT + 20.0,
        y0 + 80.0
    );
}

/// Render the report as an SVG document.
pub fn render(r: &Report) -> String {
    let h = 70.0 + 2.0 * PANEL_H;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{h}" viewBox="0 0 {W} {h}" font-family="sans-serif">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let m = &r.summary;
    let _ = writeln!(
        s,
        r#"<text x="{LEFT}" y="24" font-size="17" font-weight="bold">talkgroup loadtest — {}</text>"#,
        esc(&r.scenario)
    );
    let mut sub = format!(
        "p50 {:.0} µs · p99 {:.0} µs · p99.9 {:.0} µs · max {:.0} µs · loss {:.3} % · {:.0} pkt/s out",
        m.latency.p50_us, m.latency.p99_us, m.latency.p999_us, m.latency.max_us, m.loss_pct, m.pps_out
    );
    if let Some(ratio) = r.ceiling.as_ref().and_then(|c| c.ratio) {
        let _ = write!(sub, " · ceiling ratio {ratio:.3}");
    }
    let _ = writeln!(
        s,
        r##"<text x="{LEFT}" y="46" font-size="12" fill="#333">{}</text>"##,
        esc(&sub)
    );

    percentile_panel(&mut s, r, 60.0);
    load_panel(&mut s, r, 60.0 + PANEL_H);
    s.push_str("</svg>\n");
    s
}

/// (legend label, colour, (quantile, µs) points).
type Series<'a> = (&'a str, &'a str, &'a [(f64, f64)]);

fn percentile_panel(s: &mut String, r: &Report, y0: f64) {
    frame(s, y0, "Latency by percentile", "percentile", "latency");
    let series: [Series; 4] = [
        ("forwarding (talkgroup)", "#1f77b4", &r.curves.forward),
        ("forwarding (raw ceiling)", "#2ca02c", &r.curves.raw),
        ("press → granted", "#ff7f0e", &r.curves.grant),
        ("speaker switch", "#d62728", &r.curves.switch),
    ];
    let all: Vec<(f64, f64)> = series
        .iter()
        .flat_map(|(_, _, v)| v.iter().copied())
        .collect();
    if all.is_empty() {
        no_samples(s, y0);
        return;
    }
    let tx = |q: f64| -> f64 { (1.0 / (1.0 - q).max(1e-9)).log10() };
    let tmax = all
        .iter()
        .map(|(q, _)| tx(*q))
        .fold(3.0f64, f64::max)
        .ceil()
        .min(9.0);
    let ymin = all.iter().map(|p| p.1).fold(f64::INFINITY, f64::min);
    let ymax = all.iter().map(|p| p.1).fold(0.0, f64::max);
    let (xa, ya, yb) = axes(y0, tmax, decades(ymin, ymax));
    y_log_ticks(s, &ya);
    for t in 0..=tmax as u32 {
        let x = xa.map(t as f64);
        let label = match t {
            0 => "0%".to_string(),
            1 => "90%".to_string(),
            2 => "99%".to_string(),
            _ => format!("99.{}%", "9".repeat(t as usize - 2)),
        };
        let _ = writeln!(
            s,
            r##"<line x1="{x:.1}" y1="{}" x2="{x:.1}" y2="{yb}" stroke="#eee"/><text x="{x:.1}" y="{}" font-size="11" text-anchor="middle">{}</text>"##,
            y0 + TOP,
            yb + 16.0,
            label
        );
    }
    let mut items = Vec::new();
    for (label, color, pts) in &series {
        if pts.is_empty() {
            continue;
        }
        let px: Vec<(f64, f64)> = pts
            .iter()
            .map(|(q, v)| (xa.map(tx(*q)), ya.map(*v)))
            .collect();
        polyline(s, &px, color, false);
        items.push((*label, *color));
    }
    legend(s, y0, &items);
}

fn load_panel(s: &mut String, r: &Report, y0: f64) {
    let knee = r.knee.as_ref();
    let title = if knee.is_some() {
        "Load vs latency (knee search steps)"
    } else {
        "Load vs latency (one point per second)"
    };
    frame(s, y0, title, "forwarded packets/s", "latency");
    let mut lat: Vec<f64> = r
        .series
        .iter()
        .flat_map(|p| [p.p50_us, p.p99_us])
        .filter(|v| *v > 0.0)
        .collect();
    let mut loads: Vec<f64> = r.series.iter().map(|p| p.pps_out).collect();
    if let Some(k) = knee {
        lat.extend(
            k.steps
                .iter()
                .flat_map(|st| [st.p50_us, st.p99_us])
                .filter(|v| *v > 0.0),
        );
        lat.push(k.p99_limit_us);
        loads.extend(k.steps.iter().map(|st| st.pps_out));
    }
    if lat.is_empty() || loads.is_empty() {
        no_samples(s, y0);
        return;
    }
    let decs = decades(
        lat.iter().copied().fold(f64::INFINITY, f64::min),
        lat.iter().copied().fold(0.0, f64::max),
    );
    let xmax = loads.iter().copied().fold(0.0, f64::max).max(1.0) * 1.05;
    let (xa, ya, yb) = axes(y0, xmax, decs);
    y_log_ticks(s, &ya);
    let step = nice_step(xmax);
    let mut v = 0.0;
    while v <= xmax {
        let x = xa.map(v);
        let _ = writeln!(
            s,
            r##"<line x1="{x:.1}" y1="{}" x2="{x:.1}" y2="{yb}" stroke="#eee"/><text x="{x:.1}" y="{}" font-size="11" text-anchor="middle">{}</text>"##,
            y0 + TOP,
            yb + 16.0,
            if v >= 1000.0 {
                format!("{}k", v / 1000.0)
            } else {
                format!("{v}")
            }
        );
        v += step;
    }
    let mut items = Vec::new();
    for (target, color) in [("talkgroup", "#1f77b4"), ("raw", "#2ca02c")] {
        let pts: Vec<_> = r.series.iter().filter(|p| p.target == target).collect();
        if pts.is_empty() {
            continue;
        }
        for p in &pts {
            let _ = writeln!(
                s,
                r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{color}" fill-opacity="0.7"/><circle cx="{:.1}" cy="{:.1}" r="2" fill="{color}" fill-opacity="0.3"/>"#,
                xa.map(p.pps_out),
                ya.map(p.p99_us),
                xa.map(p.pps_out),
                ya.map(p.p50_us)
            );
        }
        items.push((
            if target == "raw" {
                "p99 raw (faint: p50)"
            } else {
                "p99 talkgroup (faint: p50)"
            },
            color,
        ));
    }
    if let Some(k) = knee {
        let p99: Vec<(f64, f64)> = k
            .steps
            .iter()
            .map(|st| (xa.map(st.pps_out), ya.map(st.p99_us)))
            .collect();
        let p50: Vec<(f64, f64)> = k
            .steps
            .iter()
            .map(|st| (xa.map(st.pps_out), ya.map(st.p50_us)))
            .collect();
        polyline(s, &p99, "#ff7f0e", false);
        polyline(s, &p50, "#ff7f0e", true);
        for (st, (x, y)) in k.steps.iter().zip(&p99) {
            let fill = if st.pass { "#ff7f0e" } else { "#d62728" };
            let _ = writeln!(
                s,
                r#"<circle cx="{x:.1}" cy="{y:.1}" r="4" fill="{fill}"/>"#
            );
        }
        let ly = ya.map(k.p99_limit_us);
        let _ = writeln!(
            s,
            r##"<line x1="{LEFT}" y1="{ly:.1}" x2="{}" y2="{ly:.1}" stroke="#d62728" stroke-dasharray="4 3"/>"##,
            W - RIGHT
        );
        if let Some(kn) = &k.knee {
            let x = xa.map(kn.pps_out);
            let _ = writeln!(
                s,
                r##"<line x1="{x:.1}" y1="{}" x2="{x:.1}" y2="{yb}" stroke="#9467bd" stroke-dasharray="4 3"/><text x="{:.1}" y="{}" font-size="11" fill="#9467bd">knee</text>"##,
                y0 + TOP,
                x + 4.0,
                y0 + TOP + 14.0
            );
        }
        items.push(("steps p99 (dashed: p50)", "#ff7f0e"));
        items.push(("p99 limit", "#d62728"));
    }
    legend(s, y0, &items);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::tests::sample_report;

    /// Every opened element is closed (a cheap well-formedness check without an XML parser).
    fn balanced(svg: &str) -> bool {
        let mut stack: Vec<String> = Vec::new();
        let mut rest = svg;
        while let Some(i) = rest.find('<') {
            let end = match rest[i..].find('>') {
                Some(e) => i + e,
                None => return false,
            };
            let tag = &rest[i + 1..end];
            if let Some(name) = tag.strip_prefix('/') {
                if stack.pop().as_deref() != Some(name.trim()) {
                    return false;
                }
            } else if !tag.ends_with('/') {
                stack.push(tag.split_whitespace().next().unwrap_or("").to_string());
            }
            rest = &rest[end + 1..];
        }
        stack.is_empty()
    }

    #[test]
    fn renders_both_panels() {
        let svg = render(&sample_report());
        assert!(svg.starts_with("<svg"));
        assert!(svg.trim_end().ends_with("</svg>"));
        assert!(balanced(&svg));
        assert!(svg.contains("Latency by percentile"));
        assert!(svg.contains("Load vs latency"));
        assert!(svg.contains("99.9%"));
        assert!(svg.matches("<polyline").count() >= 4, "curves + knee lines");
        assert!(svg.contains("knee"));
        assert!(!svg.contains("NaN"));
    }

    #[test]
    fn renders_an_empty_report() {
        let svg = render(&Report::default());
        assert!(balanced(&svg));
        assert!(svg.contains("no samples"));
        assert!(!svg.contains("NaN"));
    }

    #[test]
    fn escapes_text() {
        let mut r = sample_report();
        r.scenario = "a<b>&\"c\"".into();
        let svg = render(&r);
        assert!(svg.contains("a&lt;b&gt;&amp;&quot;c&quot;"));
        assert!(balanced(&svg));
    }

    #[test]
    fn axes() {
        assert_eq!(decades(23.0, 4100.0), (10.0, 10_000.0));
        let a = Axis {
            lo: 10.0,
            hi: 1000.0,
            log: true,
            px0: 0.0,
            px1: 100.0,
        };
        assert!((a.map(100.0) - 50.0).abs() < 1e-9);
        assert_eq!(nice_step(1000.0), 200.0);
        assert_eq!(fmt_us(2500.0), "2.5 ms");
    }
}
