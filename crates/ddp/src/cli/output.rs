//! Printing: aligned tables for people, JSON for scripts.

use serde_json::Value;

/// Prints rows under headers, columns aligned.
pub fn table(headers: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: &mut dyn Iterator<Item = &str>| {
        let parts: Vec<String> = cells.zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        println!("{}", parts.join("  ").trim_end());
    };
    line(&mut headers.iter().copied());
    for row in rows {
        line(&mut row.iter().map(String::as_str));
    }
}

/// Prints a JSON array answer: as JSON for scripts (`json`), else as a table of `row` of each
/// element under `headers`.
pub fn list(json: bool, value: &Value, headers: &[&str], row: impl Fn(&Value) -> Vec<String>) {
    if json {
        self::json(value);
    } else {
        let rows: Vec<Vec<String>> = value.as_array().into_iter().flatten().map(row).collect();
        table(headers, &rows);
    }
}

/// Prints `key: value` lines for an object's fields.
pub fn fields(value: &Value, order: &[(&str, &str)]) {
    let width = order.iter().map(|(_, label)| label.chars().count()).max().unwrap_or(0);
    for (field, label) in order {
        println!("{label:<width$}  {}", cell(&value[*field]));
    }
}

/// A JSON value as a table cell: strings bare, `null` as `-`, anything else as JSON.
pub fn cell(value: &Value) -> String {
    match value {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Prints JSON (pretty) for scripts.
pub fn json(value: &Value) {
    println!("{}", serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string()));
}
