//! The table `model.summary()` prints in Keras 3.
//!
//! Sequential models get Keras's three columns at Keras's widths. Functional
//! models add "Connected to"; their columns grow to fit the text instead of
//! wrapping it as Keras's terminal renderer does, so nothing is cut off.

/// One row: `name (Class)`, output shape, parameter count, inputs.
pub(crate) struct Row {
    pub name: String,
    pub shape: String,
    pub params: String,
    pub connected: String,
}

/// Keras's column widths for Sequential models, as Keras 3.15 prints them
/// outside a terminal.
const SEQUENTIAL: [usize; 3] = [33, 24, 15];
/// Smallest widths for functional models.
const FUNCTIONAL: [usize; 4] = [28, 22, 12, 24];

/// `counts`: (total, trainable, non-trainable), each as (count, size).
pub(crate) fn table(
    name: &str,
    rows: &[Row],
    connected: bool,
    counts: [(String, String); 3],
) -> String {
    let cells = |r: &Row| -> Vec<String> {
        let mut v = vec![r.name.clone(), r.shape.clone(), r.params.clone()];
        if connected {
            v.push(r.connected.clone());
        }
        v
    };
    let header: Vec<String> = ["Layer (type)", "Output Shape", "Param #", "Connected to"]
        .iter()
        .take(if connected { 4 } else { 3 })
        .map(|s| s.to_string())
        .collect();
    let widths: Vec<usize> = if connected {
        FUNCTIONAL
            .iter()
            .enumerate()
            .map(|(i, &min)| {
                rows.iter()
                    .map(|r| cells(r)[i].chars().count() + 2)
                    .chain([header[i].chars().count() + 2, min])
                    .max()
                    .unwrap_or(min)
            })
            .collect()
    } else {
        SEQUENTIAL.to_vec()
    };
    let line = |l: char, m: char, r: char, fill: char| -> String {
        let mut s = String::new();
        s.push(l);
        for (i, w) in widths.iter().enumerate() {
            s.extend(std::iter::repeat_n(fill, *w));
            s.push(if i + 1 < widths.len() { m } else { r });
        }
        s
    };
    let row = |sep: char, cells: &[String]| -> String {
        let mut s = String::new();
        s.push(sep);
        for (i, (c, w)) in cells.iter().zip(&widths).enumerate() {
            let pad = w.saturating_sub(2);
            // The parameter count is right-aligned, as Keras prints it.
            if i == 2 {
                s.push_str(&format!(" {c:>pad$} {sep}"));
            } else {
                s.push_str(&format!(" {c:<pad$} {sep}"));
            }
        }
        s
    };
    let mut out = vec![
        format!("Model: \"{name}\""),
        line('┏', '┳', '┓', '━'),
        row('┃', &header),
        line('┡', '╇', '┩', '━'),
    ];
    for (i, r) in rows.iter().enumerate() {
        out.push(row('│', &cells(r)));
        out.push(if i + 1 < rows.len() {
            line('├', '┼', '┤', '─')
        } else {
            line('└', '┴', '┘', '─')
        });
    }
    let [(total, total_size), (trainable, trainable_size), (frozen, frozen_size)] = counts;
    out.push(format!(" Total params: {total} ({total_size})"));
    out.push(format!(" Trainable params: {trainable} ({trainable_size})"));
    out.push(format!(" Non-trainable params: {frozen} ({frozen_size})"));
    let mut s = out.join("\n");
    s.push('\n');
    s
}
