//! Cursor parsing: any text decodes or is refused; what decodes encodes back to the same cursor.
#![no_main]
use changerelay_core::cursor::Cursor;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(c) = Cursor::decode(text) {
        let again = Cursor::decode(&c.encode()).expect("an encoded cursor decodes");
        assert_eq!(again.position(), c.position());
    }
});
