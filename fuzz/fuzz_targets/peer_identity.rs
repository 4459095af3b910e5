//! SPIFFE IDs and certificate identity extraction: any string is parsed or refused, a parsed
//! ID prints back to an equal one, and any bytes offered as a peer's leaf certificate name at
//! most the one SPIFFE ID they carry, without panicking.
#![no_main]

use hboned::identity::Identity;
use libfuzzer_sys::fuzz_target;
use rustls_pki_types::CertificateDer;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data)
        && let Ok(id) = Identity::parse(text)
    {
        let again = Identity::parse(&id.to_string()).expect("a parsed ID prints parseable");
        assert_eq!(again, id);
    }
    let leaf = [CertificateDer::from(data.to_vec())];
    if let Some(id) = hboned::tls::peer_identity(Some(&leaf)) {
        let uris = hboned::tls::leaf_info(&leaf[0])
            .expect("named leaves parse")
            .uris;
        assert_eq!(uris, [id.to_string()]);
    }
});
