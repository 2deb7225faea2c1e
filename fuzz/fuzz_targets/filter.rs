//! Tenant filters from arbitrary JSON: parsed or refused, and a parsed filter can be matched against rows.
#![no_main]
use changerelay_core::filter::Filter;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(data) else { return };
    if let Ok(f) = Filter::parse(&value) {
        let _ = f.matches(value.as_object());
        let _ = f.matches(None);
    }
});
