// Android: link libherald_ffi.so for 16 KB memory pages (Android 15+ devices with 16 KB
// pages refuse a library whose LOAD segments are aligned to less; Google Play requires
// it). NDK r28+ does this by default, older NDKs need the flag; a link argument from
// here applies whatever RUSTFLAGS cargo-ndk sets. bindings/build-android.sh checks the
// result (scripts/lib/elf_align.py).
fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("android") {
        println!("cargo:rustc-cdylib-link-arg=-Wl,-z,max-page-size=16384");
    }
}
