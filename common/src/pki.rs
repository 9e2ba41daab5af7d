//! Fleet identity: the CA, node and operator certificates, CSRs, fingerprints, and the
//! renewal schedule.
//!
//! An identity lives in the certificate subject: `CN` is the name, `O` is
//! [`ORGANIZATION`] and `OU` is the role (`node`, `viewer`, `operator`, `admin`).
//! The controller decides the subject when it signs; whatever a CSR asks for is
//! ignored except its public key. **Architecture Invariant:** a peer's name is read
//! from its verified certificate through [`Identity::from_cert_der`], never from a
//! message.

use std::fmt;
use std::str::FromStr;
use std::time::{Duration, SystemTime};

use novacron_core::names;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, DnValue, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
    SerialNumber,
};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

/// The `O` of every certificate the fleet CA signs.
pub const ORGANIZATION: &str = "novacron";
/// Default lifetime of a node certificate.
pub const DEFAULT_NODE_CERT_TTL: Duration = Duration::from_secs(30 * 24 * 3600);
/// Default lifetime of the fleet CA.
pub const DEFAULT_CA_TTL: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Share of a certificate's lifetime after which it is renewed.
pub const RENEW_AT_FRACTION: f64 = 0.7;
/// The longest a node name may be.
pub use novacron_core::names::MAX_NAME_LEN;

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// Key or certificate generation failed inside rcgen.
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    /// A certificate could not be parsed.
    #[error("cannot parse certificate: {0}")]
    Parse(String),
    /// The certificate's subject is not a NovaCron identity.
    #[error("certificate subject is not a NovaCron identity: {0}")]
    NotAnIdentity(String),
    /// A name does not follow the naming rules.
    #[error(
        "invalid name {name:?}: {why}; use 1 to 63 characters of a-z, 0-9, '-' and '.', starting and ending with a letter or digit"
    )]
    InvalidName {
        /// The rejected name.
        name: String,
        /// The broken rule.
        why: &'static str,
    },
    /// A fingerprint string did not parse.
    #[error("invalid CA fingerprint {value:?}: expected 'sha256:' followed by 64 hex digits")]
    InvalidFingerprint {
        /// The rejected value.
        value: String,
    },
    /// A role string did not parse.
    #[error("unknown role {0:?}: expected one of node, viewer, operator, admin")]
    UnknownRole(String),
    /// The PEM input held no certificate.
    #[error("no certificate found in PEM input")]
    NoCertificate,
    /// A serial number string did not parse.
    #[error(
        "invalid certificate serial {value:?}: {why}; give the serial as hex digits (as `novacron-controller admin issue` and `novacron context show` print it, ':' separators and a 0x prefix are allowed)"
    )]
    InvalidSerial {
        /// The rejected value.
        value: String,
        /// The broken rule.
        why: &'static str,
    },
}

/// What an identity may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// An agent.
    Node,
    /// An operator who may only read.
    Viewer,
    /// An operator who may change workloads and run commands.
    Operator,
    /// An operator who may also manage the fleet (tokens, revocation).
    Admin,
}

impl Role {
    /// The `OU` value.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Node => "node",
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = PkiError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "node" => Ok(Role::Node),
            "viewer" => Ok(Role::Viewer),
            "operator" => Ok(Role::Operator),
            "admin" => Ok(Role::Admin),
            other => Err(PkiError::UnknownRole(other.to_string())),
        }
    }
}

/// A verified name and role.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Identity {
    /// The node or operator name.
    pub name: String,
    /// What it may do.
    pub role: Role,
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.role, self.name)
    }
}

impl Identity {
    /// A node identity, with the name checked.
    pub fn node(name: &str) -> Result<Identity, PkiError> {
        validate_name(name)?;
        Ok(Identity {
            name: name.to_string(),
            role: Role::Node,
        })
    }

    /// Reads the identity from a certificate that the TLS layer has already verified.
    pub fn from_cert_der(der: &[u8]) -> Result<Identity, PkiError> {
        let (_, cert) =
            x509_parser::parse_x509_certificate(der).map_err(|e| PkiError::Parse(e.to_string()))?;
        let subject = cert.subject();
        let one = |attr: Option<&x509_parser::x509::AttributeTypeAndValue<'_>>| {
            attr.and_then(|a| a.as_str().ok()).map(str::to_string)
        };
        let org = one(subject.iter_organization().next());
        if org.as_deref() != Some(ORGANIZATION) {
            return Err(PkiError::NotAnIdentity(format!(
                "organization is {org:?}, expected {ORGANIZATION:?}"
            )));
        }
        let name = one(subject.iter_common_name().next())
            .ok_or_else(|| PkiError::NotAnIdentity("no common name".into()))?;
        let role = one(subject.iter_organizational_unit().next())
            .ok_or_else(|| PkiError::NotAnIdentity("no organizational unit (role)".into()))?
            .parse()?;
        validate_name(&name)?;
        Ok(Identity { name, role })
    }
}

/// Checks a node or operator name: 1–63 of `a-z 0-9 - .`, alphanumeric at both ends
/// (the rule is [`novacron_core::names::validate_name`]).
pub fn validate_name(name: &str) -> Result<(), PkiError> {
    names::validate_name(name).map_err(|e| PkiError::InvalidName {
        name: e.name,
        why: e.why,
    })
}

/// A SHA-256 fingerprint of a DER certificate, written `sha256:<hex>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Fingerprint([u8; 32]);

impl Fingerprint {
    /// The fingerprint of `der`.
    pub fn of(der: &[u8]) -> Fingerprint {
        Fingerprint(Sha256::digest(der).into())
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", hex::encode(self.0))
    }
}

impl FromStr for Fingerprint {
    type Err = PkiError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || PkiError::InvalidFingerprint {
            value: s.to_string(),
        };
        let hex_part = s.strip_prefix("sha256:").ok_or_else(bad)?;
        let mut out = [0u8; 32];
        hex::decode_to_slice(hex_part, &mut out).map_err(|_| bad())?;
        Ok(Fingerprint(out))
    }
}

/// The longest serial number a conforming certificate carries (RFC 5280, 4.1.2.2).
pub const MAX_SERIAL_BYTES: usize = 20;

/// A certificate serial number: its big-endian bytes without leading zero bytes,
/// written as lowercase hex. Two spellings of one number (`00ab`, `AB`, `0xab`,
/// `00:ab`) are the same serial.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Serial(Vec<u8>);

impl Serial {
    /// The serial of big-endian `bytes` (leading zero bytes dropped).
    pub fn from_bytes(bytes: &[u8]) -> Serial {
        let start = bytes.iter().position(|b| *b != 0).unwrap_or(bytes.len());
        Serial(bytes[start..].to_vec())
    }

    /// The serial of a DER certificate.
    pub fn of_cert_der(der: &[u8]) -> Result<Serial, PkiError> {
        let (_, cert) =
            x509_parser::parse_x509_certificate(der).map_err(|e| PkiError::Parse(e.to_string()))?;
        Ok(Serial::from_bytes(cert.raw_serial()))
    }

    /// The serial of the first certificate of a PEM text.
    pub fn of_cert_pem(pem: &str) -> Result<Serial, PkiError> {
        Serial::of_cert_der(&first_cert_der(pem)?)
    }
}

impl fmt::Display for Serial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            f.write_str("00")
        } else {
            f.write_str(&hex::encode(&self.0))
        }
    }
}

impl FromStr for Serial {
    type Err = PkiError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |why| PkiError::InvalidSerial {
            value: s.chars().take(80).collect(),
            why,
        };
        let trimmed = s.trim();
        let body = trimmed
            .strip_prefix("0x")
            .or_else(|| trimmed.strip_prefix("0X"))
            .unwrap_or(trimmed);
        let mut digits: String = body.chars().filter(|c| *c != ':').collect();
        if digits.is_empty() {
            return Err(bad("it is empty"));
        }
        if !digits.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad("it contains a character that is not a hex digit"));
        }
        if digits.len() % 2 == 1 {
            digits.insert(0, '0');
        }
        // Checked above: only hex digits, even length.
        let bytes = hex::decode(&digits).map_err(|_| bad("it is not hex"))?;
        let serial = Serial::from_bytes(&bytes);
        if serial.0.len() > MAX_SERIAL_BYTES {
            return Err(bad("it is longer than 20 bytes (40 hex digits)"));
        }
        Ok(serial)
    }
}

/// A certificate and its private key, both PEM.
#[derive(Clone)]
pub struct CertAndKey {
    /// The certificate, PEM.
    pub cert_pem: String,
    /// The private key, PEM (PKCS#8).
    pub key_pem: String,
}

impl fmt::Debug for CertAndKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertAndKey")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

/// Validity of a certificate to issue.
#[derive(Debug, Clone, Copy)]
pub struct Validity {
    /// Start of validity.
    pub not_before: SystemTime,
    /// End of validity.
    pub not_after: SystemTime,
}

impl Validity {
    /// Valid from slightly before `now` (a tenth of `ttl`, at most five minutes, to
    /// absorb clock skew) until `now + ttl`.
    pub fn starting(now: SystemTime, ttl: Duration) -> Validity {
        let skew = (ttl / 10).min(Duration::from_secs(300));
        Validity {
            not_before: now.checked_sub(skew).unwrap_or(now),
            not_after: now + ttl,
        }
    }
}

/// Creates a self-signed fleet CA.
pub fn generate_ca(common_name: &str, validity: Validity) -> Result<CertAndKey, PkiError> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params.distinguished_name = subject(common_name, None);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.serial_number = Some(random_serial());
    set_validity(&mut params, validity);
    let cert = params.self_signed(&key)?;
    Ok(CertAndKey {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// Issues the controller's server certificate for `names` (DNS names or IP addresses).
pub fn issue_server_cert(
    ca: &CertAndKey,
    names: &[String],
    validity: Validity,
) -> Result<CertAndKey, PkiError> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(names.to_vec())?;
    params.distinguished_name = subject("novacron-controller", None);
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.serial_number = Some(random_serial());
    params.use_authority_key_identifier_extension = true;
    set_validity(&mut params, validity);
    let issuer = issuer(ca)?;
    let cert = params.signed_by(&key, &issuer)?;
    Ok(CertAndKey {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// Issues a client certificate for `identity` with a fresh key (operators, tests, tools).
pub fn issue_client_cert(
    ca: &CertAndKey,
    identity: &Identity,
    validity: Validity,
) -> Result<CertAndKey, PkiError> {
    let key = KeyPair::generate()?;
    let params = client_params(identity, validity)?;
    let cert = params.signed_by(&key, &issuer(ca)?)?;
    Ok(CertAndKey {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// Makes a new key and a CSR for it. The subject in the CSR is informational only.
pub fn generate_csr(name: &str) -> Result<(String, String), PkiError> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params.distinguished_name = subject(name, None);
    let csr = params.serialize_request(&key)?;
    Ok((csr.pem()?, key.serialize_pem()))
}

/// Signs the public key in `csr_pem` for `identity`. The CSR's own subject and
/// extensions are ignored: the signer decides who the holder is.
pub fn sign_csr(
    ca: &CertAndKey,
    csr_pem: &str,
    identity: &Identity,
    validity: Validity,
) -> Result<String, PkiError> {
    let csr = CertificateSigningRequestParams::from_pem(csr_pem)?;
    let signed = CertificateSigningRequestParams {
        params: client_params(identity, validity)?,
        public_key: csr.public_key,
    };
    Ok(signed.signed_by(&issuer(ca)?)?.pem())
}

/// Facts about a certificate that the fleet needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// Serial number, hex.
    pub serial: String,
    /// Start of validity.
    pub not_before: SystemTime,
    /// End of validity.
    pub not_after: SystemTime,
}

/// Reads serial and validity from a DER certificate.
pub fn cert_info(der: &[u8]) -> Result<CertInfo, PkiError> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(der).map_err(|e| PkiError::Parse(e.to_string()))?;
    let to_system = |t: x509_parser::time::ASN1Time| {
        let secs = t.timestamp();
        if secs >= 0 {
            SystemTime::UNIX_EPOCH + Duration::from_secs(secs.unsigned_abs())
        } else {
            SystemTime::UNIX_EPOCH
        }
    };
    Ok(CertInfo {
        serial: hex::encode(cert.raw_serial()),
        not_before: to_system(cert.validity().not_before),
        not_after: to_system(cert.validity().not_after),
    })
}

/// Parses the first certificate of a PEM text into DER.
pub fn first_cert_der(pem: &str) -> Result<Vec<u8>, PkiError> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .next()
        .ok_or(PkiError::NoCertificate)?
        .map(|c| c.to_vec())
        .map_err(|e| PkiError::Parse(e.to_string()))
}

/// When to renew a certificate valid over `[not_before, not_after]`: at
/// [`RENEW_AT_FRACTION`] of its lifetime. Returns how long to wait from `now`
/// (zero when that moment has passed).
pub fn renew_in(not_before: SystemTime, not_after: SystemTime, now: SystemTime) -> Duration {
    let lifetime = not_after
        .duration_since(not_before)
        .unwrap_or(Duration::ZERO);
    let at = not_before + lifetime.mul_f64(RENEW_AT_FRACTION);
    at.duration_since(now).unwrap_or(Duration::ZERO)
}

fn client_params(identity: &Identity, validity: Validity) -> Result<CertificateParams, PkiError> {
    validate_name(&identity.name)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = subject(&identity.name, Some(identity.role));
    if identity.role == Role::Node {
        params.subject_alt_names = vec![SanType::DnsName(identity.name.clone().try_into()?)];
    }
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.serial_number = Some(random_serial());
    params.use_authority_key_identifier_extension = true;
    set_validity(&mut params, validity);
    Ok(params)
}

fn subject(cn: &str, role: Option<Role>) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(
        DnType::OrganizationName,
        DnValue::Utf8String(ORGANIZATION.into()),
    );
    if let Some(role) = role {
        dn.push(
            DnType::OrganizationalUnitName,
            DnValue::Utf8String(role.as_str().into()),
        );
    }
    dn.push(DnType::CommonName, DnValue::Utf8String(cn.into()));
    dn
}

fn issuer(ca: &CertAndKey) -> Result<Issuer<'static, KeyPair>, PkiError> {
    let key = KeyPair::from_pem(&ca.key_pem)?;
    Ok(Issuer::from_ca_cert_pem(&ca.cert_pem, key)?)
}

fn set_validity(params: &mut CertificateParams, validity: Validity) {
    params.not_before = OffsetDateTime::from(validity.not_before);
    params.not_after = OffsetDateTime::from(validity.not_after);
}

fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] &= 0x7f; // keep it positive
    SerialNumber::from_slice(&bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ca() -> CertAndKey {
        generate_ca(
            "test CA",
            Validity::starting(SystemTime::now(), Duration::from_secs(3600)),
        )
        .expect("CA")
    }

    #[test]
    fn signed_csr_carries_the_signers_identity_not_the_requesters() {
        let ca = ca();
        let (csr, _key) = generate_csr("i-claim-to-be-admin").expect("csr");
        let id = Identity::node("node-a").expect("valid");
        let pem = sign_csr(
            &ca,
            &csr,
            &id,
            Validity::starting(SystemTime::now(), Duration::from_secs(60)),
        )
        .expect("signed");
        let der = first_cert_der(&pem).expect("der");
        assert_eq!(Identity::from_cert_der(&der).expect("identity"), id);
    }

    #[test]
    fn operator_identity_round_trips() {
        let ca = ca();
        let id = Identity {
            name: "alice".into(),
            role: Role::Viewer,
        };
        let ck = issue_client_cert(
            &ca,
            &id,
            Validity::starting(SystemTime::now(), Duration::from_secs(60)),
        )
        .expect("issued");
        let der = first_cert_der(&ck.cert_pem).expect("der");
        assert_eq!(Identity::from_cert_der(&der).expect("identity"), id);
    }

    #[test]
    fn the_ca_itself_is_not_an_identity() {
        let ca = ca();
        let der = first_cert_der(&ca.cert_pem).expect("der");
        assert!(matches!(
            Identity::from_cert_der(&der),
            Err(PkiError::NotAnIdentity(_))
        ));
    }

    #[test]
    fn names_are_validated_with_the_rule_that_failed() {
        for bad in ["", "-a", "a-", "Upper", "has space", "ünï", &"x".repeat(64)] {
            let err = validate_name(bad).expect_err(bad);
            assert!(err.to_string().contains("invalid name"), "{err}");
        }
        for good in ["a", "node-1", "gpu.zone-b.7"] {
            validate_name(good).expect(good);
        }
    }

    #[test]
    fn fingerprint_parses_and_prints() {
        let fp = Fingerprint::of(b"hello");
        let s = fp.to_string();
        assert!(s.starts_with("sha256:") && s.len() == 7 + 64);
        assert_eq!(s.parse::<Fingerprint>().expect("parses"), fp);
        assert!("sha1:abcd".parse::<Fingerprint>().is_err());
        assert!("sha256:zz".parse::<Fingerprint>().is_err());
    }

    #[test]
    fn renewal_happens_at_seventy_percent() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let end = t0 + Duration::from_secs(100);
        assert_eq!(renew_in(t0, end, t0), Duration::from_secs(70));
        assert_eq!(
            renew_in(t0, end, t0 + Duration::from_secs(50)),
            Duration::from_secs(20)
        );
        assert_eq!(renew_in(t0, end, end), Duration::ZERO);
    }

    #[test]
    fn serial_spellings_of_one_number_are_equal() {
        let a: Serial = "00ab:CD".parse().expect("colons and case");
        assert_eq!(a, "0xabcd".parse().expect("0x prefix"));
        assert_eq!(a, "abcd".parse().expect("plain"));
        assert_eq!(a, Serial::from_bytes(&[0, 0, 0xab, 0xcd]));
        assert_eq!(a.to_string(), "abcd");
        assert_eq!(
            "bcd".parse::<Serial>().expect("odd"),
            Serial::from_bytes(&[0x0b, 0xcd])
        );
        for bad in ["", "0x", "xyz", "12 34", &"ab".repeat(21)] {
            let err = bad.parse::<Serial>().expect_err(bad);
            assert!(
                err.to_string().contains("invalid certificate serial"),
                "{err}"
            );
        }
    }

    #[test]
    fn serial_of_a_certificate_matches_cert_info() {
        let ca = ca();
        let v = Validity::starting(SystemTime::now(), Duration::from_secs(60));
        let ck = issue_client_cert(&ca, &Identity::node("n1").expect("valid"), v).expect("issued");
        let der = first_cert_der(&ck.cert_pem).expect("der");
        let serial = Serial::of_cert_der(&der).expect("serial");
        let info = cert_info(&der).expect("info");
        assert_eq!(
            serial,
            info.serial.parse().expect("cert_info serial parses")
        );
        assert_eq!(serial, Serial::of_cert_pem(&ck.cert_pem).expect("pem"));
    }

    #[test]
    fn cert_info_reads_validity() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(2_000_000_000);
        let ca = ca();
        let v = Validity::starting(now, Duration::from_secs(1000));
        let ck = issue_client_cert(&ca, &Identity::node("n1").expect("valid"), v).expect("issued");
        let info = cert_info(&first_cert_der(&ck.cert_pem).expect("der")).expect("info");
        assert_eq!(info.not_after, now + Duration::from_secs(1000));
        assert_eq!(info.not_before, now - Duration::from_secs(100));
        assert_eq!(info.serial.len(), 32);
    }
}
