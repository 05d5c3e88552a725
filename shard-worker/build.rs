//! Compiles the long-double INCRBYFLOAT helper (csrc/float.c).
fn main() {
    println!("cargo:rerun-if-changed=csrc/float.c");
    cc::Build::new()
        .file("csrc/float.c")
        .warnings(true)
        .compile("shoal_float");
}
