//! Encoding and decoding of bodies: MessagePack (named fields) by default, JSON accepted.

use crate::{DecodeError, TaskEnvelope};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// `Content-Type` of MessagePack bodies.
pub const CONTENT_TYPE_MSGPACK: &str = "application/msgpack";
/// `Content-Type` of JSON bodies.
pub const CONTENT_TYPE_JSON: &str = "application/json";

/// Largest body decoded from a message that one fleet component wrote for another (dispatches,
/// event batches, commit notifications). nats-server carries at most 64 MiB per message, so
/// this refuses nothing a server delivers; it only bounds what a decoder may be asked to read.
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;

/// A body encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// MessagePack with field names (maps, not arrays).
    MsgPack,
    /// UTF-8 JSON.
    Json,
}

impl Encoding {
    /// Picks the encoding from a `Content-Type` header, or sniffs the body when there is none:
    /// a JSON object starts with `{` (after whitespace), which as MessagePack would be a bare
    /// integer and never a valid message.
    pub fn detect(content_type: Option<&str>, body: &[u8]) -> Result<Encoding, DecodeError> {
        match content_type.map(|c| c.split(';').next().unwrap_or("").trim().to_ascii_lowercase()) {
            Some(ct) if ct == CONTENT_TYPE_JSON || ct == "text/json" => Ok(Encoding::Json),
            Some(ct) if ct == CONTENT_TYPE_MSGPACK || ct == "application/x-msgpack" => Ok(Encoding::MsgPack),
            Some(ct) if !ct.is_empty() => Err(DecodeError::UnsupportedContentType(ct)),
            _ => {
                let first = body.iter().find(|b| !b.is_ascii_whitespace());
                Ok(if first == Some(&b'{') { Encoding::Json } else { Encoding::MsgPack })
            }
        }
    }
}

/// Encodes a value as MessagePack with field names.
pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // Serializing our own plain-data types into a Vec cannot fail: there are no maps with
    // non-string keys and no custom serializers that error.
    rmp_serde::to_vec_named(value).unwrap_or_default()
}

/// Encodes a value as JSON.
pub fn encode_json<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).unwrap_or_default()
}

/// Decodes a body in the given (or sniffed) encoding, refusing bodies over `limit` bytes.
pub fn decode<T: DeserializeOwned>(body: &[u8], content_type: Option<&str>, limit: usize) -> Result<T, DecodeError> {
    if body.len() > limit {
        return Err(DecodeError::TooLarge { size: body.len(), limit });
    }
    let (encoding, result) = match Encoding::detect(content_type, body)? {
        Encoding::Json => ("json", serde_json::from_slice(body).map_err(|e| e.to_string())),
        Encoding::MsgPack => ("msgpack", rmp_serde::from_slice(body).map_err(|e| e.to_string())),
    };
    result.map_err(|message| match message.split_once(crate::payload::INVALID_MARK) {
        // A payload that decoded but breaks the payload rules (depth, NUL, non-finite number).
        Some((_, reason)) => DecodeError::Invalid { field: "payload", reason: reason.to_string() },
        None => DecodeError::Malformed { encoding, message },
    })
}

/// Decodes and validates a submitted envelope. `max_body_bytes` bounds the whole body and the
/// payload alike; a missing `created_at` is filled with the current time.
pub fn decode_envelope(
    body: &[u8],
    content_type: Option<&str>,
    max_body_bytes: usize,
) -> Result<TaskEnvelope, DecodeError> {
    let mut env: TaskEnvelope = decode(body, content_type, max_body_bytes)?;
    env.validate(max_body_bytes)?;
    if env.created_at == 0 {
        env.created_at = crate::now_ms();
    }
    Ok(env)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{EventBatch, EventKind, Priority, TaskEvent};
    use proptest::prelude::*;

    const LIMIT: usize = 1 << 20;

    #[test]
    fn msgpack_round_trip() {
        let env = TaskEnvelope::new("echo", serde_json::json!({"text": "hi", "n": [1, 2.5, null]}))
            .with_priority(Priority::Critical);
        let bytes = encode(&env);
        let back = decode_envelope(&bytes, Some(CONTENT_TYPE_MSGPACK), LIMIT).unwrap();
        assert_eq!(back, env);
        // Sniffing without a content type picks MessagePack too.
        assert_eq!(decode_envelope(&bytes, None, LIMIT).unwrap(), env);
    }

    #[test]
    fn minimal_json_gets_defaults() {
        let env = decode_envelope(br#" {"kind":"echo","payload":{"x":1}}"#, None, LIMIT).unwrap();
        assert_eq!(env.kind, "echo");
        assert_eq!(env.queue, "default");
        assert_eq!(env.priority, Priority::Normal);
        assert_eq!(env.max_attempts, 0, "left to the coordinator");
        assert_eq!(env.effective_max_attempts(), crate::DEFAULT_MAX_ATTEMPTS);
        assert_eq!(env.id.get_version_num(), 7);
        assert!(env.created_at > 0);
    }

    #[test]
    fn clear_errors() {
        let missing = decode_envelope(br#"{"payload":1}"#, None, LIMIT).unwrap_err();
        assert!(missing.to_string().contains("missing field `kind`"), "{missing}");
        let typo = decode_envelope(br#"{"kind":"echo","paylod":1}"#, None, LIMIT).unwrap_err();
        assert!(typo.to_string().contains("paylod"), "{typo}");
        let bad_prio = decode_envelope(br#"{"kind":"echo","priority":"urgent"}"#, None, LIMIT).unwrap_err();
        assert!(bad_prio.to_string().contains("urgent"), "{bad_prio}");
        let bad_queue = decode_envelope(br#"{"kind":"echo","queue":"a.b"}"#, None, LIMIT).unwrap_err();
        assert_eq!(bad_queue.reason(), crate::RejectReason::Invalid);
        let big = format!(r#"{{"kind":"echo","payload":"{}"}}"#, "x".repeat(2000));
        assert_eq!(decode_envelope(big.as_bytes(), None, 1000).unwrap_err().reason(), crate::RejectReason::TooLarge);
        let future = decode_envelope(br#"{"v":99,"kind":"echo"}"#, None, LIMIT).unwrap_err();
        assert_eq!(future.reason(), crate::RejectReason::UnsupportedVersion);
        let ct = decode_envelope(b"kind=echo", Some("text/plain"), LIMIT).unwrap_err();
        assert!(matches!(ct, DecodeError::UnsupportedContentType(_)));
    }

    #[test]
    fn what_postgres_refuses_is_invalid_in_both_codecs() {
        let deep = (0..crate::MAX_PAYLOAD_DEPTH + 1).fold(serde_json::json!(0), |v, _| serde_json::json!([v]));
        let mut bodies: Vec<(&str, serde_json::Value)> = vec![
            ("payload", serde_json::json!({"kind": "echo", "payload": {"a": "x\u{0}y"}})),
            ("payload", serde_json::json!({"kind": "echo", "payload": {"k\u{0}": 1}})),
            ("payload", serde_json::json!({"kind": "echo", "payload": deep})),
            ("idempotency_key", serde_json::json!({"kind": "echo", "idempotency_key": "a\u{0}"})),
            ("created_at", serde_json::json!({"kind": "echo", "created_at": crate::MAX_CREATED_AT_MS + 1})),
            ("created_at", serde_json::json!({"kind": "echo", "created_at": u64::MAX})),
            ("kind", serde_json::json!({"kind": "ec\u{0}ho"})),
            ("limits", serde_json::json!({"kind": "echo", "limits": ["a\u{0}"]})),
        ];
        bodies.push(("queue", serde_json::json!({"kind": "echo", "queue": "q".repeat(crate::MAX_QUEUE_LEN + 1)})));
        for (field, body) in bodies {
            for bytes in [serde_json::to_vec(&body).unwrap(), rmp_serde::to_vec_named(&body).unwrap()] {
                match decode_envelope(&bytes, None, LIMIT) {
                    Err(DecodeError::Invalid { field: f, reason }) => assert_eq!(f, field, "{body}: {reason}"),
                    other => panic!("{body}: {other:?}"),
                }
            }
        }
        // The edges themselves are fine.
        let edge = serde_json::json!({"kind": "echo", "created_at": crate::MAX_CREATED_AT_MS,
                                      "payload": {"n": [u64::MAX, i64::MIN, f64::MAX, f64::MIN_POSITIVE]}});
        assert!(decode_envelope(&serde_json::to_vec(&edge).unwrap(), None, LIMIT).is_ok());
        // A NaN (MessagePack only) is refused, not stored as null.
        let mut map: std::collections::BTreeMap<&str, rmpv_like::V> = Default::default();
        map.insert("kind", rmpv_like::V::S("echo"));
        map.insert("payload", rmpv_like::V::F(f64::NAN));
        let err = decode_envelope(&rmp_serde::to_vec_named(&map).unwrap(), None, LIMIT).unwrap_err();
        assert!(matches!(&err, DecodeError::Invalid { field: "payload", .. }), "{err}");
    }

    /// A MessagePack map with a float payload, which `serde_json::Value` cannot express.
    mod rmpv_like {
        #[derive(serde::Serialize)]
        #[serde(untagged)]
        pub enum V {
            S(&'static str),
            F(f64),
        }
    }

    #[test]
    fn event_batch_round_trip() {
        let mut ev = TaskEvent::new(uuid::Uuid::now_v7(), EventKind::Succeeded, "default");
        ev.result = Some(serde_json::json!({"ok": true}));
        ev.attempt = 2;
        let batch = EventBatch::new(vec![ev.clone(), ev]);
        let back: EventBatch = decode(&encode(&batch), None, LIMIT).unwrap();
        assert_eq!(back, batch);
    }

    proptest! {
        #[test]
        fn decoder_never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode_envelope(&bytes, None, LIMIT);
            let _ = decode_envelope(&bytes, Some(CONTENT_TYPE_JSON), LIMIT);
            let _ = decode::<EventBatch>(&bytes, None, LIMIT);
            let _ = decode::<crate::CommittedBatch>(&bytes, None, LIMIT);
            let _ = decode::<crate::SubmitReply>(&bytes, Some(CONTENT_TYPE_JSON), LIMIT);
        }

        #[test]
        fn decoder_never_panics_on_json_like_text(s in "\\{[ -~]{0,200}") {
            let _ = decode_envelope(s.as_bytes(), None, LIMIT);
        }

        /// Valid envelopes with arbitrary field values either decode or fail cleanly.
        #[test]
        fn structured_envelopes_decode_or_fail_cleanly(
            kind in "[a-z.]{0,20}", queue in "[a-z.*> ]{0,10}", attempts in any::<u32>(), timeout in any::<u64>(),
            prio in "[a-z]{0,9}", payload in "[ -~]{0,64}",
        ) {
            let body = serde_json::json!({
                "kind": kind, "queue": queue, "max_attempts": attempts, "timeout_ms": timeout,
                "priority": prio, "payload": payload,
            });
            let _ = decode_envelope(&serde_json::to_vec(&body).unwrap(), None, LIMIT);
            let _ = decode_envelope(&rmp_serde::to_vec_named(&body).unwrap(), None, LIMIT);
        }
    }
}
