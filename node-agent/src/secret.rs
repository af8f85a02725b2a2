//! Comparing a presented secret (the group token, an API key's digest) with
//! the expected one in time that does not depend on where they differ, so a
//! caller cannot find the secret byte by byte from response times.

use subtle::ConstantTimeEq;

/// Whether `presented` equals `expected`. The time taken depends on the
/// lengths alone.
pub fn same_secret(presented: &[u8], expected: &[u8]) -> bool {
    presented.ct_eq(expected).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_secrets_match_and_others_do_not() {
        assert!(same_secret(b"s3cret", b"s3cret"));
        assert!(!same_secret(b"s3cret", b"s3creT"));
        assert!(!same_secret(b"s3cret", b"s3cre"));
        assert!(!same_secret(b"", b"x"));
        assert!(same_secret(b"", b""));
    }
}
