//! The few DER encodings rcgen does not write for us: a critical SAN extension and PKCS#8
//! wrappers for PKCS#1 (RSA) and SEC1 (EC) keys, which ring only accepts as PKCS#8.

/// OID 2.5.29.17, subjectAltName, as rcgen's custom extensions want it.
pub(crate) const OID_SUBJECT_ALT_NAME: &[u64] = &[2, 5, 29, 17];

const TAG_INTEGER: u8 = 0x02;
const TAG_OCTET_STRING: u8 = 0x04;
const TAG_NULL: u8 = 0x05;
const TAG_SEQUENCE: u8 = 0x30;
/// GeneralName uniformResourceIdentifier: [6] IMPLICIT IA5String.
const TAG_URI: u8 = 0x86;

/// rsaEncryption (1.2.840.113549.1.1.1), full TLV.
const OID_RSA_ENCRYPTION: &[u8] =
    &[0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01];
/// id-ecPublicKey (1.2.840.10045.2.1), full TLV.
const OID_EC_PUBLIC_KEY: &[u8] = &[0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
/// prime256v1 / secp256r1 (1.2.840.10045.3.1.7), full TLV.
pub(crate) const OID_P256: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
/// secp384r1 (1.3.132.0.34), full TLV.
pub(crate) const OID_P384: &[u8] = &[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22];

/// One DER TLV with a definite-length encoding.
pub(crate) fn tlv(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(content.len() + 6);
    out.push(tag);
    let len = content.len();
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes = len.to_be_bytes();
        let skip = bytes.iter().take_while(|b| **b == 0).count();
        out.push(0x80 | (bytes.len() - skip) as u8);
        out.extend_from_slice(&bytes[skip..]);
    }
    out.extend_from_slice(content);
    out
}

/// The value of a subjectAltName extension holding a single URI.
pub(crate) fn san_uri(uri: &str) -> Vec<u8> {
    tlv(TAG_SEQUENCE, &tlv(TAG_URI, uri.as_bytes()))
}

/// PKCS#8 PrivateKeyInfo around a PKCS#1 RSAPrivateKey.
pub(crate) fn pkcs8_from_pkcs1(pkcs1: &[u8]) -> Vec<u8> {
    let alg = [OID_RSA_ENCRYPTION, &[TAG_NULL, 0x00]].concat();
    pkcs8(&alg, pkcs1)
}

/// PKCS#8 PrivateKeyInfo around a SEC1 ECPrivateKey on the curve `curve_oid` (full TLV).
pub(crate) fn pkcs8_from_sec1(sec1: &[u8], curve_oid: &[u8]) -> Vec<u8> {
    let alg = [OID_EC_PUBLIC_KEY, curve_oid].concat();
    pkcs8(&alg, sec1)
}

fn pkcs8(algorithm_content: &[u8], private_key: &[u8]) -> Vec<u8> {
    let body = [
        &tlv(TAG_INTEGER, &[0x00])[..],
        &tlv(TAG_SEQUENCE, algorithm_content),
        &tlv(TAG_OCTET_STRING, private_key),
    ]
    .concat();
    tlv(TAG_SEQUENCE, &body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_are_definite_and_minimal() {
        assert_eq!(tlv(0x04, &[1, 2]), vec![0x04, 0x02, 1, 2]);
        let long = vec![0u8; 200];
        assert_eq!(&tlv(0x04, &long)[..3], &[0x04, 0x81, 200]);
        let longer = vec![0u8; 0x1234];
        assert_eq!(&tlv(0x04, &longer)[..4], &[0x04, 0x82, 0x12, 0x34]);
    }
}
