//! The value stored under each instance key, in the wire format of etcd's Go naming package.
//!
//! Go's `endpoints.Manager` stores `json.Marshal(Update{Op, Addr, Metadata})`, a struct without
//! JSON tags, so the field names are capitalised: `{"Op":0,"Addr":"10.0.0.5:50051","Metadata":null}`.
//! We write exactly that shape, with `Metadata` a JSON *string* that holds our metadata object:
//! `{"Op":0,"Addr":"10.0.0.5:50051","Metadata":"{\"instance_id\":\"node-a\",\"weight\":1}"}`.
//!
//! Why a string and not the object itself: etcd's Go resolver copies `Metadata` into grpc-go's
//! `resolver.Address.Metadata`, and grpc-go's balancers use addresses as map keys. A JSON object
//! decodes to a Go map, which is not hashable, and round_robin panics with `hash of unhashable type
//! map[string]interface {}` (grpc/grpc-go#8225, etcd-io/etcd#19700). A string is hashable, so a stock
//! Go client dials our instances with no option of its own, while our clients unwrap the string.
//!
//! Reading is deliberately tolerant, like Go's decoder: field names match case-insensitively, unknown
//! fields are ignored, `Op` may be missing (etcd's own docs show values without it) and is ignored
//! anyway (presence in etcd is what counts: a PUT means present, a DELETE or lease expiry means gone),
//! and `Metadata` may be any JSON value. What cannot be read is reported as a [`DecodeError`] so
//! discovery can skip that one key with a warning.

use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// Values larger than this are refused on read: no legitimate endpoint record comes close, and
/// parsing megabytes of JSON on every watch event would let one bad write slow every client.
pub const MAX_VALUE_BYTES: usize = 64 * 1024;

/// The metadata key under which we publish the instance id.
pub const INSTANCE_ID_KEY: &str = "instance_id";

/// The metadata key a server sets to `true` when it announces its departure
/// ([`crate::Registration::announce_draining`]): our clients stop calling it on that event and give
/// it no removal grace. A stock Go client ignores metadata and learns of the departure from the
/// DELETE that follows.
pub const DRAINING_KEY: &str = "draining";

/// Whether `metadata` carries the draining announcement: [`DRAINING_KEY`] set to `true`, as a
/// boolean or as text. The balancer's rule, for anyone who shows or acts on the announcement.
pub fn is_draining(metadata: &Value) -> bool {
    match metadata.get(DRAINING_KEY) {
        Some(Value::Bool(draining)) => *draining,
        Some(Value::String(text)) => text == "true",
        _ => false,
    }
}

/// One endpoint record: the address clients dial and free-form metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct Endpoint {
    /// `host:port` to dial.
    pub addr: String,
    /// Any JSON value (`null` when unset); ours is an object with at least [`INSTANCE_ID_KEY`].
    /// On the wire an object travels as a JSON string (see the module docs); this field always
    /// holds the decoded object.
    pub metadata: Value,
}

/// Why a value under the service prefix could not be read as an [`Endpoint`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The value is larger than [`MAX_VALUE_BYTES`].
    #[error("value is {0} bytes, more than the {MAX_VALUE_BYTES}-byte limit")]
    TooLarge(usize),
    /// The value is not JSON.
    #[error("value is not JSON: {0}")]
    NotJson(String),
    /// The value is JSON but not an object.
    #[error("value is JSON but not an object")]
    NotObject,
    /// The object has no string `Addr` field.
    #[error("value has no string \"Addr\" field")]
    MissingAddr,
    /// `Addr` is not a dialable `host:port`.
    #[error("\"Addr\" {0:?} is not a dialable host:port")]
    BadAddr(String),
}

impl Endpoint {
    /// An endpoint for `addr` whose metadata carries `instance_id`.
    ///
    /// # Errors
    /// [`Error::InvalidAddr`] if `addr` is not a dialable `host:port`.
    pub fn new(addr: impl Into<String>, instance_id: &str) -> Result<Self> {
        let addr = addr.into();
        if !is_dialable(&addr) {
            return Err(Error::InvalidAddr { addr });
        }
        let mut metadata = Map::new();
        metadata.insert(INSTANCE_ID_KEY.to_owned(), Value::from(instance_id));
        Ok(Self {
            addr,
            metadata: Value::Object(metadata),
        })
    }

    /// The instance id from the metadata, when there is one.
    pub fn instance_id(&self) -> Option<&str> {
        self.metadata.get(INSTANCE_ID_KEY)?.as_str()
    }

    /// Encodes the record in the shape Go's `endpoints.Manager` writes, `{"Op":0,"Addr":..,
    /// "Metadata":..}`, with an object or array metadata wrapped in a JSON string so that grpc-go
    /// can hash it (see the module docs); `null`, strings, numbers and booleans go as they are.
    pub fn encode(&self) -> String {
        // Go marshals struct fields in declaration order; a struct (not a map, which serde_json
        // sorts) keeps that order here.
        #[derive(serde::Serialize)]
        struct Wire<'a> {
            #[serde(rename = "Op")]
            op: u8,
            #[serde(rename = "Addr")]
            addr: &'a str,
            #[serde(rename = "Metadata")]
            metadata: &'a Value,
        }
        let wrapped;
        let metadata = match &self.metadata {
            Value::Object(_) | Value::Array(_) => {
                wrapped = Value::String(self.metadata.to_string());
                &wrapped
            }
            hashable => hashable,
        };
        let wire = Wire {
            op: 0,
            addr: &self.addr,
            metadata,
        };
        // Infallible: a string, an integer and a `Value` (whose map keys are strings) always
        // serialise, and writing to a String does no I/O.
        serde_json::to_string(&wire).expect("an endpoint record always serialises")
    }

    /// Decodes a value written by us (metadata wrapped in a string, or as a bare object before
    /// we wrapped it), by Go's naming package, or by hand with `etcdctl put`.
    ///
    /// # Errors
    /// A [`DecodeError`] saying why the value is unusable.
    pub fn decode(value: &[u8]) -> Result<Self, DecodeError> {
        let fields = json_object(value)?;
        let addr = field(&fields, "Addr")
            .and_then(Value::as_str)
            .ok_or(DecodeError::MissingAddr)?;
        if !is_dialable(addr) {
            return Err(DecodeError::BadAddr(addr.to_owned()));
        }
        Ok(Self {
            addr: addr.to_owned(),
            metadata: field(&fields, "Metadata").map_or(Value::Null, unwrap_metadata),
        })
    }
}

/// Our metadata travels as a string holding a JSON object (or array); unwrap it. Any other string
/// (a Go service's own `Metadata: "v2"`, say) and any other value is kept as it is.
fn unwrap_metadata(metadata: &Value) -> Value {
    if let Value::String(text) = metadata
        && (text.starts_with('{') || text.starts_with('['))
        && let Ok(wrapped @ (Value::Object(_) | Value::Array(_))) = serde_json::from_str(text)
    {
        return wrapped;
    }
    metadata.clone()
}

/// How records are laid out in etcd: ours (Go's naming package) or another framework's, so a mixed
/// estate can be read. Registration always writes [`Format::GoNaming`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Format {
    /// etcd's Go naming package (`go.etcd.io/etcd/client/v3/naming/endpoints`), used by our
    /// servers: keys `<namespace>/<service>/<id>`, values `{"Op":0,"Addr":..,"Metadata":..}`.
    #[default]
    GoNaming,
    /// go-zero's etcd registry: keys `<service>/<lease id>` (the namespace is not used), values a
    /// plain `host:port`.
    GoZero,
    /// kratos's etcd registry: keys `/<namespace>/<service>/<id>` (kratos's namespace is
    /// `microservices`), values a `ServiceInstance` JSON whose `endpoints` include `grpc://host:port`.
    Kratos,
}

impl Format {
    /// Every format.
    pub const ALL: [Format; 3] = [Format::GoNaming, Format::GoZero, Format::Kratos];

    /// The name used on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Format::GoNaming => "go-naming",
            Format::GoZero => "go-zero",
            Format::Kratos => "kratos",
        }
    }

    /// The key prefix under which this format keeps `service`'s instances.
    ///
    /// # Errors
    /// [`Error::InvalidName`] if the namespace or service cannot be used in a key.
    pub fn prefix(self, namespace: &str, service: &str) -> Result<String> {
        let prefix = crate::key::service_prefix(namespace, service)?;
        Ok(match self {
            Format::GoNaming => prefix,
            Format::GoZero => format!("{service}/"),
            Format::Kratos => format!("/{prefix}"),
        })
    }

    /// Decodes one value in this format.
    ///
    /// # Errors
    /// A [`DecodeError`] saying why the value is unusable.
    pub fn decode(self, value: &[u8]) -> Result<Endpoint, DecodeError> {
        match self {
            Format::GoNaming => Endpoint::decode(value),
            Format::GoZero => decode_go_zero(value),
            Format::Kratos => decode_kratos(value),
        }
    }
}

impl std::fmt::Display for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Format {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        Format::ALL
            .into_iter()
            .find(|f| f.name() == text.trim())
            .ok_or_else(|| format!("unknown format {text:?}; choose go-naming, go-zero or kratos"))
    }
}

/// go-zero stores the address itself.
fn decode_go_zero(value: &[u8]) -> Result<Endpoint, DecodeError> {
    if value.len() > MAX_VALUE_BYTES {
        return Err(DecodeError::TooLarge(value.len()));
    }
    let addr = std::str::from_utf8(value)
        .map_err(|_| DecodeError::BadAddr(String::from_utf8_lossy(value).into_owned()))?
        .trim();
    if !is_dialable(addr) {
        return Err(DecodeError::BadAddr(addr.to_owned()));
    }
    Ok(Endpoint {
        addr: addr.to_owned(),
        metadata: Value::Null,
    })
}

/// kratos stores a `ServiceInstance`: the gRPC endpoint is the one with the `grpc` scheme; its id,
/// version and metadata become our metadata (`instance_id`, `version`, and the rest as they are).
fn decode_kratos(value: &[u8]) -> Result<Endpoint, DecodeError> {
    let fields = json_object(value)?;
    let grpc = field(&fields, "endpoints")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .find_map(|url| url.strip_prefix("grpc://"))
        .ok_or(DecodeError::MissingAddr)?;
    // Drop a query (`?isSecure=false`) or path.
    let addr = grpc.split(['?', '/']).next().unwrap_or_default();
    if !is_dialable(addr) {
        return Err(DecodeError::BadAddr(addr.to_owned()));
    }
    let mut metadata = match field(&fields, "metadata") {
        Some(Value::Object(m)) => m.clone(),
        _ => Map::new(),
    };
    for (from, to) in [("id", INSTANCE_ID_KEY), ("version", "version")] {
        if let Some(v) = field(&fields, from).filter(|v| !v.is_null()) {
            metadata.entry(to).or_insert_with(|| v.clone());
        }
    }
    Ok(Endpoint {
        addr: addr.to_owned(),
        metadata: Value::Object(metadata),
    })
}

/// Parses a value that must be a JSON object of reasonable size.
fn json_object(value: &[u8]) -> Result<Map<String, Value>, DecodeError> {
    if value.len() > MAX_VALUE_BYTES {
        return Err(DecodeError::TooLarge(value.len()));
    }
    match serde_json::from_slice(value) {
        Ok(Value::Object(fields)) => Ok(fields),
        Ok(_) => Err(DecodeError::NotObject),
        Err(e) => Err(DecodeError::NotJson(e.to_string())),
    }
}

/// Looks a field up the way Go's `encoding/json` does: an exact match first, then any
/// case-insensitive one.
fn field<'a>(fields: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    fields.get(name).or_else(|| {
        fields
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
    })
}

/// True for `host:port` where host is a DNS name, IPv4 or bracketed IPv6 and port is 1-65535;
/// exactly what can follow `http://` in the URI we dial.
pub fn is_dialable(addr: &str) -> bool {
    let Ok(authority) = addr.parse::<http::uri::Authority>() else {
        return false;
    };
    authority.as_str() == addr
        && !authority.host().is_empty()
        && !addr.contains('@')
        && authority.port_u16().is_some_and(|p| p != 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn draining_is_read_as_a_boolean_or_as_text() {
        assert!(is_draining(&json!({"draining": true})));
        assert!(is_draining(&json!({"draining": "true"})));
        assert!(!is_draining(&json!({"draining": false})));
        assert!(!is_draining(&json!({"instance_id": "a"})));
        assert!(!is_draining(&json!(null)));
        assert!(!is_draining(&json!("draining")));
    }

    #[test]
    fn encodes_like_the_go_manager_with_hashable_metadata() {
        let e = Endpoint::new("10.0.0.5:50051", "node-a").unwrap();
        assert_eq!(
            e.encode(),
            r#"{"Op":0,"Addr":"10.0.0.5:50051","Metadata":"{\"instance_id\":\"node-a\"}"}"#
        );
        assert_eq!(Endpoint::decode(e.encode().as_bytes()).unwrap(), e);
        // Whatever we write, a Go decoder sees a hashable Metadata: never an object or array.
        for metadata in [
            json!({"a": {"b": [1]}}),
            json!([1, 2]),
            json!("v2"),
            json!(3),
        ] {
            let e = Endpoint {
                addr: "h:1".into(),
                metadata: metadata.clone(),
            };
            let wire: Value = serde_json::from_str(&e.encode()).unwrap();
            assert!(
                !wire["Metadata"].is_object() && !wire["Metadata"].is_array(),
                "{wire}"
            );
            assert_eq!(
                Endpoint::decode(e.encode().as_bytes()).unwrap().metadata,
                metadata
            );
        }
        let bare = Endpoint {
            addr: "h:1".into(),
            metadata: Value::Null,
        };
        assert_eq!(bare.encode(), r#"{"Op":0,"Addr":"h:1","Metadata":null}"#);
    }

    #[test]
    fn decodes_what_we_wrote_before_wrapping_metadata() {
        // Records written by earlier versions of this crate carry the object itself.
        let e = Endpoint::decode(
            br#"{"Op":0,"Addr":"10.0.0.5:50051","Metadata":{"instance_id":"node-a","weight":2}}"#,
        )
        .unwrap();
        assert_eq!(e.instance_id(), Some("node-a"));
        assert_eq!(e.metadata, json!({"instance_id": "node-a", "weight": 2}));
    }

    #[test]
    fn decodes_what_go_writes() {
        // Byte for byte what `endpoints.Manager.AddEndpoint(ctx, key, Endpoint{Addr: ..})` stores.
        let e = Endpoint::decode(br#"{"Op":0,"Addr":"10.0.0.5:50051","Metadata":null}"#).unwrap();
        assert_eq!(e.addr, "10.0.0.5:50051");
        assert_eq!(e.metadata, Value::Null);
        assert_eq!(e.instance_id(), None);
    }

    #[test]
    fn decodes_tolerant_variants() {
        for raw in [
            r#"{"Addr":"127.0.0.1:1"}"#, // no Op, as in etcd's docs
            r#"{"addr":"127.0.0.1:1","metadata":{"x":1}}"#, // lower case
            r#"{"ADDR":"127.0.0.1:1","Op":1,"Extra":[1,2]}"#, // odd case, unknown field, Op ignored
            r#"{"Op":0,"Addr":"127.0.0.1:1","Metadata":"plain"}"#, // metadata of any type
            r#"{"Op":0,"Addr":"127.0.0.1:1","Metadata":"{not json"}"#, // a string, kept as one
        ] {
            let e = Endpoint::decode(raw.as_bytes()).unwrap_or_else(|err| panic!("{raw}: {err}"));
            assert_eq!(e.addr, "127.0.0.1:1", "{raw}");
        }
        let e = Endpoint::decode(br#"{"Addr":"h:1","Metadata":"{not json"}"#).unwrap();
        assert_eq!(e.metadata, json!("{not json"));
        let e = Endpoint::decode(br#"{"Addr":"h:1","Metadata":{"instance_id":"x"}}"#).unwrap();
        assert_eq!(e.instance_id(), Some("x"));
        assert_eq!(e.metadata, json!({"instance_id": "x"}));
    }

    #[test]
    fn rejects_what_cannot_be_dialed_or_read() {
        let cases: [(&[u8], DecodeError); 7] = [
            (b"garbage", DecodeError::NotJson(String::new())),
            (b"[1,2]", DecodeError::NotObject),
            (br#"{"Op":0}"#, DecodeError::MissingAddr),
            (br#"{"Addr":5}"#, DecodeError::MissingAddr),
            (
                br#"{"Addr":"no-port"}"#,
                DecodeError::BadAddr("no-port".into()),
            ),
            (
                br#"{"Addr":"host:99999"}"#,
                DecodeError::BadAddr("host:99999".into()),
            ),
            (
                br#"{"Addr":"http://h:1"}"#,
                DecodeError::BadAddr("http://h:1".into()),
            ),
        ];
        for (raw, expected) in cases {
            let err = Endpoint::decode(raw).unwrap_err();
            match expected {
                DecodeError::NotJson(_) => assert!(matches!(err, DecodeError::NotJson(_))),
                _ => assert_eq!(err, expected, "{}", String::from_utf8_lossy(raw)),
            }
        }
        let huge = format!(
            r#"{{"Addr":"h:1","Metadata":"{}"}}"#,
            "x".repeat(MAX_VALUE_BYTES)
        );
        assert!(matches!(
            Endpoint::decode(huge.as_bytes()),
            Err(DecodeError::TooLarge(_))
        ));
    }

    #[test]
    fn other_frameworks_formats_are_read() {
        let zero = Format::GoZero.decode(b"10.0.0.7:8080\n").unwrap();
        assert_eq!(
            (zero.addr.as_str(), &zero.metadata),
            ("10.0.0.7:8080", &Value::Null)
        );
        assert!(Format::GoZero.decode(b"not an address").is_err());

        // What kratos's etcd registry stores for a ServiceInstance.
        let kratos = br#"{"id":"k-1","name":"helloworld","version":"v2","metadata":{"zone":"a"},"endpoints":["http://10.0.0.8:8000","grpc://10.0.0.8:9000?isSecure=false"]}"#;
        let e = Format::Kratos.decode(kratos).unwrap();
        assert_eq!(e.addr, "10.0.0.8:9000");
        assert_eq!(
            e.metadata,
            json!({"instance_id": "k-1", "version": "v2", "zone": "a"})
        );
        assert_eq!(
            Format::Kratos.decode(br#"{"endpoints":["http://h:1"]}"#),
            Err(DecodeError::MissingAddr)
        );

        assert_eq!(
            Format::GoNaming.prefix("services", "hello").unwrap(),
            "services/hello/"
        );
        assert_eq!(
            Format::GoZero.prefix("services", "greet.rpc").unwrap(),
            "greet.rpc/"
        );
        assert_eq!(
            Format::Kratos.prefix("microservices", "hello").unwrap(),
            "/microservices/hello/"
        );
        assert_eq!("kratos".parse::<Format>(), Ok(Format::Kratos));
    }

    #[test]
    fn dialable_addresses() {
        for ok in [
            "127.0.0.1:50051",
            "localhost:1",
            "[::1]:50051",
            "svc.ns.example:443",
        ] {
            assert!(is_dialable(ok), "{ok}");
        }
        for bad in [
            "",
            ":50051",
            "host",
            "host:0",
            "host:65536",
            "user@host:1",
            "a b:1",
            "h:1/x",
        ] {
            assert!(!is_dialable(bad), "{bad}");
        }
        assert!(matches!(
            Endpoint::new("nope", "id"),
            Err(Error::InvalidAddr { .. })
        ));
    }
}
