//! Configuration documents: formats, parsing with precise errors, RFC 7396
//! merge and rendering back to text.
//!
//! Structured formats (`json`, `yaml`, `toml`) parse into one model, a
//! `serde_json::Value`, so a YAML base can be patched by a JSON layer and the
//! result rendered in the nearest layer's format. `properties` is a flat,
//! ordered list of key/value pairs; merging overlays keys. `text` (UTF-8) and
//! `binary` are opaque and can only be replaced or deleted.

use std::fmt;
use std::str::FromStr;

use serde_json::Value;

/// Format of a configuration value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Format {
    /// JSON document.
    Json,
    /// YAML document (one document per value).
    Yaml,
    /// TOML document (a table at the top).
    Toml,
    /// Java-style `.properties` (`key=value` lines).
    Properties,
    /// UTF-8 text.
    Text,
    /// Opaque bytes.
    Binary,
}

impl Format {
    /// Every format, in a stable order.
    pub const ALL: [Format; 6] = [
        Format::Json,
        Format::Yaml,
        Format::Toml,
        Format::Properties,
        Format::Text,
        Format::Binary,
    ];

    /// The lower-case name used on the wire (`json`, `yaml`, …).
    pub fn name(self) -> &'static str {
        match self {
            Self::Json => "json",
            Self::Yaml => "yaml",
            Self::Toml => "toml",
            Self::Properties => "properties",
            Self::Text => "text",
            Self::Binary => "binary",
        }
    }

    /// Whether values parse into the shared tree model (json, yaml, toml).
    pub fn is_structured(self) -> bool {
        matches!(self, Self::Json | Self::Yaml | Self::Toml)
    }

    /// Whether a `merge` layer of this format is allowed.
    pub fn is_mergeable(self) -> bool {
        self.is_structured() || self == Self::Properties
    }

    /// Guesses the format from a file name's extension.
    pub fn from_extension(path: &str) -> Option<Self> {
        let ext = path.rsplit_once('.')?.1.to_ascii_lowercase();
        Some(match ext.as_str() {
            "json" => Self::Json,
            "yaml" | "yml" => Self::Yaml,
            "toml" => Self::Toml,
            "properties" => Self::Properties,
            "txt" | "text" | "conf" | "ini" | "md" => Self::Text,
            "bin" => Self::Binary,
            _ => return None,
        })
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Format {
    type Err = DocumentError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|f| f.name() == s.trim().to_ascii_lowercase())
            .ok_or_else(|| DocumentError::UnknownFormat(s.to_owned()))
    }
}

/// How a layer combines with what its ancestors resolve to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mode {
    /// This layer's value is the whole value.
    Replace,
    /// This layer patches the value resolved from the parent chain.
    Merge,
    /// Tombstone: the key does not exist here and below.
    Delete,
}

impl Mode {
    /// The lower-case name used on the wire.
    pub fn name(self) -> &'static str {
        match self {
            Self::Replace => "replace",
            Self::Merge => "merge",
            Self::Delete => "delete",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Mode {
    type Err = DocumentError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "replace" => Ok(Self::Replace),
            "merge" => Ok(Self::Merge),
            "delete" => Ok(Self::Delete),
            _ => Err(DocumentError::UnknownMode(s.to_owned())),
        }
    }
}

/// A document problem, precise enough for a user to fix it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DocumentError {
    /// The value does not parse in its declared format.
    #[error("invalid {format} at line {line}, column {column}: {message}")]
    Syntax {
        /// Declared format.
        format: Format,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
        /// Parser message.
        message: String,
    },
    /// The value parses but cannot be used (for example a TOML value that is
    /// not a table at the top).
    #[error("invalid {format}: {message}")]
    Shape {
        /// Declared format.
        format: Format,
        /// What is wrong.
        message: String,
    },
    /// Unknown format name.
    #[error("unknown format {0:?} (use json, yaml, toml, properties, text or binary)")]
    UnknownFormat(String),
    /// Unknown mode name.
    #[error("unknown mode {0:?} (use replace, merge or delete)")]
    UnknownMode(String),
    /// The two formats cannot be merged.
    #[error("cannot merge a {patch} layer over a {base} value")]
    Incompatible {
        /// Format of the value below.
        base: Format,
        /// Format of the merge layer.
        patch: Format,
    },
}

/// A parsed document.
#[derive(Debug, Clone, PartialEq)]
pub enum Document {
    /// json, yaml or toml.
    Tree(Value),
    /// properties, in file order, later duplicates overriding earlier ones.
    Properties(Vec<(String, String)>),
}

/// 1-based (line, column) of a byte offset.
fn position(text: &str, offset: usize) -> (usize, usize) {
    let before = &text.as_bytes()[..offset.min(text.len())];
    let line = before.iter().filter(|b| **b == b'\n').count() + 1;
    let column = before.iter().rev().take_while(|b| **b != b'\n').count() + 1;
    (line, column)
}

fn utf8(format: Format, bytes: &[u8]) -> Result<&str, DocumentError> {
    std::str::from_utf8(bytes).map_err(|e| {
        let (line, column) = position(&String::from_utf8_lossy(bytes), e.valid_up_to());
        DocumentError::Syntax {
            format,
            line,
            column,
            message: "not valid UTF-8".into(),
        }
    })
}

/// Checks that `bytes` is a valid value of `format` (every format; `binary`
/// accepts anything).
pub fn validate(format: Format, bytes: &[u8]) -> Result<(), DocumentError> {
    match format {
        Format::Binary => Ok(()),
        Format::Text => utf8(format, bytes).map(drop),
        _ => parse(format, bytes).map(drop),
    }
}

/// Parses a mergeable value (json, yaml, toml, properties).
pub fn parse(format: Format, bytes: &[u8]) -> Result<Document, DocumentError> {
    let text = utf8(format, bytes)?;
    match format {
        Format::Json => serde_json::from_str::<Value>(text)
            .map(Document::Tree)
            .map_err(|e| DocumentError::Syntax {
                format,
                line: e.line(),
                column: e.column(),
                message: strip_position(&e.to_string()),
            }),
        Format::Yaml => {
            if text.trim().is_empty() {
                return Ok(Document::Tree(Value::Null));
            }
            serde_norway::from_str::<Value>(text)
                .map(Document::Tree)
                .map_err(|e| {
                    let (line, column) = e.location().map_or((1, 1), |l| (l.line(), l.column()));
                    DocumentError::Syntax {
                        format,
                        line,
                        column,
                        message: strip_position(&e.to_string()),
                    }
                })
        }
        Format::Toml => {
            let table = text.parse::<toml::Table>().map_err(|e| {
                let (line, column) = e.span().map_or((1, 1), |s| position(text, s.start));
                DocumentError::Syntax {
                    format,
                    line,
                    column,
                    message: e.message().to_owned(),
                }
            })?;
            serde_json::to_value(table)
                .map(Document::Tree)
                .map_err(|e| DocumentError::Shape {
                    format,
                    message: e.to_string(),
                })
        }
        Format::Properties => {
            let mut pairs: Vec<(String, String)> = Vec::new();
            java_properties::PropertiesIter::new_with_encoding(text.as_bytes(), encoding_rs::UTF_8)
                .read_into(|k, v| overlay_one(&mut pairs, k, v))
                .map_err(|e| DocumentError::Syntax {
                    format,
                    line: e.line_number().unwrap_or(1),
                    column: 1,
                    message: e.to_string(),
                })?;
            Ok(Document::Properties(pairs))
        }
        Format::Text | Format::Binary => Err(DocumentError::Shape {
            format,
            message: "text and binary values are opaque and cannot be merged".into(),
        }),
    }
}

/// serde messages repeat "at line X column Y"; we report those separately.
fn strip_position(message: &str) -> String {
    match message.rfind(" at line ") {
        Some(i) => message[..i].to_owned(),
        None => message.to_owned(),
    }
}

fn overlay_one(pairs: &mut Vec<(String, String)>, key: String, value: String) {
    match pairs.iter_mut().find(|(k, _)| *k == key) {
        Some(slot) => slot.1 = value,
        None => pairs.push((key, value)),
    }
}

/// Applies `patch` over `base` (`None`: nothing below). Trees merge with RFC
/// 7396 semantics; properties overlay keys.
pub fn merge(
    base: Option<(Format, Document)>,
    patch_format: Format,
    patch: Document,
) -> Result<Document, DocumentError> {
    match (base, patch) {
        (None, Document::Tree(p)) => {
            let mut doc = Value::Null;
            json_patch::merge(&mut doc, &p);
            Ok(Document::Tree(doc))
        }
        (None, Document::Properties(p)) => Ok(Document::Properties(p)),
        (Some((_, Document::Tree(mut b))), Document::Tree(p)) => {
            json_patch::merge(&mut b, &p);
            Ok(Document::Tree(b))
        }
        (Some((_, Document::Properties(mut b))), Document::Properties(p)) => {
            for (k, v) in p {
                overlay_one(&mut b, k, v);
            }
            Ok(Document::Properties(b))
        }
        (Some((base, _)), _) => Err(DocumentError::Incompatible {
            base,
            patch: patch_format,
        }),
    }
}

/// Renders a document as `format`.
pub fn render(format: Format, doc: &Document) -> Result<Vec<u8>, DocumentError> {
    let shape = |message: String| DocumentError::Shape { format, message };
    match (format, doc) {
        (Format::Json, Document::Tree(v)) => {
            let mut out = serde_json::to_vec_pretty(v).map_err(|e| shape(e.to_string()))?;
            out.push(b'\n');
            Ok(out)
        }
        (Format::Yaml, Document::Tree(v)) => serde_norway::to_string(v)
            .map(String::into_bytes)
            .map_err(|e| shape(e.to_string())),
        (Format::Toml, Document::Tree(v)) => match v {
            Value::Null => Ok(Vec::new()),
            Value::Object(_) => {
                if let Some(pointer) = first_null(v, String::new()) {
                    return Err(shape(format!(
                        "TOML cannot represent the null at {pointer}"
                    )));
                }
                toml::to_string_pretty(v)
                    .map(String::into_bytes)
                    .map_err(|e| shape(e.to_string()))
            }
            _ => Err(shape("the top of a TOML document must be a table".into())),
        },
        (Format::Properties, Document::Properties(pairs)) => {
            let mut out = Vec::new();
            let mut writer =
                java_properties::PropertiesWriter::new_with_encoding(&mut out, encoding_rs::UTF_8);
            for (k, v) in pairs {
                writer.write(k, v).map_err(|e| shape(e.to_string()))?;
            }
            writer.finish().map_err(|e| shape(e.to_string()))?;
            drop(writer);
            Ok(out)
        }
        (format, _) => Err(shape(format!(
            "a merged value cannot be rendered as {format}"
        ))),
    }
}

/// JSON pointer of the first null in `value`, if any.
fn first_null(value: &Value, at: String) -> Option<String> {
    match value {
        Value::Null => Some(if at.is_empty() { "/".into() } else { at }),
        Value::Object(map) => map
            .iter()
            .find_map(|(k, v)| first_null(v, format!("{at}/{k}"))),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .find_map(|(i, v)| first_null(v, format!("{at}/{i}"))),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn syntax_errors_carry_line_and_column() {
        let err = validate(Format::Json, b"{\n  \"a\": 1,\n  \"b\": }\n").unwrap_err();
        assert!(
            matches!(err, DocumentError::Syntax { line: 3, .. }),
            "{err}"
        );
        let err = validate(Format::Yaml, b"a: 1\nb: [1, 2\nc: 3\n").unwrap_err();
        assert!(
            matches!(
                err,
                DocumentError::Syntax {
                    format: Format::Yaml,
                    ..
                }
            ),
            "{err}"
        );
        let err = validate(Format::Toml, b"a = 1\nb = = 2\n").unwrap_err();
        assert!(
            matches!(err, DocumentError::Syntax { line: 2, .. }),
            "{err}"
        );
        let msg = err.to_string();
        assert!(msg.starts_with("invalid toml at line 2, column"), "{msg}");
        let err = validate(Format::Text, b"ok\n\xff").unwrap_err();
        assert!(
            matches!(
                err,
                DocumentError::Syntax {
                    line: 2,
                    column: 1,
                    ..
                }
            ),
            "{err}"
        );
        validate(Format::Binary, b"\xff\x00").unwrap();
    }

    #[test]
    fn merge_follows_rfc7396_across_formats() {
        let base = parse(
            Format::Yaml,
            b"server:\n  port: 7000\n  host: a\nlimits: [1, 2]\nold: x\n",
        )
        .unwrap();
        let patch = parse(
            Format::Json,
            br#"{"server":{"port":7100},"limits":[3],"old":null}"#,
        )
        .unwrap();
        let merged = merge(Some((Format::Yaml, base)), Format::Json, patch).unwrap();
        assert_eq!(
            merged,
            Document::Tree(json!({"server": {"port": 7100, "host": "a"}, "limits": [3]}))
        );
        let toml = render(Format::Toml, &merged).unwrap();
        let back = parse(Format::Toml, &toml).unwrap();
        assert_eq!(back, merged);
    }

    #[test]
    fn toml_refuses_nulls_with_their_position() {
        let doc = Document::Tree(json!({"a": {"b": [1, null]}}));
        let err = render(Format::Toml, &doc).unwrap_err().to_string();
        assert!(err.contains("/a/b/1"), "{err}");
    }

    #[test]
    fn merge_over_nothing_drops_nulls() {
        let patch = parse(Format::Json, br#"{"a":1,"b":null}"#).unwrap();
        assert_eq!(
            merge(None, Format::Json, patch).unwrap(),
            Document::Tree(json!({"a": 1}))
        );
    }

    #[test]
    fn properties_overlay_keys_in_order() {
        let base = parse(Format::Properties, b"# c\na=1\nb = 2\n").unwrap();
        let patch = parse(Format::Properties, b"b: 3\nc=4\n").unwrap();
        let merged = merge(Some((Format::Properties, base)), Format::Properties, patch).unwrap();
        assert_eq!(
            merged,
            Document::Properties(vec![
                ("a".into(), "1".into()),
                ("b".into(), "3".into()),
                ("c".into(), "4".into())
            ])
        );
        let rendered = render(Format::Properties, &merged).unwrap();
        assert_eq!(parse(Format::Properties, &rendered).unwrap(), merged);
    }

    #[test]
    fn incompatible_merges_are_refused() {
        let base = parse(Format::Properties, b"a=1").unwrap();
        let patch = parse(Format::Json, br#"{"a":2}"#).unwrap();
        let err = merge(Some((Format::Properties, base)), Format::Json, patch).unwrap_err();
        assert_eq!(
            err.to_string(),
            "cannot merge a json layer over a properties value"
        );
        assert!(parse(Format::Text, b"x").is_err());
    }

    #[test]
    fn format_and_mode_names_round_trip() {
        for f in Format::ALL {
            assert_eq!(f.name().parse::<Format>().unwrap(), f);
        }
        assert!("xml".parse::<Format>().is_err());
        assert_eq!("MERGE".parse::<Mode>().unwrap(), Mode::Merge);
        assert_eq!(Format::from_extension("a/server.yml"), Some(Format::Yaml));
        assert_eq!(Format::from_extension("noext"), None);
    }
}
