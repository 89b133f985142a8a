//! Hostile files, one test per class: every reader bounds what it allocates from what a
//! file claims, and every bad file is an error (never a panic or an abort) that names it —
//! for datasets, the item — also through the `edm2` binary (exit code 1).

mod common;
use edm2::data::decode::{decode_item, MAX_DECODED_BYTES, MAX_SIDE};
use edm2::data::{DataOptions, Dataset};
use edm2::error::Error;
use edm2::io::safetensors::{self, Dtype};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// A fresh directory for one call: tests run in parallel threads of one process and several
/// of them write through the same helper (`st_err`), so the name carries a per-call counter —
/// a name shared by two threads let one delete the other's file between write and read.
fn tmp(name: &str) -> PathBuf {
    static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let d = std::env::temp_dir().join(format!("edm2-hostile-{}-{n}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The error's message, after checking that it names `what`.
fn err_naming<T: std::fmt::Debug>(r: Result<T, Error>, what: &str) -> String {
    let m = r.expect_err("a hostile file must be an error").to_string();
    assert!(m.contains(what), "'{what}' not named in: {m}");
    m
}

fn assert_has(m: &str, parts: &[&str]) {
    for p in parts {
        assert!(m.contains(p), "'{p}' not in: {m}");
    }
}

// ---------------------------------------------------------------- safetensors

/// A safetensors file from a raw header text and data bytes.
fn st(header: &str, data: &[u8]) -> Vec<u8> {
    let mut b = (header.len() as u64).to_le_bytes().to_vec();
    b.extend_from_slice(header.as_bytes());
    b.extend_from_slice(data);
    b
}

/// Parses in memory and from disk (`read` and `read_header`, which must agree) → the
/// message of the error, which names the file.
fn st_err(name: &str, bytes: &[u8]) -> String {
    let d = tmp("st");
    let p = d.join(format!("{name}.safetensors"));
    std::fs::write(&p, bytes).unwrap();
    let m = err_naming(safetensors::parse(&p, bytes), &format!("{name}.safetensors"));
    let r = err_naming(safetensors::read(&p), &format!("{name}.safetensors"));
    let h = err_naming(safetensors::read_header(&p), &format!("{name}.safetensors"));
    assert_eq!(m, r);
    assert_eq!(m, h, "read_header and parse validate alike");
    let _ = std::fs::remove_dir_all(&d);
    m
}

fn t(name: &str, dtype: &str, shape: &str, a: u64, b: u64) -> String {
    format!(r#""{name}": {{"dtype": "{dtype}", "shape": {shape}, "data_offsets": [{a}, {b}]}}"#)
}

#[test]
fn safetensors_offsets_must_tile_the_data_exactly() {
    let ok = st(&format!("{{{}, {}}}", t("a", "F32", "[2]", 0, 8), t("b", "F16", "[2]", 8, 12)), &[0; 12]);
    let f = safetensors::parse(Path::new("ok"), &ok).unwrap();
    assert_eq!(f.tensors.iter().map(|(n, t)| (n.as_str(), t.data.len())).collect::<Vec<_>>(), [("a", 2), ("b", 2)]);
    // Two tensors over the same bytes.
    let m = st_err("same", &st(&format!("{{{}, {}}}", t("a", "F32", "[1]", 0, 4), t("b", "F32", "[1]", 0, 4)), &[0; 4]));
    assert_has(&m, &["overlaps", "tensor 'a'"]);
    // Partly overlapping.
    let m = st_err("overlap", &st(&format!("{{{}, {}}}", t("a", "F32", "[2]", 0, 8), t("b", "F32", "[2]", 4, 12)), &[0; 12]));
    assert_has(&m, &["'b'", "overlaps"]);
    // A gap between tensors, and before the first.
    let m = st_err("gap", &st(&format!("{{{}, {}}}", t("a", "F32", "[1]", 0, 4), t("b", "F32", "[1]", 8, 12)), &[0; 12]));
    assert_has(&m, &["'b'", "gap"]);
    let m = st_err("gap0", &st(&format!("{{{}}}", t("a", "F32", "[1]", 4, 8)), &[0; 8]));
    assert_has(&m, &["gap", "start of the data"]);
    // Bytes past the last tensor.
    let m = st_err("trailing", &st(&format!("{{{}}}", t("a", "F32", "[1]", 0, 4)), &[0; 5]));
    assert_has(&m, &["1 bytes after the last tensor"]);
    // A tensor past the end of the file.
    let m = st_err("past-eof", &st(&format!("{{{}}}", t("a", "F32", "[2]", 0, 8)), &[0; 4]));
    assert_has(&m, &["'a'", "ends at byte 8", "truncated"]);
    // Offsets that disagree with the shape, and reversed offsets.
    let m = st_err("len", &st(&format!("{{{}}}", t("a", "F32", "[3]", 0, 8)), &[0; 8]));
    assert_has(&m, &["'a'", "do not match shape [3]"]);
    st_err("reversed", &st(&format!("{{{}}}", t("a", "F32", "[0]", 8, 4)), &[0; 8]));
    // Zero-size tensors are allowed (the reference allows them), anywhere.
    let z = st(&format!("{{{}, {}, {}}}", t("e", "F32", "[0]", 0, 0), t("a", "F32", "[1, 1]", 0, 4), t("z", "BF16", "[2, 0]", 4, 4)), &[0; 4]);
    let f = safetensors::parse(Path::new("z"), &z).unwrap();
    assert_eq!(f.tensors.len(), 3);
    assert_eq!(f.require("z").unwrap().shape, vec![2, 0]);
}

#[test]
fn safetensors_duplicate_keys_are_refused() {
    // The same tensor twice is otherwise a valid file (serde_json alone keeps the last).
    let a = t("a", "F32", "[1]", 0, 4);
    let m = st_err("dup", &st(&format!("{{{a}, {a}}}"), &[0; 4]));
    assert_has(&m, &["duplicate key 'a'"]);
    let m = st_err("dup-meta", &st(&format!(r#"{{"__metadata__": {{"k": "1", "k": "2"}}, {a}}}"#), &[0; 4]));
    assert_has(&m, &["duplicate key 'k'"]);
    let m = st_err("dup-meta2", &st(&format!(r#"{{"__metadata__": {{}}, {a}, "__metadata__": {{}}}}"#), &[0; 4]));
    assert_has(&m, &["duplicate key '__metadata__'"]);
    let m = st_err("dup-field", &st(r#"{"a": {"dtype": "F32", "dtype": "F16", "shape": [1], "data_offsets": [0, 4]}}"#, &[0; 4]));
    assert_has(&m, &["tensor 'a'", "duplicate field"]);
    // Not duplicates: the same key in different tensors' objects, metadata null.
    let f = safetensors::parse(Path::new("m"), &st(&format!(r#"{{"__metadata__": null, {a}, {}}}"#, t("b", "F32", "[0]", 4, 4)), &[0; 4])).unwrap();
    assert!(f.metadata.is_empty() && f.tensors.len() == 2);
}

#[test]
fn safetensors_header_length_is_bounded_before_allocating() {
    let m = st_err("huge-len", &u64::MAX.to_le_bytes());
    assert_has(&m, &["header length 18446744073709551615", "limit"]);
    let mut b = 1000u64.to_le_bytes().to_vec();
    b.extend_from_slice(b"{}");
    let m = st_err("len-past-eof", &b);
    assert_has(&m, &["header length 1000 exceeds the file size 10"]);
    st_err("short", &[1, 2, 3]);
    // A sparse 150 MB file claiming a 150 MB header: refused from the 8 bytes, unread.
    let d = tmp("st-sparse");
    let p = d.join("sparse.safetensors");
    let mut f = std::fs::File::create(&p).unwrap();
    f.write_all(&150_000_000u64.to_le_bytes()).unwrap();
    f.set_len(150_000_100).unwrap();
    drop(f);
    let t0 = Instant::now();
    let m = err_naming(safetensors::read_header(&p), "sparse.safetensors");
    assert_has(&m, &["150000000", "exceeds the limit of 100000000"]);
    assert!(t0.elapsed() < Duration::from_millis(200), "{:?}", t0.elapsed());
}

#[test]
fn safetensors_header_content_is_checked() {
    let a = t("a", "F32", "[1]", 0, 4);
    let m = st_err("bad-dtype", &st(&format!("{{{}}}", t("a", "I64", "[1]", 0, 8)), &[0; 8]));
    assert_has(&m, &["'a'", "I64"]);
    let bytes = st(&format!("{{{}}}", t("a", "I64", "[1]", 0, 8)), &[0; 8]);
    assert!(matches!(safetensors::parse(Path::new("x"), &bytes), Err(Error::Dtype { .. })));
    // Shapes whose element count or byte length overflows.
    let m = st_err("overflow", &st(&format!("{{{}}}", t("a", "F32", "[4294967296, 4294967296]", 0, 0)), &[]));
    assert_has(&m, &["'a'", "overflows"]);
    let m = st_err("overflow-bytes", &st(&format!("{{{}}}", t("a", "F32", "[4611686018427387904]", 0, 0)), &[]));
    assert_has(&m, &["overflows"]);
    let m = st_err("neg", &st(r#"{"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}"#, &[0; 4]));
    assert_has(&m, &["tensor 'a'"]);
    st_err("no-offsets", &st(r#"{"a": {"dtype": "F32", "shape": [1]}}"#, &[0; 4]));
    st_err("three-offsets", &st(r#"{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4, 4]}}"#, &[0; 4]));
    let m = st_err("not-object", &st("[1, 2]", &[]));
    assert_has(&m, &["JSON object"]);
    st_err("not-json", &st("{\"a\": ", &[]));
    let m = st_err("not-utf8", &st("{\"\u{e9}\": 1}", &[]).iter().map(|&b| if b == 0xC3 { 0xFF } else { b }).collect::<Vec<_>>());
    assert_has(&m, &["UTF-8"]);
    let m = st_err("meta-number", &st(&format!(r#"{{"__metadata__": {{"k": 1}}, {a}}}"#), &[0; 4]));
    assert_has(&m, &["__metadata__"]);
}

#[test]
fn safetensors_writer_output_and_golden_files_pass() {
    let x: Vec<f32> = (0..6).map(|i| i as f32 * 0.5).collect();
    let meta = BTreeMap::from([("k".to_string(), "v".to_string())]);
    for dt in [Dtype::F32, Dtype::F16, Dtype::BF16] {
        // The writer pads the header with spaces; zero-size tensors are fine.
        let b = safetensors::serialize(&[("x", &[2, 3], &x), ("e", &[0], &[]), ("y", &[1], &[2.0])], &meta, dt);
        let f = safetensors::parse(Path::new("w"), &b).unwrap();
        assert_eq!(f.require("x").unwrap().data, x);
        assert_eq!(f.require("y").unwrap().data, [2.0]);
        assert_eq!(f.metadata["k"], "v");
    }
    let dir = common::test_data("golden");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "safetensors") {
            let f = safetensors::read(&p).unwrap();
            let h = safetensors::read_header(&p).unwrap();
            let names = |f: &safetensors::StFile| f.tensors.iter().map(|(n, t)| (n.clone(), t.shape.clone())).collect::<Vec<_>>();
            assert_eq!(names(&f), names(&h), "{}", p.display());
            n += 1;
        }
    }
    assert!(n >= 5, "golden files found: {n}");
}

// ---------------------------------------------------------------- .npy

fn npy(header: &str, body: &[u8]) -> Vec<u8> {
    let mut b = b"\x93NUMPY\x01\x00".to_vec();
    b.extend_from_slice(&(header.len() as u16).to_le_bytes());
    b.extend_from_slice(header.as_bytes());
    b.extend_from_slice(body);
    b
}

fn npy_shape(shape: &str, body: &[u8]) -> Vec<u8> {
    npy(&format!("{{'descr': '<f4', 'fortran_order': False, 'shape': ({shape}), }}\n"), body)
}

#[test]
fn npy_claims_are_checked_against_limits_and_the_file() {
    let ok = edm2::io::npy::serialize(&[1.0; 8 * 2 * 2], &[8, 2, 2]);
    assert_eq!(decode_item(&ok, "ok.npy").unwrap().1, 8);
    let t0 = Instant::now();
    let m = err_naming(decode_item(&npy_shape("100000, 100000, 100000", &[0; 64]), "huge.npy"), "huge.npy");
    assert_has(&m, &["100000x100000", "limit"]);
    let m = err_naming(decode_item(&npy_shape("18446744073709551615, 2, 2", &[0; 64]), "overflow.npy"), "overflow.npy");
    assert_has(&m, &["limit"]);
    assert!(t0.elapsed() < Duration::from_millis(100));
    // Shape against the file size, both ways.
    let m = err_naming(decode_item(&npy_shape("8, 2, 2", &[0; 100]), "short.npy"), "short.npy");
    assert_has(&m, &["truncated .npy data: 100 bytes", "128 expected"]);
    let m = err_naming(decode_item(&npy_shape("8, 2, 2", &[0; 132]), "long.npy"), "long.npy");
    assert_has(&m, &["trailing data"]);
    // Header lengths past the end of the file or over the limit.
    let mut b = ok.clone();
    b[8..10].copy_from_slice(&60000u16.to_le_bytes());
    let m = err_naming(decode_item(&b, "hlen.npy"), "hlen.npy");
    assert_has(&m, &["truncated .npy header (60000 bytes claimed)"]);
    let mut b = b"\x93NUMPY\x02\x00".to_vec();
    b.extend_from_slice(&u32::MAX.to_le_bytes());
    let m = err_naming(decode_item(&b, "hlen2.npy"), "hlen2.npy");
    assert_has(&m, &["4294967295", "over the limit"]);
    // Other shapes and dtypes.
    let m = err_naming(decode_item(&npy_shape(&"1, ".repeat(5000), &[0; 4]), "dims.npy"), "dims.npy");
    assert_has(&m, &["[C, H, W]"]);
    err_naming(decode_item(&npy_shape("8, 0, 0", &[]), "empty.npy"), "empty.npy");
    err_naming(decode_item(&npy_shape("8, -2, 2", &[]), "neg.npy"), "neg.npy");
    err_naming(decode_item(&npy("{'descr': '<f8', 'shape': (1, 1, 1), }", &[0; 8]), "f8.npy"), "f8.npy");
}

// ---------------------------------------------------------------- PNG and JPEG

fn png_bytes(w: u32, h: u32, color: png::ColorType, seed: u8) -> Vec<u8> {
    let c = match color {
        png::ColorType::Grayscale => 1,
        png::ColorType::Rgb => 3,
        _ => 4,
    };
    let px: Vec<u8> = (0..w * h * c).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect();
    let mut buf = Vec::new();
    let mut enc = png::Encoder::new(&mut buf, w, h);
    enc.set_color(color);
    enc.set_depth(png::BitDepth::Eight);
    enc.write_header().unwrap().write_image_data(&px).unwrap();
    buf
}

/// The PNG with its IHDR claiming `w`x`h` (CRC recomputed, so the decoder believes it).
fn png_claiming(mut b: Vec<u8>, w: u32, h: u32) -> Vec<u8> {
    assert_eq!(&b[12..16], b"IHDR");
    b[16..20].copy_from_slice(&w.to_be_bytes());
    b[20..24].copy_from_slice(&h.to_be_bytes());
    let mut crc = flate2::Crc::new();
    crc.update(&b[12..29]);
    b[29..33].copy_from_slice(&crc.sum().to_be_bytes());
    b
}

fn jpeg(name: &str) -> Vec<u8> {
    std::fs::read(common::test_data("jpeg").join(name)).unwrap()
}

/// The JPEG with its frame header (SOF0/SOF2) claiming `w`x`h`.
fn jpeg_claiming(mut b: Vec<u8>, w: u16, h: u16) -> Vec<u8> {
    let at = (2..b.len() - 9).find(|&i| b[i] == 0xFF && (b[i + 1] == 0xC0 || b[i + 1] == 0xC2)).expect("SOF");
    b[at + 5..at + 7].copy_from_slice(&h.to_be_bytes());
    b[at + 7..at + 9].copy_from_slice(&w.to_be_bytes());
    b
}

#[test]
fn images_claiming_huge_dimensions_are_refused_before_allocating() {
    for f in ["rgb16.jpg", "rgb16-progressive.jpg", "gray16.jpg"] {
        let (_, c, h, w) = decode_item(&jpeg(f), f).unwrap();
        assert_eq!((h, w, c), (16, 16, if f.starts_with("gray") { 1 } else { 3 }));
    }
    let good = png_bytes(16, 16, png::ColorType::Rgb, 0);
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("wide.png", png_claiming(good.clone(), 1_000_000, 16), "1000000x16"),
        ("huge.png", png_claiming(good.clone(), 2_000_000_000, 2_000_000_000), "2000000000x2000000000"),
        // Each side within the limit, the decoded size not (16384² x 3 = 768 MiB).
        ("big.png", png_claiming(good.clone(), MAX_SIDE as u32, MAX_SIDE as u32), "16384x16384"),
        ("huge.jpg", jpeg_claiming(jpeg("rgb16.jpg"), 65520, 65520), "65520x65520"),
        ("huge-progressive.jpg", jpeg_claiming(jpeg("rgb16-progressive.jpg"), 65520, 65520), "65520x65520"),
        ("big-gray.jpg", jpeg_claiming(jpeg("gray16.jpg"), 16385, 16), "16385x16"),
    ];
    for (name, bytes, dims) in cases {
        let t0 = Instant::now();
        let m = err_naming(decode_item(&bytes, name), name);
        assert_has(&m, &[dims, "limit"]);
        assert!(t0.elapsed() < Duration::from_millis(200), "{name}: {:?}", t0.elapsed());
    }
    // A claim within the limits but with no data behind it: an error, not a garbage image.
    let m = err_naming(decode_item(&png_claiming(good, 4096, 4096), "lying.png"), "lying.png");
    assert_has(&m, &["PNG"]);
    assert!(3 * 4096 * 4096 <= MAX_DECODED_BYTES);
}

/// A zip of `(name, bytes)` entries (deflated).
fn write_zip(path: &Path, entries: &[(&str, &[u8])]) {
    let mut z = zip::ZipWriter::new(std::fs::File::create(path).unwrap());
    for (n, b) in entries {
        z.start_file(*n, zip::write::SimpleFileOptions::default()).unwrap();
        z.write_all(b).unwrap();
    }
    z.finish().unwrap();
}

/// Opens `items` as a folder dataset and as a zip dataset; the first item is good, so the
/// error must come from `verify` (or `load_raw`) and name the item. → the two messages.
fn later_item_errors(name: &str, items: &[(&str, Vec<u8>)], bad: &str) -> Vec<String> {
    let d = tmp(name);
    let folder = d.join("imgs");
    std::fs::create_dir_all(&folder).unwrap();
    for (n, b) in items {
        std::fs::write(folder.join(n), b).unwrap();
    }
    let zp = d.join("imgs.zip");
    write_zip(&zp, &items.iter().map(|(n, b)| (*n, b.as_slice())).collect::<Vec<_>>());
    let mut out = vec![];
    for (src, named) in [(folder.clone(), folder.join(bad).display().to_string()), (zp.clone(), format!("{}:{bad}", zp.display()))] {
        let ds = Dataset::open(Some(s(&src)), &DataOptions::default()).unwrap();
        let t0 = Instant::now();
        let m = err_naming(ds.verify(&|_, _| {}), &named);
        assert!(t0.elapsed() < Duration::from_millis(500), "{name}: verify took {:?}", t0.elapsed());
        let i = (0..ds.raw_len()).find(|&i| ds.item_name(i) == named).unwrap();
        assert_eq!(err_naming(ds.load_raw(i), &named), m);
        out.push(m);
    }
    out
}

#[test]
fn later_items_claiming_another_geometry_are_refused_before_decoding() {
    let a = png_bytes(16, 16, png::ColorType::Rgb, 0);
    let b = png_bytes(16, 16, png::ColorType::Rgb, 1);
    // Huge claims, PNG and JPEG: named with the claim and the expected size.
    for m in later_item_errors("png-huge", &[("a.png", a.clone()), ("b.png", png_claiming(b.clone(), 60000, 60000))], "b.png") {
        assert_has(&m, &["60000x60000", "3x16x16", "a.png", "same size"]);
    }
    let ja = jpeg("rgb16.jpg");
    for m in later_item_errors("jpeg-huge", &[("a.jpg", ja.clone()), ("b.jpg", jpeg_claiming(ja.clone(), 65520, 65520))], "b.jpg") {
        assert_has(&m, &["65520x65520", "3x16x16", "same size"]);
    }
    // A modest mismatch in a file whose pixel data is garbage: the geometry check comes
    // first (a decode would say "corrupt").
    let mut c = png_claiming(b.clone(), 32, 32);
    let n = c.len();
    c[60..n - 20].iter_mut().for_each(|x| *x ^= 0x5A);
    for m in later_item_errors("png-mismatch", &[("a.png", a.clone()), ("c.png", c)], "c.png") {
        assert_has(&m, &["3x32x32", "same size"]);
        assert!(!m.contains("corrupt"), "{m}");
    }
    // Channels and encodings.
    for m in later_item_errors("png-gray", &[("a.png", a.clone()), ("g.png", png_bytes(16, 16, png::ColorType::Grayscale, 0))], "g.png") {
        assert_has(&m, &["1x16x16", "channels"]);
    }
    let lat = edm2::io::npy::serialize(&[0.0; 8 * 16 * 16], &[8, 16, 16]);
    for m in later_item_errors("mixed", &[("a.png", a.clone()), ("l.npy", lat)], "l.npy") {
        assert_has(&m, &["mixes images and latents"]);
    }
    let l0 = edm2::io::npy::serialize(&[0.0; 8 * 4 * 4], &[8, 4, 4]);
    for m in later_item_errors("npy-huge", &[("a.npy", l0), ("b.npy", npy_shape("8, 100000, 100000", &[0; 16]))], "b.npy") {
        assert_has(&m, &["8x100000x100000", "8x4x4"]);
    }
}

#[test]
fn first_items_claiming_huge_dimensions_fail_at_open() {
    let d = tmp("first");
    let zp = d.join("first.zip");
    write_zip(&zp, &[("a.jpg", &jpeg_claiming(jpeg("rgb16.jpg"), 65520, 65520))]);
    let t0 = Instant::now();
    let m = err_naming(Dataset::open(Some(s(&zp)), &DataOptions::default()), &format!("{}:a.jpg", zp.display()));
    assert_has(&m, &["65520x65520", "limit"]);
    let dir = d.join("dir");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("a.png"), png_claiming(png_bytes(16, 16, png::ColorType::Rgb, 0), 100_000, 100_000)).unwrap();
    let m = err_naming(Dataset::open(Some(s(&dir)), &DataOptions::default()), &dir.join("a.png").display().to_string());
    assert_has(&m, &["100000x100000", "limit"]);
    assert!(t0.elapsed() < Duration::from_millis(500));
}

// ---------------------------------------------------------------- zip entries and big files

/// Rewrites the uncompressed size of every zip header (local and central) of the entry
/// named `name`.
fn zip_declare(bytes: &mut [u8], name: &str, size: u32) {
    let mut n = 0;
    for i in 0..bytes.len().saturating_sub(46) {
        let sig = u32::from_le_bytes(bytes[i..i + 4].try_into().unwrap());
        let (size_at, name_len_at, name_at) = match sig {
            0x04034b50 => (22, 26, 30),
            0x02014b50 => (24, 28, 46),
            _ => continue,
        };
        let nl = u16::from_le_bytes(bytes[i + name_len_at..i + name_len_at + 2].try_into().unwrap()) as usize;
        if bytes.get(i + name_at..i + name_at + nl) == Some(name.as_bytes()) {
            bytes[i + size_at..i + size_at + 4].copy_from_slice(&size.to_le_bytes());
            n += 1;
        }
    }
    assert_eq!(n, 2, "local and central header of {name}");
}

#[test]
fn zip_entries_are_read_within_their_declared_size_and_the_cap() {
    let d = tmp("zip");
    let a = png_bytes(16, 16, png::ColorType::Rgb, 0);
    let b = png_bytes(16, 16, png::ColorType::Rgb, 1);
    let make = |name: &str, entries: &[(&str, &[u8])], patch: &dyn Fn(&mut Vec<u8>)| {
        let p = d.join(name);
        write_zip(&p, entries);
        let mut bytes = std::fs::read(&p).unwrap();
        patch(&mut bytes);
        std::fs::write(&p, bytes).unwrap();
        p
    };
    // An entry that inflates to more than it declares; to less; and one declaring more than the cap.
    let lying = make("lying.zip", &[("a.png", &a), ("b.png", &b)], &|z| zip_declare(z, "b.png", 100));
    let ds = Dataset::open(Some(s(&lying)), &DataOptions::default()).unwrap();
    let m = err_naming(ds.verify(&|_, _| {}), &format!("{}:b.png", lying.display()));
    assert_has(&m, &["inflates past its declared size of 100 bytes"]);
    let short = make("short.zip", &[("a.png", &a)], &|z| zip_declare(z, "a.png", a.len() as u32 + 7));
    let m = err_naming(Dataset::open(Some(s(&short)), &DataOptions::default()), &format!("{}:a.png", short.display()));
    assert_has(&m, &["declares"]);
    let over = make("over.zip", &[("a.png", &a), ("b.png", &b)], &|z| zip_declare(z, "b.png", u32::MAX - 1));
    let ds = Dataset::open(Some(s(&over)), &DataOptions::default()).unwrap();
    let m = err_naming(ds.verify(&|_, _| {}), &format!("{}:b.png", over.display()));
    assert_has(&m, &["declares 4294967294 bytes inflated, over the limit"]);
    let json = make("json.zip", &[("a.png", &a), ("dataset.json", b"{\"labels\": null}")], &|z| zip_declare(z, "dataset.json", 1 << 31));
    let m = err_naming(Dataset::open(Some(s(&json)), &DataOptions::default()), "json.zip:dataset.json");
    assert_has(&m, &["over the limit"]);
}

/// A deflated entry of `mib` MiB of zeros, honestly declared (a zip bomb: ~1000:1).
fn write_bomb(path: &Path, first: &[u8], mib: usize) {
    let mut z = zip::ZipWriter::new(std::fs::File::create(path).unwrap());
    z.start_file("a.png", zip::write::SimpleFileOptions::default()).unwrap();
    z.write_all(first).unwrap();
    let opts = zip::write::SimpleFileOptions::default().compression_level(Some(1)).large_file(false);
    z.start_file("b.png", opts).unwrap();
    let chunk = vec![0u8; 1 << 20];
    for _ in 0..mib {
        z.write_all(&chunk).unwrap();
    }
    z.finish().unwrap();
}

#[test]
fn zip_bombs_and_huge_files_are_refused_unread() {
    let d = tmp("bomb");
    let a = png_bytes(16, 16, png::ColorType::Rgb, 0);
    // Over the item cap (MAX_ITEM_FILE_BYTES = 320 MiB), declared honestly: refused from the
    // declaration; declared small: refused after the declared size.
    let bomb = d.join("bomb.zip");
    write_bomb(&bomb, &a, 330);
    assert!(std::fs::metadata(&bomb).unwrap().len() < 2 << 20);
    let ds = Dataset::open(Some(s(&bomb)), &DataOptions::default()).unwrap();
    let t0 = Instant::now();
    let m = err_naming(ds.verify(&|_, _| {}), "bomb.zip:b.png");
    assert_has(&m, &["declares 346030080 bytes inflated, over the limit"]);
    let mut bytes = std::fs::read(&bomb).unwrap();
    zip_declare(&mut bytes, "b.png", 1000);
    let liar = d.join("liar.zip");
    std::fs::write(&liar, bytes).unwrap();
    let ds = Dataset::open(Some(s(&liar)), &DataOptions::default()).unwrap();
    let m = err_naming(ds.verify(&|_, _| {}), "liar.zip:b.png");
    assert_has(&m, &["inflates past its declared size of 1000 bytes"]);
    assert!(t0.elapsed() < Duration::from_millis(500), "{:?}", t0.elapsed());

    // Folder items and dataset.json: a sparse 400 MB file is refused from its size, unread.
    let dir = d.join("dir");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("a.png"), &a).unwrap();
    let big = std::fs::File::create(dir.join("b.png")).unwrap();
    big.set_len(400 << 20).unwrap();
    let ds = Dataset::open(Some(s(&dir)), &DataOptions::default()).unwrap();
    let t0 = Instant::now();
    let m = err_naming(ds.verify(&|_, _| {}), &dir.join("b.png").display().to_string());
    assert_has(&m, &["419430400 bytes, over the limit"]);
    std::fs::remove_file(dir.join("b.png")).unwrap();
    std::fs::File::create(dir.join("dataset.json")).unwrap().set_len(300 << 20).unwrap();
    let m = err_naming(Dataset::open(Some(s(&dir)), &DataOptions::default()), "dataset.json");
    assert_has(&m, &["over the limit"]);
    assert!(t0.elapsed() < Duration::from_millis(500), "{:?}", t0.elapsed());
}

// ---------------------------------------------------------------- through the binary

/// `edm2 args…` → (exit code, stderr).
fn edm2(args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_edm2")).args(args).output().unwrap();
    (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn the_program_exits_1_naming_the_hostile_file() {
    let d = tmp("cli");
    let good = png_bytes(16, 16, png::ColorType::Rgb, 0);
    let cases: Vec<(&str, Vec<(&str, Vec<u8>)>, &str)> = vec![
        ("later-png", vec![("a.png", good.clone()), ("b.png", png_claiming(good.clone(), 100_000, 100_000))], "b.png"),
        ("first-jpeg", vec![("a.jpg", jpeg_claiming(jpeg("rgb16.jpg"), 65520, 65520))], "a.jpg"),
        ("later-jpeg", vec![("a.jpg", jpeg("rgb16.jpg")), ("b.jpg", jpeg_claiming(jpeg("rgb16.jpg"), 65520, 65520))], "b.jpg"),
        ("later-npy", vec![("a.npy", edm2::io::npy::serialize(&[0.0; 8 * 16 * 16], &[8, 16, 16])), ("b.npy", npy_shape("8, 99999, 99999", &[0; 4]))], "b.npy"),
    ];
    for (name, items, bad) in cases {
        let dir = d.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        for (n, b) in &items {
            std::fs::write(dir.join(n), b).unwrap();
        }
        let out = d.join(format!("{name}-run"));
        let t0 = Instant::now();
        let (code, err) = edm2(&["train", "--data", s(&dir), "--outdir", s(&out), "--preset", "cpu-xs16", "--duration", "64", "--batch", "8"]);
        assert_eq!(code, Some(1), "{name}: {err}");
        assert!(err.contains(&dir.join(bad).display().to_string()) && !err.contains("panicked"), "{name}: {err}");
        assert!(t0.elapsed() < Duration::from_secs(10), "{name}: {:?}", t0.elapsed());
        assert!(!out.join("training-state-0000000.safetensors").exists(), "{name}: no training before the data is verified");
    }
    // A zip whose entry lies about its size.
    let zp = d.join("lying.zip");
    write_zip(&zp, &[("a.png", &good), ("b.png", &png_bytes(16, 16, png::ColorType::Rgb, 1))]);
    let mut z = std::fs::read(&zp).unwrap();
    zip_declare(&mut z, "b.png", 10);
    std::fs::write(&zp, z).unwrap();
    let (code, err) = edm2(&["train", "--data", s(&zp), "--outdir", s(&d.join("zip-run")), "--preset", "cpu-xs16", "--duration", "64", "--batch", "8"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("lying.zip:b.png") && err.contains("declared size"), "{err}");
    // A hostile safetensors file where a network is expected.
    let net = d.join("net.safetensors");
    std::fs::write(&net, st(&format!("{{{}, {}}}", t("a", "F32", "[1]", 0, 4), t("b", "F32", "[1]", 0, 4)), &[0; 4])).unwrap();
    let (code, err) = edm2(&["generate", "--net", s(&net), "--seeds", "0-1", "--outdir", s(&d.join("gen"))]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("net.safetensors") && err.contains("overlaps"), "{err}");
}
