//! Misuse of `#[derive(MemClone)]` is a compile error pointing at the offending token.
//! The `.stderr` files are pinned to the toolchain this project builds with.

#[test]
fn derive_misuse_is_a_compile_error() {
    let cases = trybuild::TestCases::new();
    cases.compile_fail("tests/ui/*.rs");
}
