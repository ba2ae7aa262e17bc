//! Scenario files (`scenarios/NAME.toml`) and the small value grammars shared with the command line:
//! durations, the talk model and the payload-size model.
//!
//! A scenario only presets flags: anything given on the command line wins, so `--scenario small
//! --duration 5s` is a shorter smoke run.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A scenario file. Every field is optional; unknown fields are an error so a typo is not silently
/// ignored.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    pub description: Option<String>,
    pub channels: Option<u32>,
    pub members: Option<u32>,
    pub duration: Option<String>,
    pub warmup: Option<String>,
    pub transport: Option<String>,
    pub talk: Option<String>,
    pub rate: Option<u32>,
    pub payload: Option<String>,
    pub members_per_ws: Option<u32>,
    pub shards: Option<u32>,
    /// Nodes sharing one Redis (`--nodes`).
    pub nodes: Option<u32>,
    pub presence: Option<bool>,
    /// Loss threshold (%) above which the run fails, like `--fail-on-loss`.
    pub fail_on_loss: Option<f64>,
}

impl Scenario {
    pub fn from_toml(text: &str) -> Result<Scenario, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }

    /// Load `NAME` from `dir` (`NAME.toml`, or a path given directly).
    pub fn load(name: &str, dir: &Path) -> Result<(Scenario, PathBuf), String> {
        let direct = PathBuf::from(name);
        let path = if direct.extension().is_some() && direct.exists() {
            direct
        } else {
            dir.join(format!("{name}.toml"))
        };
        let text = std::fs::read_to_string(&path).map_err(|e| {
            format!(
                "cannot read scenario {}: {e} (scenarios live in {}: {})",
                path.display(),
                dir.display(),
                list(dir).join(", ")
            )
        })?;
        let sc = Scenario::from_toml(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok((sc, path))
    }
}

/// Names of the scenarios in `dir`.
pub fn list(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let p = e.path();
            if p.extension()? != "toml" {
                return None;
            }
            Some(p.file_stem()?.to_string_lossy().into_owned())
        })
        .collect();
    v.sort();
    v
}

/// Parse `15s`, `1.5s`, `500ms`, `2m`, or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, mul) = if let Some(n) = s.strip_suffix("ms") {
        (n, 1e-3)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60.0)
    } else if let Some(n) = s.strip_suffix('h') {
        (n, 3600.0)
    } else {
        (s, 1.0)
    };
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("bad duration {s:?} (use e.g. 15s, 500ms, 2m)"))?;
    if !v.is_finite() || v < 0.0 {
        return Err(format!("bad duration {s:?}"));
    }
    Ok(Duration::from_secs_f64(v * mul))
}

/// A distribution of talk-burst or gap lengths, in seconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "mean_s", rename_all = "lowercase")]
pub enum Dist {
    /// Exponential with this mean: memoryless, so a run is in steady state from its first second.
    Exp(f64),
    Const(f64),
}

impl Dist {
    pub fn mean(&self) -> f64 {
        match *self {
            Dist::Exp(m) | Dist::Const(m) => m,
        }
    }

    /// Sample with `u` uniform in [0, 1).
    pub fn sample(&self, u: f64) -> f64 {
        match *self {
            Dist::Exp(m) => -m * (1.0 - u).ln(),
            Dist::Const(m) => m,
        }
    }
}

/// How each channel talks: bursts held by one member, gaps with nobody holding the floor.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct TalkModel {
    pub burst: Dist,
    pub gap: Dist,
}

impl TalkModel {
    /// `constant` (the floor is always held: bursts as long as T2 allows, the next speaker right away),
    /// `exp:BURST,GAP` (exponential means in seconds) or `const:BURST,GAP`.
    pub fn parse(s: &str) -> Result<TalkModel, String> {
        let s = s.trim();
        if s == "constant" || s == "full" {
            return Ok(TalkModel {
                burst: Dist::Const(f64::INFINITY),
                gap: Dist::Const(0.0),
            });
        }
        let (kind, rest) = s.split_once(':').ok_or_else(|| {
            format!("bad talk model {s:?} (use constant, exp:BURST,GAP or const:BURST,GAP)")
        })?;
        let (b, g) = rest
            .split_once(',')
            .ok_or_else(|| format!("bad talk model {s:?}: want two values BURST,GAP"))?;
        let secs = |x: &str| -> Result<f64, String> {
            let d = parse_duration(x)?;
            Ok(d.as_secs_f64())
        };
        let (b, g) = (secs(b)?, secs(g)?);
        if b <= 0.0 {
            return Err(format!("bad talk model {s:?}: the burst must be > 0"));
        }
        match kind {
            "exp" => Ok(TalkModel {
                burst: Dist::Exp(b),
                gap: Dist::Exp(g),
            }),
            "const" => Ok(TalkModel {
                burst: Dist::Const(b),
                gap: Dist::Const(g),
            }),
            _ => Err(format!("bad talk model kind {kind:?} (exp or const)")),
        }
    }

    /// Fraction of time a channel has a speaker (ignoring switch overhead and the T2 cap).
    pub fn duty(&self) -> f64 {
        let b = self.burst.mean();
        if b.is_infinite() {
            return 1.0;
        }
        b / (b + self.gap.mean())
    }
}

/// Payload sizes (bytes after the RTP header).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum PayloadModel {
    /// Uniform in [lo, hi].
    Uniform(usize, usize),
    Fixed(usize),
    /// The sizes of the real Opus frames of `speech.opus20`, in order (a realistic size sequence).
    Opus(Vec<usize>),
}

impl PayloadModel {
    /// `60-160`, `100`, or `opus` (needs the frame sizes, read by the caller).
    pub fn parse(
        s: &str,
        opus_sizes: impl FnOnce() -> Result<Vec<usize>, String>,
    ) -> Result<Self, String> {
        let s = s.trim();
        let clamp = |n: usize| n.clamp(crate::stamp::STAMP_LEN, 1200);
        if s == "opus" {
            let sizes: Vec<usize> = opus_sizes()?.into_iter().map(clamp).collect();
            if sizes.is_empty() {
                return Err("no Opus frames found".into());
            }
            return Ok(PayloadModel::Opus(sizes));
        }
        if let Some((a, b)) = s.split_once('-') {
            let lo: usize = a
                .trim()
                .parse()
                .map_err(|_| format!("bad payload size {s:?}"))?;
            let hi: usize = b
                .trim()
                .parse()
                .map_err(|_| format!("bad payload size {s:?}"))?;
            if lo > hi {
                return Err(format!("bad payload size range {s:?}"));
            }
            return Ok(PayloadModel::Uniform(clamp(lo), clamp(hi)));
        }
        let n: usize = s
            .parse()
            .map_err(|_| format!("bad payload size {s:?} (use 60-160, 100 or opus)"))?;
        Ok(PayloadModel::Fixed(clamp(n)))
    }

    /// The size of packet `i` of a stream, with `u` uniform in [0, 1) for the uniform model.
    pub fn size(&self, i: u64, u: f64) -> usize {
        match self {
            PayloadModel::Uniform(lo, hi) => {
                lo + ((hi - lo + 1) as f64 * u) as usize % (hi - lo + 1)
            }
            PayloadModel::Fixed(n) => *n,
            PayloadModel::Opus(v) => v[(i % v.len() as u64) as usize],
        }
    }

    pub fn describe(&self) -> String {
        match self {
            PayloadModel::Uniform(a, b) => format!("{a}-{b} B uniform"),
            PayloadModel::Fixed(n) => format!("{n} B"),
            PayloadModel::Opus(v) => format!(
                "real Opus sizes ({} frames, mean {:.0} B)",
                v.len(),
                v.iter().sum::<usize>() as f64 / v.len() as f64
            ),
        }
    }
}

/// Read `[u16 BE length][bytes]…` frames (the `speech.opus20` format) and return their sizes.
pub fn opus_frame_sizes(data: &[u8]) -> Vec<usize> {
    let mut out = Vec::new();
    let mut i = 0;
    while i + 2 <= data.len() {
        let n = u16::from_be_bytes([data[i], data[i + 1]]) as usize;
        if i + 2 + n > data.len() {
            break;
        }
        out.push(n);
        i += 2 + n;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scenario_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../scenarios")
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("15s"), Ok(Duration::from_secs(15)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1.5"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("x").is_err());
        assert!(parse_duration("-1s").is_err());
    }

    #[test]
    fn talk_models() {
        let m = TalkModel::parse("exp:5,10").unwrap();
        assert_eq!(m.burst, Dist::Exp(5.0));
        assert_eq!(m.gap, Dist::Exp(10.0));
        assert!((m.duty() - 1.0 / 3.0).abs() < 1e-9);
        let c = TalkModel::parse("constant").unwrap();
        assert_eq!(c.duty(), 1.0);
        assert_eq!(c.gap.mean(), 0.0);
        let k = TalkModel::parse("const:500ms,0").unwrap();
        assert_eq!(k.burst, Dist::Const(0.5));
        assert!(TalkModel::parse("exp:5").is_err());
        assert!(TalkModel::parse("gauss:1,2").is_err());
        assert!(TalkModel::parse("exp:0,2").is_err());
    }

    #[test]
    fn exponential_sampling_has_the_mean() {
        let d = Dist::Exp(2.0);
        let n = 10_000;
        let mean: f64 = (0..n)
            .map(|i| d.sample((i as f64 + 0.5) / n as f64))
            .sum::<f64>()
            / n as f64;
        assert!((mean - 2.0).abs() < 0.05, "{mean}");
        assert_eq!(Dist::Const(3.0).sample(0.9), 3.0);
    }

    #[test]
    fn payload_models() {
        let u = PayloadModel::parse("60-160", || unreachable!()).unwrap();
        assert_eq!(u, PayloadModel::Uniform(60, 160));
        assert_eq!(u.size(0, 0.0), 60);
        assert_eq!(u.size(0, 0.999_999), 160);
        assert_eq!(
            PayloadModel::parse("10", || unreachable!()).unwrap(),
            PayloadModel::Fixed(28)
        );
        let o = PayloadModel::parse("opus", || Ok(vec![15, 93])).unwrap();
        assert_eq!(o.size(0, 0.0), 28);
        assert_eq!(o.size(1, 0.0), 93);
        assert!(PayloadModel::parse("160-60", || unreachable!()).is_err());
        assert!(PayloadModel::parse("opus", || Ok(vec![])).is_err());
    }

    #[test]
    fn opus_file_format() {
        let data = [0, 2, 0xaa, 0xbb, 0, 1, 0xcc, 0, 9];
        assert_eq!(opus_frame_sizes(&data), vec![2, 1]);
        // The real file, when the shared data is beside the repository.
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/speech.opus20");
        if let Ok(bytes) = std::fs::read(p) {
            let s = opus_frame_sizes(&bytes);
            assert_eq!(s.len(), 431);
            assert!(s.iter().all(|&n| (15..=93).contains(&n)));
        }
    }

    #[test]
    fn scenario_parsing_and_unknown_fields() {
        let sc = Scenario::from_toml(
            "channels = 3\nmembers = 2\nduration = \"5s\"\ntalk = \"exp:1,1\"\n",
        )
        .unwrap();
        assert_eq!(sc.channels, Some(3));
        assert_eq!(sc.duration.as_deref(), Some("5s"));
        assert!(Scenario::from_toml("chanels = 3").is_err());
    }

    #[test]
    fn shipped_scenarios_parse_and_are_valid() {
        let dir = scenario_dir();
        let names = list(&dir);
        for want in [
            "small",
            "thousand-channels",
            "ten-thousand-channels",
            "big-channel",
            "switch-storm",
        ] {
            assert!(
                names.iter().any(|n| n == want),
                "missing scenario {want}: {names:?}"
            );
        }
        for n in &names {
            let (sc, _) = Scenario::load(n, &dir).unwrap_or_else(|e| panic!("{e}"));
            assert!(sc.description.is_some(), "{n}: no description");
            if let Some(t) = &sc.talk {
                TalkModel::parse(t).unwrap_or_else(|e| panic!("{n}: {e}"));
            }
            if let Some(d) = &sc.duration {
                parse_duration(d).unwrap_or_else(|e| panic!("{n}: {e}"));
            }
            if let Some(p) = &sc.payload {
                PayloadModel::parse(p, || Ok(vec![50])).unwrap_or_else(|e| panic!("{n}: {e}"));
            }
            assert!(
                sc.channels.unwrap_or(1) >= 1 && sc.members.unwrap_or(2) >= 2,
                "{n}"
            );
        }
        // CI's smoke run must fit in a minute.
        let (small, _) = Scenario::load("small", &dir).unwrap();
        let d = parse_duration(small.duration.as_deref().unwrap_or("15s")).unwrap();
        assert!(d <= Duration::from_secs(30));
    }
}
