//! The numeric and jsonb readers take bytes they must not trust: anything gets text or `None`, never a panic,
//! and never text that is not JSON where they claim to have written JSON.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut out = String::new();
    if changerelay_core::pgtext::write_jsonb(data, &mut out).is_some() {
        assert!(serde_json::from_str::<Box<serde_json::value::RawValue>>(&out).is_ok(), "{out}");
    }
    out.clear();
    let _ = changerelay_core::pgtext::write_numeric(data, &mut out);
    let _ = changerelay_core::pgtext::varlena_payload(data);
});
