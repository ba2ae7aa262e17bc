//! What a run leaves behind: `<dir>/<scenario>.json` (the [`Report`] as it is) and `.svg` (its plots).

use crate::report::Report;
use std::path::{Path, PathBuf};

/// Write `<dir>/<scenario>.json` and `.svg`; returns their paths.
pub fn write(r: &Report, dir: &Path) -> Result<(PathBuf, PathBuf), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let json = dir.join(format!("{}.json", r.scenario));
    let svg = dir.join(format!("{}.svg", r.scenario));
    let text = serde_json::to_string_pretty(r).map_err(|e| e.to_string())?;
    std::fs::write(&json, text).map_err(|e| format!("{}: {e}", json.display()))?;
    std::fs::write(&svg, crate::svg::render(r)).map_err(|e| format!("{}: {e}", svg.display()))?;
    Ok((json, svg))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::tests::sample_report;

    #[test]
    fn json_roundtrip_and_files() {
        let r = sample_report();
        let dir = std::env::temp_dir().join(format!("loadtest-report-{}", std::process::id()));
        let (json, svg) = write(&r, &dir).expect("write");
        let back: Report = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
        assert_eq!(back.phases.len(), 2);
        assert_eq!(back.summary.delivered, 14_990);
        let ratio = |r: &Report| r.ceiling.as_ref().and_then(|c| c.ratio).unwrap_or(0.0);
        assert!((ratio(&back) - ratio(&r)).abs() < 1e-12);
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
        assert!(v["summary"]["latency"]["p99_us"].as_f64().unwrap() > 0.0);
        assert!(std::fs::read_to_string(&svg).unwrap().starts_with("<svg"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
