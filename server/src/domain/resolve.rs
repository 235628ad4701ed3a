//! Layered resolution along a tenant chain (docs/ARCHITECTURE.md).
//!
//! Given a key's layers nearest tenant first, walk until a `replace` or
//! `delete` layer or the end of the chain, then fold from the farthest
//! collected layer to the nearest:
//! - `replace` at the stop: its value is the base;
//! - `delete` at the stop, or the end of the chain: there is no base (a
//!   `merge` layer over a tombstone patches an empty document; a tombstone
//!   cuts off what ancestors hold);
//! - each `merge` layer patches the result (RFC 7396 for trees, key overlay
//!   for properties); the result is rendered in the nearest layer's format.
//!
//! A lone `replace` layer is returned byte for byte (comments and formatting
//! survive); only merged values are re-rendered.

use std::collections::BTreeMap;

use serde_json::Value;

use super::document::{self, Document, DocumentError, Format, Mode};

/// Store revision (same numbering as the store layer).
pub type Revision = i64;

/// One tenant's layer of a key, as input to resolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layer<'a> {
    /// Tenant holding the layer.
    pub tenant: &'a str,
    /// Raw value bytes.
    pub value: &'a [u8],
    /// Declared format.
    pub format: Format,
    /// Replace, merge or delete.
    pub mode: Mode,
    /// Revision of the layer's last change.
    pub revision: Revision,
}

/// A resolved value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    /// The value, in `format`.
    pub value: Vec<u8>,
    /// Format of the nearest contributing layer.
    pub format: Format,
    /// Tenants whose layers contributed, nearest first.
    pub origin: Vec<String>,
    /// Latest revision among the contributing layers.
    pub mod_revision: Revision,
}

/// Which tenant supplied each field of a resolved structured value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Explained {
    /// The resolved value.
    pub resolved: Resolved,
    /// JSON pointer of every leaf (or properties key) → tenant that set it,
    /// in pointer order. Empty for text and binary values.
    pub fields: Vec<(String, String)>,
}

/// A stored layer that cannot take part in resolution.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("layer of tenant {tenant:?}: {source}")]
pub struct ResolveError {
    /// Tenant of the offending layer.
    pub tenant: String,
    /// What is wrong with it.
    pub source: DocumentError,
}

/// The layers that take part, farthest first, and whether the farthest is
/// the base (`replace`).
fn collect<'a>(layers: impl IntoIterator<Item = Layer<'a>>) -> Option<Vec<Layer<'a>>> {
    let mut used = Vec::new();
    for layer in layers {
        let stop = layer.mode != Mode::Merge;
        used.push(layer);
        if stop {
            break;
        }
    }
    if used
        .first()
        .is_none_or(|nearest| nearest.mode == Mode::Delete)
    {
        return None;
    }
    used.reverse();
    Some(used)
}

/// Resolves a key from its layers, nearest tenant first (tenants without a
/// layer are simply absent). `Ok(None)`: the key does not exist here.
pub fn resolve<'a>(
    layers: impl IntoIterator<Item = Layer<'a>>,
) -> Result<Option<Resolved>, ResolveError> {
    let Some(used) = collect(layers) else {
        return Ok(None);
    };
    fold(&used).map(|(resolved, _)| Some(resolved))
}

/// Like [`resolve`], and also says which tenant supplied each field.
pub fn explain<'a>(
    layers: impl IntoIterator<Item = Layer<'a>>,
) -> Result<Option<Explained>, ResolveError> {
    let Some(used) = collect(layers) else {
        return Ok(None);
    };
    let (resolved, doc) = fold(&used)?;
    let doc = match doc {
        Some(doc) => doc,
        // A lone replace layer: parse it only to attribute fields.
        None if used[0].format.is_mergeable() => parse(&used[0])?,
        None => {
            return Ok(Some(Explained {
                resolved,
                fields: Vec::new(),
            }));
        }
    };
    let patches: Vec<(&str, Document)> = used
        .iter()
        .rev()
        .filter(|l| l.mode == Mode::Merge)
        .map(|l| parse(l).map(|d| (l.tenant, d)))
        .collect::<Result<_, _>>()?;
    let base_tenant = (used[0].mode == Mode::Replace).then_some(used[0].tenant);
    let mut fields = BTreeMap::new();
    match &doc {
        Document::Tree(tree) => {
            let mut leaves = Vec::new();
            leaf_pointers(tree, String::new(), &mut leaves);
            for pointer in leaves {
                let from = patches
                    .iter()
                    .find(|(_, p)| matches!(p, Document::Tree(t) if t.pointer(&pointer).is_some_and(|v| !v.is_null())))
                    .map(|(t, _)| *t)
                    .or(base_tenant);
                if let Some(tenant) = from {
                    fields.insert(pointer, tenant.to_owned());
                }
            }
        }
        Document::Properties(pairs) => {
            for (key, _) in pairs {
                let from = patches
                    .iter()
                    .find(|(_, p)| matches!(p, Document::Properties(ps) if ps.iter().any(|(k, _)| k == key)))
                    .map(|(t, _)| *t)
                    .or(base_tenant);
                if let Some(tenant) = from {
                    fields.insert(format!("/{}", escape(key)), tenant.to_owned());
                }
            }
        }
    }
    Ok(Some(Explained {
        resolved,
        fields: fields.into_iter().collect(),
    }))
}

fn escape(segment: &str) -> String {
    segment.replace('~', "~0").replace('/', "~1")
}

fn leaf_pointers(value: &Value, prefix: String, out: &mut Vec<String>) {
    match value {
        Value::Object(map) if !map.is_empty() => {
            for (k, v) in map {
                leaf_pointers(v, format!("{prefix}/{}", escape(k)), out);
            }
        }
        _ if prefix.is_empty() && value.is_null() => {}
        _ => out.push(prefix),
    }
}

fn parse(layer: &Layer<'_>) -> Result<Document, ResolveError> {
    document::parse(layer.format, layer.value).map_err(|source| ResolveError {
        tenant: layer.tenant.to_owned(),
        source,
    })
}

/// Folds layers (farthest first). Returns the resolved value and, when
/// anything was merged, the merged document.
fn fold(used: &[Layer<'_>]) -> Result<(Resolved, Option<Document>), ResolveError> {
    let nearest = used[used.len() - 1];
    let origin: Vec<String> = used
        .iter()
        .rev()
        .filter(|l| l.mode != Mode::Delete)
        .map(|l| l.tenant.to_owned())
        .collect();
    let mod_revision = used.iter().map(|l| l.revision).max().unwrap_or(0);
    if used.len() == 1 && nearest.mode == Mode::Replace {
        let resolved = Resolved {
            value: nearest.value.to_vec(),
            format: nearest.format,
            origin,
            mod_revision,
        };
        return Ok((resolved, None));
    }
    let mut acc: Option<(Format, Document)> = None;
    for layer in used {
        match layer.mode {
            Mode::Delete => acc = None,
            Mode::Replace => {
                if !layer.format.is_mergeable() {
                    let patch = used
                        .iter()
                        .find(|l| l.mode == Mode::Merge)
                        .map_or(layer.format, |l| l.format);
                    return Err(ResolveError {
                        tenant: layer.tenant.to_owned(),
                        source: DocumentError::Incompatible {
                            base: layer.format,
                            patch,
                        },
                    });
                }
                acc = Some((layer.format, parse(layer)?));
            }
            Mode::Merge => {
                let patch = parse(layer)?;
                let merged =
                    document::merge(acc.take(), layer.format, patch).map_err(|source| {
                        ResolveError {
                            tenant: layer.tenant.to_owned(),
                            source,
                        }
                    })?;
                acc = Some((layer.format, merged));
            }
        }
    }
    let Some((_, doc)) = acc else {
        // Unreachable by construction (the nearest layer is a merge), but an
        // empty answer is the honest result of folding nothing.
        return Ok((
            Resolved {
                value: Vec::new(),
                format: nearest.format,
                origin,
                mod_revision,
            },
            None,
        ));
    };
    let value = document::render(nearest.format, &doc).map_err(|source| ResolveError {
        tenant: nearest.tenant.to_owned(),
        source,
    })?;
    Ok((
        Resolved {
            value,
            format: nearest.format,
            origin,
            mod_revision,
        },
        Some(doc),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn layer<'a>(tenant: &'a str, value: &'a str, format: Format, mode: Mode) -> Layer<'a> {
        Layer {
            tenant,
            value: value.as_bytes(),
            format,
            mode,
            revision: 1,
        }
    }

    #[test]
    fn nearest_replace_wins_byte_for_byte() {
        let r = resolve([
            layer("feat-1", "# mine\na: 1\n", Format::Yaml, Mode::Replace),
            layer("integration", "{\"a\": 2}", Format::Json, Mode::Replace),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(r.value, b"# mine\na: 1\n");
        assert_eq!(r.origin, vec!["feat-1"]);
    }

    #[test]
    fn merge_patches_the_parent_and_renders_in_the_nearest_format() {
        let r = resolve([
            layer(
                "feat-1",
                "{\"server\":{\"port\":7100}}",
                Format::Json,
                Mode::Merge,
            ),
            layer(
                "integration",
                "server:\n  port: 7000\n  host: mm\n",
                Format::Yaml,
                Mode::Replace,
            ),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(r.format, Format::Json);
        assert_eq!(
            serde_json::from_slice::<Value>(&r.value).unwrap(),
            json!({"server": {"port": 7100, "host": "mm"}})
        );
        assert_eq!(r.origin, vec!["feat-1", "integration"]);
    }

    #[test]
    fn tombstones_hide_ancestors_and_merge_over_them_starts_empty() {
        assert_eq!(
            resolve([
                layer("feat-1", "", Format::Json, Mode::Delete),
                layer("integration", "{}", Format::Json, Mode::Replace)
            ])
            .unwrap(),
            None
        );
        let r = resolve([
            layer("feat-2", "{\"b\":1}", Format::Json, Mode::Merge),
            layer("feat-1", "", Format::Json, Mode::Delete),
            layer("integration", "{\"a\":1}", Format::Json, Mode::Replace),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(
            serde_json::from_slice::<Value>(&r.value).unwrap(),
            json!({"b": 1})
        );
        assert_eq!(r.origin, vec!["feat-2"]);
    }

    #[test]
    fn merge_over_text_is_a_clear_error() {
        let err = resolve([
            layer("feat-1", "{\"a\":1}", Format::Json, Mode::Merge),
            layer("integration", "plain", Format::Text, Mode::Replace),
        ])
        .unwrap_err();
        assert_eq!(err.tenant, "integration");
        assert!(
            err.to_string()
                .contains("cannot merge a json layer over a text value"),
            "{err}"
        );
    }

    #[test]
    fn explain_attributes_every_leaf() {
        let e = explain([
            layer(
                "feat-1",
                "{\"server\":{\"port\":7100},\"new\":true}",
                Format::Json,
                Mode::Merge,
            ),
            layer(
                "perf",
                "{\"limits\":{\"cpu\":4}}",
                Format::Json,
                Mode::Merge,
            ),
            layer(
                "integration",
                "{\"server\":{\"port\":7000,\"host\":\"mm\"},\"limits\":{\"cpu\":1,\"mem\":2}}",
                Format::Json,
                Mode::Replace,
            ),
        ])
        .unwrap()
        .unwrap();
        let fields: BTreeMap<_, _> = e.fields.into_iter().collect();
        assert_eq!(fields["/server/port"], "feat-1");
        assert_eq!(fields["/server/host"], "integration");
        assert_eq!(fields["/limits/cpu"], "perf");
        assert_eq!(fields["/limits/mem"], "integration");
        assert_eq!(fields["/new"], "feat-1");
        assert_eq!(fields.len(), 5);
    }

    // ---- property tests: the fold equals a naive recursive definition ----

    /// resolve(T) = layer(T) applied on resolve(parent(T)), recursively.
    fn reference(chain: &[Option<(Mode, Value)>]) -> Option<Value> {
        let (first, rest) = chain.split_first()?;
        match first {
            None => reference(rest),
            Some((Mode::Replace, v)) => Some(v.clone()),
            Some((Mode::Delete, _)) => None,
            Some((Mode::Merge, patch)) => {
                let mut base = reference(rest).unwrap_or(Value::Null);
                json_patch::merge(&mut base, patch);
                Some(base)
            }
        }
    }

    fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            (-5i64..5).prop_map(|n| json!(n)),
            "[a-c]{0,2}".prop_map(Value::String),
        ];
        leaf.prop_recursive(3, 16, 3, |inner| {
            prop_oneof![
                prop::collection::btree_map("[a-d]", inner.clone(), 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
                prop::collection::vec(inner, 0..3).prop_map(Value::Array),
            ]
        })
    }

    fn chain_layers() -> impl Strategy<Value = Vec<Option<(Mode, Value)>>> {
        let mode = prop_oneof![Just(Mode::Replace), Just(Mode::Merge), Just(Mode::Delete)];
        prop::collection::vec(prop::option::of((mode, json_value())), 1..9)
    }

    proptest! {
        #[test]
        fn resolution_equals_the_reference_model(chain in chain_layers()) {
            let texts: Vec<Option<(Mode, String)>> = chain
                .iter()
                .map(|l| l.as_ref().map(|(m, v)| (*m, v.to_string())))
                .collect();
            let names: Vec<String> = (0..chain.len()).map(|i| format!("t{i}")).collect();
            let layers = texts.iter().zip(&names).filter_map(|(l, name)| {
                l.as_ref().map(|(mode, text)| Layer {
                    tenant: name,
                    value: text.as_bytes(),
                    format: Format::Json,
                    mode: *mode,
                    revision: 1,
                })
            });
            let got = resolve(layers).unwrap().map(|r| serde_json::from_slice::<Value>(&r.value).unwrap());
            prop_assert_eq!(got, reference(&chain));
        }

        #[test]
        fn structured_documents_round_trip_through_every_format(
            doc in prop::collection::btree_map("[a-e]{1,3}", json_value(), 0..5)
        ) {
            // TOML has no null; drop nulls (as a merge would) before comparing.
            let mut tree = Value::Null;
            json_patch::merge(&mut tree, &Value::Object(doc.into_iter().collect()));
            let tree = strip_nulls(tree);
            let parsed = Document::Tree(tree);
            for format in [Format::Json, Format::Yaml, Format::Toml] {
                let text = document::render(format, &parsed).unwrap();
                let back = document::parse(format, &text).unwrap();
                prop_assert_eq!(&back, &parsed, "format {} text {}", format, String::from_utf8_lossy(&text));
            }
        }
    }

    /// Arrays (and objects inside them) may still hold nulls after a merge:
    /// RFC 7396 leaves arrays alone. TOML cannot express null, so the
    /// round-trip property is stated for null-free documents.
    fn strip_nulls(v: Value) -> Value {
        match v {
            Value::Object(m) => Value::Object(
                m.into_iter()
                    .filter(|(_, v)| !v.is_null())
                    .map(|(k, v)| (k, strip_nulls(v)))
                    .collect(),
            ),
            Value::Array(a) => Value::Array(
                a.into_iter()
                    .filter(|v| !v.is_null())
                    .map(strip_nulls)
                    .collect(),
            ),
            other => other,
        }
    }
}
