//! What a task payload may hold: exactly the JSON values that Postgres' `jsonb` stores and gives
//! back unchanged, and that every decoder here reads back.
//!
//! * Nesting at most [`MAX_PAYLOAD_DEPTH`] arrays/objects deep, in JSON and MessagePack alike:
//!   serde_json (which reads payloads back from Postgres) refuses 128 levels while MessagePack
//!   decoding allows 1,024, so without one limit a payload could be stored and then never read.
//! * No NUL (U+0000) in any string or object key: `jsonb` refuses `"\u0000"`.
//! * Only finite numbers: NaN and ±infinity (possible in MessagePack) are not JSON; they are
//!   refused, never silently turned into `null`.
//! * An integral float of magnitude 10¹⁶ or more that fits a 64-bit integer is kept as that
//!   integer: it is the same JSON number, and the form `jsonb` gives back.
//!
//! [`deserialize`] checks all this while decoding (so a deep body is refused before it is
//! built); [`check_json`] checks a value built in code.

use serde::de::{DeserializeSeed, Deserializer, Error, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};
use std::fmt;

/// Deepest nesting of arrays and objects in a payload: `[[1]]` is 2 deep, a scalar 0.
pub const MAX_PAYLOAD_DEPTH: usize = 64;

/// Marks decoder errors that are validation failures of the payload, not malformed bodies.
pub(crate) const INVALID_MARK: &str = "invalid payload: ";

/// Deserializes a payload, refusing what [`check_json`] refuses.
pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Value, D::Error> {
    Checked { depth: 0 }.deserialize(d)
}

/// Checks a JSON value against the payload rules (depth, NULs); `Err` says what is wrong.
pub fn check_json(value: &Value) -> Result<(), String> {
    let mut stack = vec![(value, 0usize)];
    while let Some((v, depth)) = stack.pop() {
        match v {
            Value::String(s) => check_str(s)?,
            Value::Array(a) => {
                check_depth(depth + 1)?;
                stack.extend(a.iter().map(|x| (x, depth + 1)));
            }
            Value::Object(o) => {
                check_depth(depth + 1)?;
                for (k, x) in o {
                    check_str(k)?;
                    stack.push((x, depth + 1));
                }
            }
            Value::Null | Value::Bool(_) | Value::Number(_) => {}
        }
    }
    Ok(())
}

fn check_depth(depth: usize) -> Result<(), String> {
    if depth > MAX_PAYLOAD_DEPTH {
        return Err(format!("nested deeper than {MAX_PAYLOAD_DEPTH} arrays/objects"));
    }
    Ok(())
}

fn check_str(s: &str) -> Result<(), String> {
    if s.contains('\0') {
        return Err("a string or key contains NUL (U+0000), which Postgres cannot store".into());
    }
    Ok(())
}

fn invalid<E: Error>(message: String) -> E {
    E::custom(format!("{INVALID_MARK}{message}"))
}

/// The JSON number for a finite float: an integer when it is integral, at least 10¹⁶ in
/// magnitude (where its shortest form has an exponent, e.g. `1e16`) and fits 64 bits.
fn number(f: f64) -> Option<Number> {
    const TWO_POW_64: f64 = 18_446_744_073_709_551_616.0;
    if !f.is_finite() {
        return None;
    }
    if f.fract() == 0.0 && f.abs() >= 1e16 {
        if f > 0.0 && f < TWO_POW_64 {
            return Some(Number::from(f as u64));
        }
        if f < 0.0 && f >= i64::MIN as f64 {
            return Some(Number::from(f as i64));
        }
    }
    Number::from_f64(f)
}

/// A payload value at `depth`.
struct Checked {
    depth: usize,
}

impl<'de> DeserializeSeed<'de> for Checked {
    type Value = Value;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Checked {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E: Error>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E: Error>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_u64<E: Error>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_f64<E: Error>(self, v: f64) -> Result<Value, E> {
        number(v).map(Value::Number).ok_or_else(|| invalid(format!("{v} is not a JSON number")))
    }
    fn visit_str<E: Error>(self, v: &str) -> Result<Value, E> {
        check_str(v).map_err(invalid)?;
        Ok(Value::String(v.to_owned()))
    }
    fn visit_string<E: Error>(self, v: String) -> Result<Value, E> {
        check_str(&v).map_err(invalid)?;
        Ok(Value::String(v))
    }
    fn visit_none<E: Error>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_unit<E: Error>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        self.deserialize(d)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let depth = self.depth + 1;
        check_depth(depth).map_err(invalid)?;
        let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
        while let Some(v) = seq.next_element_seed(Checked { depth })? {
            out.push(v);
        }
        Ok(Value::Array(out))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let depth = self.depth + 1;
        check_depth(depth).map_err(invalid)?;
        let mut out = Map::new();
        while let Some(k) = map.next_key::<String>()? {
            check_str(&k).map_err(invalid)?;
            let v = map.next_value_seed(Checked { depth })?;
            out.insert(k, v);
        }
        Ok(Value::Object(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn nested(depth: usize) -> Value {
        (0..depth).fold(json!(1), |v, i| if i % 2 == 0 { json!([v]) } else { json!({ "k": v }) })
    }

    fn via_json(v: &Value) -> Result<Value, String> {
        deserialize(&mut serde_json::Deserializer::from_slice(&serde_json::to_vec(v).unwrap()))
            .map_err(|e| e.to_string())
    }

    fn via_msgpack(bytes: &[u8]) -> Result<Value, String> {
        deserialize(&mut rmp_serde::Deserializer::new(bytes)).map_err(|e| e.to_string())
    }

    #[test]
    fn depth_limit_is_the_same_in_both_codecs() {
        for depth in [0, 1, MAX_PAYLOAD_DEPTH] {
            let v = nested(depth);
            assert_eq!(via_json(&v).unwrap(), v);
            assert_eq!(via_msgpack(&rmp_serde::to_vec(&v).unwrap()).unwrap(), v);
            assert!(check_json(&v).is_ok());
        }
        for depth in [MAX_PAYLOAD_DEPTH + 1, 200, 1000] {
            let v = nested(depth);
            let j = via_json(&v).unwrap_err();
            let m = via_msgpack(&rmp_serde::to_vec(&v).unwrap()).unwrap_err();
            assert!(j.contains(INVALID_MARK) && j.contains("nested deeper"), "{depth}: {j}");
            assert!(m.contains(INVALID_MARK) && m.contains("nested deeper"), "{depth}: {m}");
            assert!(check_json(&v).is_err());
        }
    }

    #[test]
    fn nul_is_refused_in_strings_and_keys_at_any_depth() {
        for v in [json!("a\0b"), json!({"a\0": 1}), json!([{"x": ["ok", "\0"]}])] {
            assert!(via_json(&v).unwrap_err().contains("NUL"), "{v}");
            assert!(via_msgpack(&rmp_serde::to_vec(&v).unwrap()).unwrap_err().contains("NUL"), "{v}");
            assert!(check_json(&v).unwrap_err().contains("NUL"));
        }
        let fine = json!({"\u{1}\u{1F600}\u{FFFF}": "\u{10FFFF}\t"});
        assert_eq!(via_json(&fine).unwrap(), fine);
    }

    #[test]
    fn non_finite_msgpack_floats_are_refused_not_nulled() {
        for f in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            let err = via_msgpack(&rmp_serde::to_vec(&vec![f]).unwrap()).unwrap_err();
            assert!(err.contains("not a JSON number"), "{err}");
        }
        assert_eq!(via_msgpack(&rmp_serde::to_vec(&vec![1.5f32]).unwrap()).unwrap(), json!([1.5]));
    }

    #[test]
    fn extreme_numbers_keep_their_value() {
        let v = json!([u64::MAX, i64::MIN, f64::MAX, f64::MIN_POSITIVE, 5e-324, -0.0, 0.1, 1e15]);
        assert_eq!(via_json(&v).unwrap(), v);
        assert_eq!(via_msgpack(&rmp_serde::to_vec(&v).unwrap()).unwrap(), v);
        // Postgres prints every digit (309 for f64::MAX); serde_json must read that back exactly
        // (its `float_roundtrip` feature), or the recorder and rescuer could not read the row.
        let max = format!("17976931348623157{}", "0".repeat(292));
        assert_eq!(serde_json::from_str::<Value>(&max).unwrap(), json!(f64::MAX));
        assert_eq!(
            serde_json::from_str::<f64>("-0.000000000000000000000000000000000000010729132283643165").unwrap(),
            -1.0729132283643165e-38
        );
        // Integral floats written with an exponent come back from jsonb as integers: kept as such.
        assert_eq!(
            via_json(&json!([1e16, -1e18, 1.8e19, 1e20])).unwrap(),
            json!([10_000_000_000_000_000u64, -1_000_000_000_000_000_000i64, 18_000_000_000_000_000_000u64, 1e20])
        );
    }
}
