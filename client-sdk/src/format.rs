//! Turning a resolved value into a typed one, by the value's format.

use serde::de::DeserializeOwned;
use serde::de::IntoDeserializer;

/// Deserializes `bytes` written in `format` into `T`.
///
/// - `json`, `yaml`, `toml`: the document.
/// - `properties`: a map of string keys to string values (so `T` is a map or
///   a struct of `String` fields).
/// - `text`: the UTF-8 text as a string (so `T` is `String` or a type that
///   deserializes from one).
/// - `binary` (and anything unknown): the raw bytes (`T` must accept bytes,
///   e.g. `serde_bytes::ByteBuf`).
pub(crate) fn decode<T: DeserializeOwned>(format: &str, bytes: &[u8]) -> Result<T, String> {
    match format {
        "json" => serde_json::from_slice(bytes).map_err(|e| e.to_string()),
        "yaml" => serde_norway::from_slice(bytes).map_err(|e| e.to_string()),
        "toml" => {
            let text = std::str::from_utf8(bytes).map_err(|e| e.to_string())?;
            toml::from_str(text).map_err(|e| e.to_string())
        }
        "properties" => {
            let map = java_properties::read(bytes).map_err(|e| e.to_string())?;
            let object: serde_json::Map<String, serde_json::Value> = map
                .into_iter()
                .map(|(k, v)| (k, serde_json::Value::String(v)))
                .collect();
            serde_json::from_value(serde_json::Value::Object(object)).map_err(|e| e.to_string())
        }
        "text" => {
            let text = std::str::from_utf8(bytes).map_err(|e| e.to_string())?;
            T::deserialize(text.into_deserializer())
                .map_err(|e: serde::de::value::Error| e.to_string())
        }
        _ => T::deserialize(serde::de::value::BytesDeserializer::new(bytes))
            .map_err(|e: serde::de::value::Error| e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use serde::Deserialize;

    use super::*;

    #[derive(Debug, Deserialize, PartialEq)]
    struct Match {
        max_players: u32,
        map: String,
    }

    #[test]
    fn every_structured_format_decodes_the_same_struct() {
        let want = Match {
            max_players: 16,
            map: "dust".into(),
        };
        let cases: [(&str, &[u8]); 3] = [
            ("json", br#"{"max_players":16,"map":"dust"}"#),
            ("yaml", b"max_players: 16\nmap: dust\n"),
            ("toml", b"max_players = 16\nmap = \"dust\"\n"),
        ];
        for (format, bytes) in cases {
            assert_eq!(decode::<Match>(format, bytes).unwrap(), want, "{format}");
        }
    }

    #[test]
    fn properties_decode_to_string_fields_and_text_to_a_string() {
        let map: BTreeMap<String, String> = decode("properties", b"a=1\nb.c = two\n").unwrap();
        assert_eq!(map["a"], "1");
        assert_eq!(map["b.c"], "two");
        let text: String = decode("text", "héllo".as_bytes()).unwrap();
        assert_eq!(text, "héllo");
    }

    #[test]
    fn a_type_mismatch_is_an_error_not_a_panic() {
        let err = decode::<Match>("json", br#"{"max_players":"many"}"#).unwrap_err();
        assert!(
            err.contains("max_players") || err.contains("invalid type"),
            "{err}"
        );
        assert!(decode::<Match>("yaml", b": : :").is_err());
        assert!(decode::<Match>("toml", &[0xff, 0xfe]).is_err());
    }
}
