//! Configuration documents: formats, parsing with precise errors, RFC 7396
//! merge and rendering back to text.
//!
//! Structured formats (`json`, `yaml`, `toml`) parse into one model, a
//! `serde_json::Value`, so a YAML base can be patched by a JSON layer and the
//! result rendered in the nearest layer's format. `properties` is a flat,
//! ordered list of key/value pairs; merging overlays keys. `text` (UTF-8) and
//! `binary` are opaque and can only be replaced or deleted.

use std::collections::HashMap;
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
    /// A value cannot be rendered in another format (only json, yaml and
    /// toml convert into each other).
    #[error(
        "a {from} value cannot be rendered as {to} (json, yaml and toml convert into each other)"
    )]
    Unconvertible {
        /// Format of the value.
        from: Format,
        /// Format asked for.
        to: Format,
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
            bounded_yaml(text).map(Document::Tree).map_err(|e| {
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
            let mut read: Vec<(String, String)> = Vec::new();
            java_properties::PropertiesIter::new_with_encoding(text.as_bytes(), encoding_rs::UTF_8)
                .read_into(|k, v| read.push((k, v)))
                .map_err(|e| DocumentError::Syntax {
                    format,
                    line: e.line_number().unwrap_or(1),
                    column: 1,
                    message: e.to_string(),
                })?;
            let mut pairs = Vec::with_capacity(read.len());
            overlay(&mut pairs, read);
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

/// Overlays `patch` onto `pairs` key by key, keeping the first position of
/// each key. Linear in both: a key's slot is found through an index, not by
/// scanning (a scan made a large properties merge quadratic).
fn overlay(pairs: &mut Vec<(String, String)>, patch: impl IntoIterator<Item = (String, String)>) {
    let mut index: HashMap<String, usize> = HashMap::with_capacity(pairs.len());
    for (i, (k, _)) in pairs.iter().enumerate() {
        index.entry(k.clone()).or_insert(i);
    }
    for (key, value) in patch {
        match index.get(&key) {
            Some(&i) => pairs[i].1 = value,
            None => {
                index.insert(key.clone(), pairs.len());
                pairs.push((key, value));
            }
        }
    }
}

/// What one node of a parsed YAML document costs against the expansion
/// budget, on top of the bytes of its scalars and keys: about what the node
/// itself takes in memory, so the budget bounds memory and time alike.
const YAML_NODE_COST: usize = 8;

/// A YAML document may expand (through aliases) to this much, plus
/// [`YAML_EXPANSION_PER_BYTE`] per byte of its text. Without aliases a
/// document costs at most a few times its own size, far below this.
pub const YAML_EXPANSION_BASE: usize = 4 << 20;

/// See [`YAML_EXPANSION_BASE`].
pub const YAML_EXPANSION_PER_BYTE: usize = 8;

/// Parses YAML into the tree model, refusing a document whose aliases expand
/// it beyond its budget: `a: &a [1, …]` / `b: [*a, *a, …]` turns 100 KB of
/// text into 10⁸ values, and serde_norway's own alias limit only bounds how
/// often aliases are used, not what they expand to. The budget is charged
/// as values are built, so a bomb stops at the budget, not after expanding.
fn bounded_yaml(text: &str) -> Result<Value, serde_norway::Error> {
    use serde::de::DeserializeSeed as _;
    let budget = Budget {
        left: std::cell::Cell::new(
            YAML_EXPANSION_BASE.saturating_add(text.len().saturating_mul(YAML_EXPANSION_PER_BYTE)),
        ),
    };
    BoundedValue(&budget).deserialize(serde_norway::Deserializer::from_str(text))
}

/// What is left of a document's expansion budget.
struct Budget {
    left: std::cell::Cell<usize>,
}

impl Budget {
    fn charge<E: serde::de::Error>(&self, bytes: usize) -> Result<(), E> {
        let cost = bytes.saturating_add(YAML_NODE_COST);
        match self.left.get().checked_sub(cost) {
            Some(left) => {
                self.left.set(left);
                Ok(())
            }
            None => Err(E::custom(format_args!(
                "the document expands (through aliases) beyond {} MiB plus {} bytes per byte of \
                 its text; write the repeated parts out or use fewer aliases",
                YAML_EXPANSION_BASE >> 20,
                YAML_EXPANSION_PER_BYTE
            ))),
        }
    }
}

/// Builds a `serde_json::Value`, charging every node to the budget.
#[derive(Clone, Copy)]
struct BoundedValue<'b>(&'b Budget);

impl<'de> serde::de::DeserializeSeed<'de> for BoundedValue<'_> {
    type Value = Value;

    fn deserialize<D: serde::Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for BoundedValue<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any YAML value")
    }

    fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<Value, E> {
        self.0.charge(0)?;
        Ok(Value::Bool(v))
    }

    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Value, E> {
        self.0.charge(0)?;
        Ok(Value::from(v))
    }

    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Value, E> {
        self.0.charge(0)?;
        Ok(Value::from(v))
    }

    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Value, E> {
        self.0.charge(0)?;
        // Like serde_json's own Value: NaN and infinities become null.
        Ok(serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number))
    }

    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Value, E> {
        self.0.charge(v.len())?;
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E: serde::de::Error>(self, v: String) -> Result<Value, E> {
        self.0.charge(v.len())?;
        Ok(Value::String(v))
    }

    fn visit_unit<E: serde::de::Error>(self) -> Result<Value, E> {
        self.0.charge(0)?;
        Ok(Value::Null)
    }

    fn visit_none<E: serde::de::Error>(self) -> Result<Value, E> {
        self.visit_unit()
    }

    fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        serde::de::DeserializeSeed::deserialize(self, d)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        self.0.charge(0)?;
        let mut items = Vec::new();
        while let Some(item) = seq.next_element_seed(self)? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        self.0.charge(0)?;
        let mut out = serde_json::Map::new();
        while let Some(key) = map.next_key_seed(self)? {
            // Like serde_json's Value: keys are strings; a non-string YAML
            // key (a number, a bool) takes its JSON text.
            let key = match key {
                Value::String(s) => s,
                other => other.to_string(),
            };
            let value = map.next_value_seed(self)?;
            out.insert(key, value);
        }
        Ok(Value::Object(out))
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
            overlay(&mut b, p);
            Ok(Document::Properties(b))
        }
        (Some((base, _)), _) => Err(DocumentError::Incompatible {
            base,
            patch: patch_format,
        }),
    }
}

/// `bytes` (a `from` value) rendered as `to`: unchanged when the formats
/// are the same, re-rendered between json, yaml and toml (so comments and
/// layout are not kept), refused otherwise.
pub fn convert(from: Format, to: Format, bytes: &[u8]) -> Result<Vec<u8>, DocumentError> {
    if from == to {
        return Ok(bytes.to_vec());
    }
    if !(from.is_structured() && to.is_structured()) {
        return Err(DocumentError::Unconvertible { from, to });
    }
    render(to, &parse(from, bytes)?)
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

    #[test]
    fn structured_values_convert_and_others_are_refused() {
        let yaml = b"port: 7000\nhost: mm\n";
        let json = convert(Format::Yaml, Format::Json, yaml).unwrap();
        assert_eq!(
            serde_json::from_slice::<Value>(&json).unwrap(),
            serde_json::json!({"port": 7000, "host": "mm"})
        );
        assert_eq!(convert(Format::Yaml, Format::Yaml, yaml).unwrap(), yaml);
        assert!(matches!(
            convert(Format::Text, Format::Json, b"hello"),
            Err(DocumentError::Unconvertible { .. })
        ));
        assert!(matches!(
            convert(Format::Json, Format::Toml, b"[1, 2]"),
            Err(DocumentError::Shape { .. })
        ));
    }
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

    /// The threat model's "Document expansion" (docs/security.md): aliases
    /// expanding a small document into millions of values are refused while
    /// they expand.
    #[test]
    fn yaml_alias_bomb_is_refused_finding_2() {
        let mut text = String::from("a: &a [");
        text.push_str(&vec!["1"; 1000].join(","));
        text.push_str("]\nb: [");
        text.push_str(&vec!["*a"; 10_000].join(","));
        text.push_str("]\n");
        let started = std::time::Instant::now();
        let err = parse(Format::Yaml, text.as_bytes()).unwrap_err();
        assert!(err.to_string().contains("expands"), "{err}");
        // Refused at the budget (about half a million values), long before
        // the ten million the document asks for.
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
        // Aliases within the budget still work, and keep YAML's meaning.
        let ok = parse(
            Format::Yaml,
            b"defaults: &d {port: 7000, host: mm}\na: *d\nb: [*d, *d]\n1: one\ntrue: yes\n",
        )
        .unwrap();
        assert_eq!(
            ok,
            Document::Tree(json!({
                "defaults": {"port": 7000, "host": "mm"},
                "a": {"port": 7000, "host": "mm"},
                "b": [{"port": 7000, "host": "mm"}, {"port": 7000, "host": "mm"}],
                "1": "one",
                "true": "yes"
            }))
        );
    }

    /// Finding 2: a large properties document and a large properties merge
    /// cost linear time (they were quadratic: one scan per pair).
    #[test]
    fn large_properties_merge_is_linear_finding_2() {
        let n = 60_000;
        let base: String = (0..n).map(|i| format!("k{i}=base\n")).collect();
        let patch: String = (0..n).rev().map(|i| format!("k{i}=patch\n")).collect();
        let started = std::time::Instant::now();
        let base = parse(Format::Properties, base.as_bytes()).unwrap();
        let patch = parse(Format::Properties, patch.as_bytes()).unwrap();
        let Document::Properties(merged) =
            merge(Some((Format::Properties, base)), Format::Properties, patch).unwrap()
        else {
            panic!("properties merge into properties");
        };
        // Quadratic took minutes here; linear takes milliseconds.
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
        assert_eq!(merged.len(), n);
        assert_eq!(
            merged[0],
            ("k0".into(), "patch".into()),
            "first position kept"
        );
        assert_eq!(merged[n - 1].0, format!("k{}", n - 1));
    }
}
