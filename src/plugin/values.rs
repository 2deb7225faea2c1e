//! Turning decoded heap tuples into typed rows of the core event model.
//!
//! Text produced by output functions is palloc'd in the per-change memory
//! context and borrowed, not copied, by the returned rows; the caller drops
//! the rows before resetting that context.

use super::relations::{ColumnInfo, ElemInfo, Kind, RelInfo};
use changerelay_core::{pgtext, Column, Row, Scalar, Value};
use pgrx::pg_sys;
use std::borrow::Cow;
use std::ffi::{c_char, CStr};

/// How values are turned into text: the database encoding, and the size
/// past which a value is left out.
#[derive(Clone, Copy)]
pub struct Conversion {
    /// The database encoding is UTF-8 (text needs no conversion).
    pub utf8: bool,
    /// Values larger than this (bytes, as stored) become `Scalar::Omitted`.
    pub max_value_size: u64,
}

/// Reused buffers for deforming tuples.
#[derive(Default)]
pub struct Scratch {
    datums: Vec<pg_sys::Datum>,
    nulls: Vec<bool>,
}

/// A decoded tuple: the row, which column each entry came from, and the
/// unchanged TOASTed columns left out of it.
pub struct DecodedRow<'a> {
    pub row: Row<'a>,
    pub attrs: Vec<usize>,
    pub unchanged_toast: Vec<Cow<'a, str>>,
}

impl<'a> DecodedRow<'a> {
    /// The text of column `attr`, when the row has it and it is not NULL.
    pub fn text_of(&self, attr: usize) -> Option<Cow<'a, str>> {
        let i = self.attrs.iter().position(|&x| x == attr)?;
        match &self.row[i].value {
            Value::Scalar(s) => s.identifier_text(),
            Value::Array { .. } => None,
        }
    }

    /// Whether the row carries column `attr` (possibly NULL).
    pub fn has(&self, attr: usize) -> bool {
        self.attrs.contains(&attr)
    }

    /// The identity columns of this row, or `None` when it has none of them.
    pub fn key(&self, info: &RelInfo) -> Option<Row<'a>> {
        if info.key_attrs.is_empty() {
            return None;
        }
        let key: Row<'a> = info
            .key_attrs
            .iter()
            .filter_map(|a| self.attrs.iter().position(|x| x == a).map(|i| self.row[i].clone()))
            .collect();
        (!key.is_empty()).then_some(key)
    }
}

/// Decodes `tuple`; with `only`, just those column indexes.
///
/// # Safety
/// `tuple` must be a live tuple of the relation `info` and `tupdesc` describe,
/// and the result must be dropped before the current memory context is reset.
pub unsafe fn decode_row<'a>(
    info: &'a RelInfo,
    tupdesc: pg_sys::TupleDesc,
    tuple: pg_sys::HeapTuple,
    only: Option<&[usize]>,
    scratch: &mut Scratch,
    conv: Conversion,
) -> DecodedRow<'a> {
    let natts = info.columns.len();
    scratch.datums.clear();
    scratch.datums.resize(natts, pg_sys::Datum::from(0usize));
    scratch.nulls.clear();
    scratch.nulls.resize(natts, true);
    // SAFETY: the arrays hold natts entries, as heap_deform_tuple requires.
    unsafe { pg_sys::heap_deform_tuple(tuple, tupdesc, scratch.datums.as_mut_ptr(), scratch.nulls.as_mut_ptr()) };
    let mut out = DecodedRow {
        row: Vec::with_capacity(natts),
        attrs: Vec::with_capacity(natts),
        unchanged_toast: Vec::new(),
    };
    let mut visit = |i: usize| {
        let col = &info.columns[i];
        if col.dropped {
            return;
        }
        let (datum, null) = (scratch.datums[i], scratch.nulls[i]);
        // SAFETY: a non-null varlena datum points at a valid varlena header.
        if !null && col.varlena && unsafe { is_external_ondisk(datum) } {
            out.unchanged_toast.push(Cow::Borrowed(col.name.as_str()));
            return;
        }
        let value = if null {
            Value::NULL
        } else if let Some(size) = col
            .varlena
            .then(|| {
                // SAFETY: a non-null varlena datum; only its header is read (an
                // external value is not fetched to learn its size).
                // The size counts the 4-byte length word: the value's bytes are what is left.
                unsafe { (pg_sys::toast_raw_datum_size(datum) as u64).saturating_sub(pg_sys::VARHDRSZ as u64) }
            })
            .filter(|size| *size > conv.max_value_size)
        {
            // Too large to decode: the change keeps the column, marked.
            Value::Scalar(Scalar::Omitted(size))
        } else {
            // SAFETY: `datum` is a non-null value of the column's type.
            unsafe { column_value(col, datum, conv.utf8) }
        };
        out.row.push(Column {
            name: Cow::Borrowed(col.name.as_str()),
            value,
        });
        out.attrs.push(i);
    };
    match only {
        Some(attrs) => attrs.iter().copied().filter(|&i| i < natts).for_each(&mut visit),
        None => (0..natts).for_each(&mut visit),
    }
    out
}

/// An on-disk TOAST pointer: the value was not changed by this update and is
/// not in the WAL record.
///
/// # Safety
/// `datum` must point to a varlena.
unsafe fn is_external_ondisk(datum: pg_sys::Datum) -> bool {
    let ptr = datum.cast_mut_ptr::<pg_sys::varlena>();
    // SAFETY: a 1-byte external header is followed by its tag byte.
    unsafe {
        pgrx::varlena::varatt_is_1b_e(ptr)
            && pgrx::varlena::vartag_external(ptr) == pg_sys::vartag_external::VARTAG_ONDISK as u8
    }
}

/// # Safety
/// `datum` must be a non-null value of the column's type.
unsafe fn column_value<'a>(col: &'a ColumnInfo, datum: pg_sys::Datum, utf8: bool) -> Value<'a> {
    match (col.kind, &col.elem) {
        // SAFETY: forwarded from the caller.
        (Kind::Array, Some(elem)) => unsafe { array_value(datum, elem, utf8) },
        // SAFETY: forwarded from the caller.
        (kind, _) => Value::Scalar(unsafe { scalar_value(kind, datum, &col.out, utf8) }),
    }
}

/// # Safety
/// `datum` must be a non-null value of a type of this `kind` whose output
/// function `out` is.
unsafe fn scalar_value<'a>(kind: Kind, datum: pg_sys::Datum, out: &pg_sys::FmgrInfo, utf8: bool) -> Scalar<'a> {
    let bits = datum.value();
    match kind {
        Kind::Bool => Scalar::Bool(bits & 0xff != 0),
        Kind::Int2 => Scalar::Int(i64::from(bits as i16)),
        Kind::Int4 => Scalar::Int(i64::from(bits as i32)),
        Kind::Int8 => Scalar::Int(bits as i64),
        Kind::Float4 => Scalar::Float4(f32::from_bits(bits as u32)),
        Kind::Float8 => Scalar::Float(f64::from_bits(bits as u64)),
        Kind::Date => Scalar::Date(bits as i32),
        Kind::Timestamp => Scalar::Timestamp(bits as i64),
        Kind::TimestampTz => Scalar::TimestampTz(bits as i64),
        // SAFETY: a uuid datum points at its 16 bytes.
        Kind::Uuid => Scalar::Uuid(unsafe { *datum.cast_mut_ptr::<[u8; 16]>() }),
        // SAFETY: forwarded from the caller (both readers take a varlena).
        Kind::Numeric => match unsafe { stored_text(datum, pgtext::write_numeric) } {
            Some(text) => Scalar::Numeric(Cow::Owned(text)),
            // SAFETY: forwarded from the caller.
            None => Scalar::Numeric(unsafe { output_text(out, datum, utf8) }),
        },
        // jsonb's strings are stored in the database encoding: read as UTF-8
        // only where that is the encoding (LATIN1 bytes can look like UTF-8).
        // SAFETY: forwarded from the caller.
        Kind::Jsonb if utf8 => match unsafe { stored_text(datum, pgtext::write_jsonb) } {
            Some(text) => Scalar::Json(Cow::Owned(text)),
            // SAFETY: forwarded from the caller.
            None => Scalar::Json(unsafe { output_text(out, datum, utf8) }),
        },
        // SAFETY: forwarded from the caller.
        Kind::Jsonb => Scalar::Json(unsafe { output_text(out, datum, utf8) }),
        // SAFETY: json's stored text is what its output function returns.
        Kind::Json if utf8 => Scalar::Json(unsafe { varlena_text(datum) }),
        // SAFETY: forwarded from the caller.
        Kind::Json => Scalar::Json(unsafe { output_text(out, datum, utf8) }),
        // SAFETY: forwarded from the caller.
        Kind::Varlena if utf8 => Scalar::Text(unsafe { varlena_text(datum) }),
        // SAFETY: forwarded from the caller.
        Kind::Array | Kind::Text | Kind::Varlena => Scalar::Text(unsafe { output_text(out, datum, utf8) }),
    }
}

/// The text a core reader writes from a varlena's stored bytes (numeric,
/// jsonb), or `None` when it does not recognise them.
///
/// # Safety
/// `datum` must be a non-null varlena, alive while this runs.
unsafe fn stored_text(datum: pg_sys::Datum, write: fn(&[u8], &mut String) -> Option<()>) -> Option<String> {
    // The readers know the little-endian layout only.
    if cfg!(target_endian = "big") {
        return None;
    }
    // SAFETY: forwarded from the caller; the bytes are not kept past this call.
    let bytes = unsafe { varlena_bytes(datum) };
    let mut text = String::with_capacity(bytes.len() * 2 + 8);
    write(bytes, &mut text).map(|()| text)
}

/// # Safety
/// `datum` must be a non-null array whose element type `elem` describes.
unsafe fn array_value<'a>(datum: pg_sys::Datum, elem: &ElemInfo, utf8: bool) -> Value<'a> {
    // SAFETY: detoasting a valid array datum yields a flat ArrayType whose
    // dimensions follow its header; deconstruct_array fills the out-params.
    unsafe {
        let arr = pg_sys::pg_detoast_datum(datum.cast_mut_ptr()) as *mut pg_sys::ArrayType;
        let ndim = (*arr).ndim.max(0) as usize;
        let dims_ptr = arr
            .cast::<u8>()
            .add(std::mem::size_of::<pg_sys::ArrayType>())
            .cast::<i32>();
        let dims: Vec<u32> = (0..ndim).map(|d| (*dims_ptr.add(d)).max(0) as u32).collect();
        let mut elems_ptr: *mut pg_sys::Datum = std::ptr::null_mut();
        let mut nulls_ptr: *mut bool = std::ptr::null_mut();
        let mut n = 0i32;
        pg_sys::deconstruct_array(
            arr,
            elem.typid,
            i32::from(elem.typlen),
            elem.byval,
            elem.align,
            &mut elems_ptr,
            &mut nulls_ptr,
            &mut n,
        );
        let n = n.max(0) as usize;
        let mut elems = Vec::with_capacity(n);
        for i in 0..n {
            if !nulls_ptr.is_null() && *nulls_ptr.add(i) {
                elems.push(Scalar::Null);
            } else {
                elems.push(scalar_value(elem.kind, *elems_ptr.add(i), &elem.out, utf8));
            }
        }
        Value::Array { dims, elems }
    }
}

/// The text of a text, varchar or char(n) value in a UTF-8 database: its
/// bytes as stored, which is what its output function returns, without
/// calling it (no copy, no call).
///
/// # Safety
/// `datum` must be a non-null value of such a type, alive for `'a`.
unsafe fn varlena_text<'a>(datum: pg_sys::Datum) -> Cow<'a, str> {
    // SAFETY: forwarded from the caller.
    let bytes = unsafe { varlena_bytes(datum) };
    match std::str::from_utf8(bytes) {
        Ok(s) => Cow::Borrowed(s),
        Err(_) => Cow::Owned(String::from_utf8_lossy(bytes).into_owned()),
    }
}

/// The data of a non-null varlena, detoasted.
///
/// # Safety
/// `datum` must be a non-null varlena, alive for `'a`.
unsafe fn varlena_bytes<'a>(datum: pg_sys::Datum) -> &'a [u8] {
    // SAFETY: detoasting a valid varlena yields a varlena (the datum itself
    // when it is plain, or a copy in the current per-change context) whose
    // header gives the length of its data.
    unsafe {
        let v = pg_sys::pg_detoast_datum_packed(datum.cast_mut_ptr());
        let len = pgrx::varlena::varsize_any_exhdr(v);
        std::slice::from_raw_parts(pgrx::varlena::vardata_any(v).cast::<u8>(), len)
    }
}

/// Calls the type's output function and borrows its text.
///
/// # Safety
/// `datum` must be a non-null value of the type `out` is the output function of.
unsafe fn output_text<'a>(out: &pg_sys::FmgrInfo, datum: pg_sys::Datum, utf8: bool) -> Cow<'a, str> {
    // OutputFunctionCall takes a mutable FmgrInfo only to cache in fn_extra,
    // which it allocates in fn_mcxt; the entry is not used concurrently.
    let out = std::ptr::from_ref(out).cast_mut();
    // SAFETY: forwarded from the caller; the result is a palloc'd C string in
    // the current (per-change) memory context.
    let text = unsafe { pg_sys::OutputFunctionCall(out, datum) };
    // SAFETY: as above.
    unsafe { server_text(text, utf8) }
}

/// Borrows a server-encoded C string as UTF-8, converting when the database
/// is not UTF-8. Invalid bytes are replaced, never passed on into JSON, and
/// never an error: in a SQL_ASCII database any bytes are legal text, and a
/// character with no UTF-8 equivalent must not stop decoding.
///
/// # Safety
/// `text` must be a NUL-terminated string that outlives `'a`.
pub unsafe fn server_text<'a>(text: *const c_char, utf8: bool) -> Cow<'a, str> {
    // SAFETY: forwarded from the caller.
    let bytes: &'a [u8] = unsafe { CStr::from_ptr(text) }.to_bytes();
    if utf8 || bytes.is_ascii() {
        return match std::str::from_utf8(bytes) {
            Ok(s) => Cow::Borrowed(s),
            Err(_) => Cow::Owned(String::from_utf8_lossy(bytes).into_owned()),
        };
    }
    // SAFETY: reading the database encoding.
    let sql_ascii = unsafe { pg_sys::GetDatabaseEncoding() } == pg_sys::pg_enc::PG_SQL_ASCII as i32;
    if sql_ascii {
        // No conversion is defined (pg_server_to_any would only verify the
        // bytes as UTF-8, and raise an error where they are not).
        return String::from_utf8_lossy(bytes);
    }
    let converted = pgrx::PgTryBuilder::new(|| {
        // SAFETY: converting `bytes.len()` bytes of a valid server string;
        // the result is palloc'd in the current (per-change) context. An
        // unconvertible character raises an error, caught here: the
        // conversion only allocates, so nothing is left to clean up.
        unsafe {
            let conv = pg_sys::pg_server_to_any(text, bytes.len() as i32, pg_sys::pg_enc::PG_UTF8 as i32);
            Some(CStr::from_ptr(conv).to_bytes())
        }
    })
    .catch_others(|_| None)
    .execute();
    match converted {
        Some(b) => match std::str::from_utf8(b) {
            Ok(s) => Cow::Borrowed(s),
            Err(_) => Cow::Owned(String::from_utf8_lossy(b).into_owned()),
        },
        None => String::from_utf8_lossy(bytes),
    }
}
