//! The bearer token format: `strata_<id>_<secret>`, how a secret is hashed
//! for storage, and how a fresh token is generated. Both the authentication
//! layer (which checks tokens) and the token service (which creates them)
//! use it; it knows nothing of either.

use ring::rand::SecureRandom as _;
use strata_proto::v1::ErrorReason;

use crate::error::ApiError;

const ID_BYTES: usize = 8;
const SECRET_BYTES: usize = 32;

fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Splits `strata_<id>_<secret>` into id and secret; `None` when malformed.
pub fn parse(token: &str) -> Option<(&str, &str)> {
    let rest = token.strip_prefix("strata_")?;
    let (id, secret) = rest.split_once('_')?;
    (is_hex(id, 2 * ID_BYTES) && is_hex(secret, 2 * SECRET_BYTES)).then_some((id, secret))
}

/// Whether `id` is a well-formed token id (16 lowercase hex digits).
pub fn is_id(id: &str) -> bool {
    is_hex(id, 2 * ID_BYTES)
}

/// The id part of a token, or the argument itself when it is an id already.
pub fn id_of(token_or_id: &str) -> &str {
    parse(token_or_id).map_or(token_or_id, |(id, _)| id)
}

fn hash(id: &str, secret: &str) -> [u8; 32] {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(b"strata-token-v1:");
    ctx.update(id.as_bytes());
    ctx.update(b":");
    ctx.update(secret.as_bytes());
    let mut out = [0_u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

/// Whether `secret` is the one whose hash is `expected` (constant time).
pub(crate) fn secret_matches(id: &str, secret: &str, expected: &[u8; 32]) -> bool {
    let actual = hash(id, secret);
    actual
        .iter()
        .zip(expected.iter())
        .fold(0_u8, |acc, (a, b)| acc | (a ^ b))
        == 0
}

/// A fresh token: (id, full token string, secret hash).
pub(crate) fn generate() -> Result<(String, String, [u8; 32]), ApiError> {
    let rng = ring::rand::SystemRandom::new();
    let mut id = [0_u8; ID_BYTES];
    let mut secret = [0_u8; SECRET_BYTES];
    rng.fill(&mut id)
        .and_then(|()| rng.fill(&mut secret))
        .map_err(|_| ApiError::new(ErrorReason::Internal, "the system random source failed"))?;
    let (id, secret) = (super::hex::encode(&id), super::hex::encode(&secret));
    let digest = hash(&id, &secret);
    let token = format!("strata_{id}_{secret}");
    Ok((id, token, digest))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_parse_and_verify_only_with_their_secret() {
        let (id, token, digest) = generate().unwrap();
        let (pid, secret) = parse(&token).unwrap();
        assert_eq!(pid, id);
        assert!(secret_matches(pid, secret, &digest));
        let mut wrong = secret.to_owned();
        wrong.replace_range(0..1, if wrong.starts_with('0') { "1" } else { "0" });
        assert!(!secret_matches(pid, &wrong, &digest));
        assert!(parse("strata_abc_def").is_none());
        assert!(parse(&token.to_uppercase()).is_none());
        assert_eq!(id_of(&token), id);
    }
}
