//! Durations on the command line: `2`, `2s`, `500ms`, `1.5`, `1m`.

use std::time::Duration;

pub fn parse(raw: &str) -> Result<Duration, String> {
    let s = raw.trim();
    let (num, scale) = if let Some(n) = s.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60.0)
    } else if let Some(n) = s.strip_suffix('h') {
        (n, 3600.0)
    } else {
        (s, 1.0)
    };
    let v: f64 = num.trim().parse().map_err(|_| {
        format!("invalid duration {raw:?}: use seconds like 2, 2s, 500ms, 1m or 1h")
    })?;
    if !v.is_finite() || v < 0.0 {
        return Err(format!(
            "invalid duration {raw:?}: must be a positive number"
        ));
    }
    Ok(Duration::from_secs_f64(v * scale))
}

/// A duration, or `off` (also `never`) for none.
pub fn parse_or_off(raw: &str) -> Result<Option<Duration>, String> {
    match raw.trim() {
        "off" | "never" => Ok(None),
        _ => parse(raw).map(Some),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses() {
        assert_eq!(super::parse("2").unwrap().as_millis(), 2000);
        assert_eq!(super::parse("500ms").unwrap().as_millis(), 500);
        assert_eq!(super::parse("1m").unwrap().as_secs(), 60);
        assert!(super::parse("soon").is_err());
        assert_eq!(super::parse_or_off("off"), Ok(None));
        assert_eq!(
            super::parse_or_off("2m"),
            Ok(Some(std::time::Duration::from_secs(120)))
        );
    }
}
