//! Numeric CSV: float32 features and a label column, either an integer
//! class index or (for regression) a float target.

use super::{invalid, ImportError};
use crate::records::{encode_record, DType, Encoded, RecordLayout};

/// Which column holds the label.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LabelColumn {
    Index(usize),
    Name(String),
}

impl std::str::FromStr for LabelColumn {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s.parse::<usize>() {
            Ok(i) => LabelColumn::Index(i),
            Err(_) => LabelColumn::Name(s.to_string()),
        })
    }
}

/// Parses the whole file first so that a bad row stores nothing.
pub fn parse_csv(
    name: &str,
    text: &[u8],
    label: &LabelColumn,
    header: bool,
    regression: bool,
) -> Result<Encoded, ImportError> {
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(header)
        .trim(csv::Trim::All)
        .flexible(true)
        .from_reader(text);
    let label_at = match label {
        LabelColumn::Index(i) => *i,
        LabelColumn::Name(n) => {
            if !header {
                return Err(invalid(
                    name,
                    format!("label column '{n}' is a name, so the file needs --header (or give the column's index)"),
                ));
            }
            let headers = reader
                .headers()
                .map_err(|e| invalid(name, format!("cannot read the header: {e}")))?;
            headers.iter().position(|h| h == n).ok_or_else(|| {
                invalid(
                    name,
                    format!(
                        "no column named '{n}' (columns: {})",
                        headers.iter().collect::<Vec<_>>().join(", ")
                    ),
                )
            })?
        }
    };
    let mut layout: Option<RecordLayout> = None;
    let mut bytes = Vec::new();
    let mut features = Vec::new();
    let (mut records, mut classes) = (0u64, 0u32);
    for row in reader.records() {
        let row = row.map_err(|e| {
            let line = e.position().map(|p| p.line()).unwrap_or(0);
            ImportError::Row {
                file: name.into(),
                line,
                reason: e.to_string(),
            }
        })?;
        let line = row.position().map(|p| p.line()).unwrap_or(0);
        let bad = |reason: String| ImportError::Row {
            file: name.into(),
            line,
            reason,
        };
        if row.len() == 1 && row.get(0) == Some("") {
            continue;
        }
        let width = match &layout {
            Some(l) => l.features() + 1,
            None => row.len(),
        };
        if row.len() != width {
            return Err(bad(format!("{} columns, expected {width}", row.len())));
        }
        if label_at >= row.len() {
            return Err(bad(format!(
                "label column {label_at} is past the last column ({} columns)",
                row.len()
            )));
        }
        if width < 2 {
            return Err(bad("needs at least one feature column and the label".into()));
        }
        features.clear();
        let mut label_value = 0f64;
        for (i, field) in row.iter().enumerate() {
            if i == label_at && regression {
                label_value = field
                    .parse::<f32>()
                    .ok()
                    .filter(|v| v.is_finite())
                    .ok_or_else(|| bad(format!("target '{field}' is not a finite number")))?
                    .into();
            } else if i == label_at {
                label_value = field
                    .parse::<u32>()
                    .map_err(|_| {
                        bad(format!(
                            "label '{field}' is not a non-negative integer class index (for \
                         float targets, import with --regression)"
                        ))
                    })?
                    .into();
            } else {
                let v = field
                    .parse::<f32>()
                    .map_err(|_| bad(format!("column {}: '{field}' is not a number", i + 1)))?;
                if !v.is_finite() {
                    return Err(bad(format!("column {}: '{field}' is not finite", i + 1)));
                }
                features.push(v);
            }
        }
        let l = layout.get_or_insert_with(|| RecordLayout {
            feature_shape: vec![width - 1],
            feature_dtype: DType::F32,
            label_dtype: if regression { DType::F32 } else { DType::U32 },
        });
        encode_record(l, &features, label_value, &mut bytes);
        if !regression {
            classes = classes.max((label_value as u32).saturating_add(1));
        }
        records += 1;
    }
    let layout = layout.ok_or_else(|| invalid(name, "holds no rows"))?;
    Ok(Encoded {
        layout,
        records,
        classes,
        bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_with_named_label() {
        let text = b"a,label,b\n1.5,2,3\n-1,0,4e2\n";
        let e = parse_csv(
            "t.csv",
            text,
            &LabelColumn::Name("label".into()),
            true,
            false,
        )
        .unwrap();
        assert_eq!(e.records, 2);
        assert_eq!(e.classes, 3);
        let r = e.layout.view("t", &e.bytes).unwrap();
        let mut f = [0f32; 2];
        r.features_into(1, &mut f);
        assert_eq!(f, [-1.0, 400.0]);
        assert_eq!(r.label(0), 2);
    }

    #[test]
    fn bad_row_names_its_line() {
        let text = b"x,y,label\n1,2,0\n3,oops,1\n";
        let err = parse_csv("t.csv", text, &LabelColumn::Index(2), true, false).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("line 3") && msg.contains("oops"), "{msg}");
        let err = parse_csv(
            "t.csv",
            b"1,2,0\n1,2\n",
            &LabelColumn::Index(2),
            false,
            false,
        )
        .unwrap_err();
        assert!(err.to_string().contains("line 2"), "{err}");
        let err =
            parse_csv("t.csv", b"1,2,-1\n", &LabelColumn::Index(2), false, false).unwrap_err();
        assert!(err.to_string().contains("'-1'"), "{err}");
        assert!(err.to_string().contains("--regression"), "{err}");
    }

    #[test]
    fn regression_targets_are_stored_as_float32() {
        let text = b"x,y,price\n1,2,-0.5\n3,4,1e3\n";
        let e = parse_csv(
            "t.csv",
            text,
            &LabelColumn::Name("price".into()),
            true,
            true,
        )
        .unwrap();
        assert_eq!(e.layout.label_dtype, DType::F32);
        assert_eq!(e.classes, 0);
        let r = e.layout.view("t", &e.bytes).unwrap();
        assert_eq!((r.target(0), r.target(1)), (-0.5, 1000.0));
        let err =
            parse_csv("t.csv", b"1,2,nan\n", &LabelColumn::Index(2), false, true).unwrap_err();
        assert!(err.to_string().contains("not a finite number"), "{err}");
    }
}
