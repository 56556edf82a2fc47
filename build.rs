//! Links the `mfr` binary and the tests against the libtorch that torch-sys found, and compiles the
//! small C++ shim (csrc/shim.cpp) for what tch 0.24 does not bind.
use std::env;
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=csrc/shim.cpp");
    // The code commit recorded in every run directory's env.json.
    println!("cargo:rerun-if-changed=.git/HEAD");
    println!("cargo:rerun-if-changed=.git/index");
    let commit = std::process::Command::new("git")
        .args(["describe", "--always", "--dirty", "--abbrev=12"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|| "unknown".to_owned());
    println!("cargo:rustc-env=MFR_GIT_COMMIT={commit}");
    // torch-sys (links = "tch") publishes the libtorch it linked as DEP_TCH_LIBTORCH_LIB.
    let lib = PathBuf::from(env::var("DEP_TCH_LIBTORCH_LIB").expect(
        "torch-sys did not report a libtorch: build with `make` (it sets LIBTORCH_USE_PYTORCH=1)",
    ));
    let root = lib
        .parent()
        .expect("libtorch lib dir has a parent")
        .to_path_buf();

    // `mfr` runs without LD_LIBRARY_PATH: the libtorch it was built against is on its rpath.
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    // tch 0.24 names torch_cuda but the linker's --as-needed drops it (no symbol is used directly),
    // and CUDA then silently reports unavailable. Keep it.
    if lib.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }

    let abi = env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".to_owned());
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    cc::Build::new()
        .cpp(true)
        .pic(true)
        .std("c++17")
        .warnings(false)
        .include(root.join("include"))
        .include(root.join("include/torch/csrc/api/include"))
        .define("_GLIBCXX_USE_CXX11_ABI", abi.as_str())
        .file("csrc/shim.cpp")
        .compile("mfr_shim");
    println!("cargo:rustc-link-lib=dylib=c10");
    println!("cargo:rustc-link-lib=dylib=torch_cpu");
}
