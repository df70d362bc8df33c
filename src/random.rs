//! Random identifiers and secrets from the OS's CSPRNG, as text: hex for
//! ids (tokens' `jti`, keys' ids, OTP sessions) and base64url for secrets
//! (service keys, a generated admin password).

use crate::error::ApiError;

/// `N` random bytes.
pub fn bytes<const N: usize>() -> Result<[u8; N], ApiError> {
    let mut b = [0u8; N];
    getrandom::fill(&mut b).map_err(|_| ApiError::internal("no randomness"))?;
    Ok(b)
}

/// `N` random bytes as `2N` lowercase hex digits.
pub fn hex<const N: usize>() -> Result<String, ApiError> {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    Ok(bytes::<N>()?
        .iter()
        .flat_map(|b| [DIGITS[usize::from(b >> 4)] as char, DIGITS[usize::from(b & 15)] as char])
        .collect())
}

/// `N` random bytes as unpadded base64url: `ceil(8N / 6)` characters of
/// `A-Za-z0-9-_`, 6 bits each (the last holds the bits left over).
pub fn base64url<const N: usize>() -> Result<String, ApiError> {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::with_capacity((8 * N).div_ceil(6));
    let (mut bits, mut n) = (0u32, 0);
    for b in bytes::<N>()? {
        bits = (bits << 8) | u32::from(b);
        n += 8;
        while n >= 6 {
            n -= 6;
            out.push(ALPHABET[((bits >> n) & 63) as usize] as char);
        }
    }
    if n > 0 {
        out.push(ALPHABET[((bits << (6 - n)) & 63) as usize] as char);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_and_alphabets() {
        let h = hex::<16>().unwrap();
        assert_eq!(h.len(), 32);
        assert!(h.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
        for (s, len) in [(base64url::<32>().unwrap(), 43), (base64url::<18>().unwrap(), 24)] {
            assert_eq!(s.len(), len);
            assert!(s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
        }
        assert_ne!(hex::<16>().unwrap(), h, "two draws differ");
    }
}
