//! Marks the build when `AMQP_URL` names an external broker, so tests that need the embedded
//! broker are reported as ignored ("embedded only") rather than silently passing.

fn main() {
    println!("cargo::rustc-check-cfg=cfg(warren_external)");
    println!("cargo::rerun-if-env-changed=AMQP_URL");
    if std::env::var("AMQP_URL").is_ok_and(|url| !url.is_empty()) {
        println!("cargo::rustc-cfg=warren_external");
    }
}
