//! Test card numbers and CVCs, and a `Secret` wrapper that keeps them out of logs.
//!
//! Numbers are 16 digits starting with the Visa test-style prefix `400000`, random in
//! the middle, with a valid Luhn check digit. They live only in memory.

use rand::Rng;

/// Prefix of every emulated card number.
pub const PAN_PREFIX: &str = "400000";

/// A sensitive string (card number, CVC). `Debug` never shows the value.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: String) -> Self {
        Self(value)
    }

    /// The value, for the one response that may carry it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret([redacted])")
    }
}

/// Whether `digits` (ASCII digits only) passes the Luhn check.
pub fn luhn_valid(digits: &str) -> bool {
    if digits.len() < 2 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return false;
    }
    luhn_sum(digits.bytes().rev().map(|b| b - b'0'), false) % 10 == 0
}

/// The check digit that makes `payload` + digit pass the Luhn check.
pub fn luhn_check_digit(payload: &str) -> u8 {
    let sum = luhn_sum(
        payload.bytes().rev().map(|b| b.wrapping_sub(b'0') % 10),
        true,
    );
    ((10 - sum % 10) % 10) as u8
}

/// Luhn sum of digits given right to left; `double_first` doubles the rightmost one.
fn luhn_sum(digits: impl Iterator<Item = u8>, double_first: bool) -> u32 {
    digits
        .enumerate()
        .map(|(i, d)| {
            let d = u32::from(d);
            if (i % 2 == 0) == double_first {
                let x = d * 2;
                if x > 9 { x - 9 } else { x }
            } else {
                d
            }
        })
        .sum()
}

/// A fresh 16-digit card number.
pub fn generate_pan() -> Secret {
    let mut rng = rand::rng();
    let mut pan = String::with_capacity(16);
    pan.push_str(PAN_PREFIX);
    for _ in 0..9 {
        pan.push(char::from(b'0' + rng.random_range(0..10u8)));
    }
    let check = luhn_check_digit(&pan);
    pan.push(char::from(b'0' + check));
    Secret(pan)
}

/// A fresh 3-digit CVC.
pub fn generate_cvc() -> Secret {
    Secret(format!("{:03}", rand::rng().random_range(0..1000u16)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_numbers() {
        assert!(luhn_valid("4242424242424242"));
        assert!(luhn_valid("4000056655665556"));
        assert!(luhn_valid("79927398713"));
        assert!(!luhn_valid("4242424242424241"));
        assert!(!luhn_valid("4242x24242424242"));
        assert!(!luhn_valid(""));
        assert_eq!(luhn_check_digit("7992739871"), 3);
        assert_eq!(luhn_check_digit("424242424242424"), 2);
    }

    #[test]
    fn generated_numbers_pass_luhn() {
        for _ in 0..1000 {
            let pan = generate_pan();
            let s = pan.expose();
            assert_eq!(s.len(), 16);
            assert!(s.starts_with(PAN_PREFIX));
            assert!(luhn_valid(s), "{s}");
            // a single changed digit is caught
            let mut b = s.as_bytes().to_vec();
            b[10] = if b[10] == b'9' { b'0' } else { b[10] + 1 };
            assert!(!luhn_valid(std::str::from_utf8(&b).expect("ascii")));
            let cvc = generate_cvc();
            assert_eq!(cvc.expose().len(), 3);
        }
    }

    #[test]
    fn secret_debug_is_redacted() {
        let s = Secret::new("4000001234567899".into());
        assert_eq!(format!("{s:?}"), "Secret([redacted])");
    }
}
