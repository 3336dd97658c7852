//! JSON for the command line: the library's reports in qemu's key style, and JSON values
//! printed for people (`info`'s "Format specific information").

/// A library report as the command line's JSON: qemu's key style, kebab-case
/// (`virtual-size`, `free-bytes`), as `info`, `measure`, `check` and `map` print theirs; the
/// library's own serde names (snake_case) stay as they are for Rust users.
pub fn kebab_json(report: &impl serde::Serialize) -> serde_json::Value {
    fn kebab(v: serde_json::Value) -> serde_json::Value {
        match v {
            serde_json::Value::Object(m) => serde_json::Value::Object(
                m.into_iter()
                    .map(|(k, v)| (k.replace('_', "-"), kebab(v)))
                    .collect(),
            ),
            serde_json::Value::Array(a) => {
                serde_json::Value::Array(a.into_iter().map(kebab).collect())
            }
            other => other,
        }
    }
    kebab(serde_json::to_value(report).expect("a report serializes"))
}

/// `v` as qemu-img's human output nests it: `key: value` lines indented four spaces per
/// level (dashes in keys shown as spaces), `[i]:` for array items.
pub fn human_value(out: &mut String, v: &serde_json::Value, depth: usize) {
    let pad = "    ".repeat(depth);
    match v {
        serde_json::Value::Object(m) => {
            for (k, val) in m {
                let key = k.replace('-', " ");
                if val.is_object() || val.is_array() {
                    out.push_str(&format!("{pad}{key}:\n"));
                    human_value(out, val, depth + 1);
                } else {
                    out.push_str(&format!("{pad}{key}: {}\n", scalar(val)));
                }
            }
        }
        serde_json::Value::Array(a) => {
            for (i, val) in a.iter().enumerate() {
                out.push_str(&format!("{pad}[{i}]:\n"));
                human_value(out, val, depth + 1);
            }
        }
        other => out.push_str(&format!("{pad}{}\n", scalar(other))),
    }
}

/// A scalar as text: strings without their quotes.
fn scalar(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}
