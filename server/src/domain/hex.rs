//! Lower-case hex, the form binary data takes in text: token ids and
//! secrets, binary config values and UDP check datagrams in backups, UDP
//! datagrams in the JSON API.

use std::fmt::Write as _;

/// `bytes` as lower-case hex.
pub fn encode(bytes: &[u8]) -> String {
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// The bytes `text` spells in hex (either case). The error completes a
/// sentence about the field: "has an odd number of digits".
pub fn decode(text: &str) -> Result<Vec<u8>, String> {
    if !text.len().is_multiple_of(2) {
        return Err("has an odd number of digits".into());
    }
    (0..text.len())
        .step_by(2)
        .map(|i| {
            text.get(i..i + 2)
                .and_then(|pair| u8::from_str_radix(pair, 16).ok())
                .ok_or_else(|| "holds a non-hex digit".to_owned())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_what_is_not_hex() {
        assert_eq!(encode(&[0, 0x9f, 0xff]), "009fff");
        assert_eq!(decode("009FfF"), Ok(vec![0, 0x9f, 0xff]));
        assert!(decode("abc").is_err());
        assert!(decode("zz").is_err());
        assert!(decode("é0").is_err());
    }
}
