//! Links the `mfr` binary and the tests against the libtorch that torch-sys found, and compiles the
//! small C++ shim (csrc/shim.cpp) for what tch 0.24 does not bind, and the data-parallel shim
//! (csrc/dist.cpp: Gloo; csrc/dist_nccl.cpp: NCCL, when the CUDA and NCCL headers are found).
use std::env;
use std::path::{Path, PathBuf};

fn main() {
    for file in [
        "csrc/shim.cpp",
        "csrc/op_profile.cpp",
        "csrc/cuda_graph.cpp",
        "csrc/c_abi.hpp",
        "csrc/dist.cpp",
        "csrc/dist_nccl.cpp",
        "csrc/gloo_decls.hpp",
    ] {
        println!("cargo:rerun-if-changed={file}");
    }
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
    torch_cpp(&root, &abi)
        .file("csrc/shim.cpp")
        .file("csrc/op_profile.cpp")
        .compile("mfr_shim");

    // torch's ProcessGroupGloo.hpp includes Gloo headers the wheel does not ship: point those
    // include paths at our declarations of the few names it uses (csrc/gloo_decls.hpp).
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let decls = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets it"))
        .join("csrc/gloo_decls.hpp");
    let gloo = out.join("gloo-decls");
    for header in [
        "algorithm.h",
        "common/error.h",
        "context.h",
        "rendezvous/store.h",
        "transport/device.h",
    ] {
        let path = gloo.join("gloo").join(header);
        std::fs::create_dir_all(path.parent().expect("a parent")).expect("OUT_DIR is writable");
        std::fs::write(
            &path,
            format!("#pragma once\n#include \"{}\"\n", decls.display()),
        )
        .expect("OUT_DIR is writable");
    }
    // NCCL for a libtorch with CUDA whose headers we find; none for a CPU-only libtorch.
    let nccl = if lib.join("libtorch_cuda.so").exists() {
        match nccl_includes(&root) {
            Ok(dirs) => Some(dirs),
            Err(_) if env::var_os("MFR_NO_NCCL").is_some() => None,
            Err(why) => {
                println!("cargo:warning=NCCL and CUDA graphs not built in ({why}): several processes cannot train on CUDA with this build, nor train.cuda_graph; `make build` installs the headers, or set CUDA_HOME (MFR_NO_NCCL=1 silences this)");
                None
            }
        }
    } else {
        None
    };
    let mut dist = torch_cpp(&root, &abi);
    dist.include(&gloo)
        .define("USE_C10D_GLOO", None)
        .flag_if_supported("-Wno-interference-size")
        .file("csrc/dist.cpp");
    if let Some(dirs) = &nccl {
        dist.define("MFR_WITH_NCCL", None)
            .define("USE_C10D_NCCL", None)
            .define("USE_CUDA", None)
            .includes(dirs)
            .file("csrc/dist_nccl.cpp");
    }
    dist.compile("mfr_dist");
    // CUDA graphs of the training step, with the same CUDA headers (a stub without them).
    let mut graph = torch_cpp(&root, &abi);
    graph.file("csrc/cuda_graph.cpp");
    if let Some(dirs) = &nccl {
        graph
            .define("MFR_WITH_CUDA", None)
            .define("USE_CUDA", None)
            .includes(dirs);
    }
    graph.compile("mfr_cuda_graph");
    println!("cargo:rustc-link-lib=dylib=c10");
    println!("cargo:rustc-link-lib=dylib=torch_cpu");
    if nccl.is_some() {
        println!("cargo:rustc-link-lib=dylib=c10_cuda");
        println!("cargo:rustc-link-lib=dylib=torch_cuda");
    }
}

/// A C++ build against libtorch's headers, as libtorch itself was built: C++17, its C++ ABI, and
/// NDEBUG (some of its classes, RecordFunction among them, have debug-only members: without it
/// our view of their layout would differ).
fn torch_cpp(root: &Path, abi: &str) -> cc::Build {
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .pic(true)
        .std("c++17")
        .warnings(false)
        .include(root.join("include"))
        .include(root.join("include/torch/csrc/api/include"))
        .define("_GLIBCXX_USE_CXX11_ABI", abi)
        .define("NDEBUG", None);
    build
}

/// The include directories ProcessGroupNCCL.hpp needs (CUDA runtime and libraries, CCCL's
/// nv/target, the CUDA C runtime's crt/, NCCL), or what is missing. Looked for in
/// $MFR_CUDA_INCLUDE, the headers `make` installs into .cuda-headers, the wheels beside
/// torch's (site-packages/nvidia/...), $CUDA_HOME, $CUDA_PATH, /usr/local/cuda and $NCCL_HOME.
fn nccl_includes(torch_root: &Path) -> Result<Vec<PathBuf>, String> {
    for var in [
        "MFR_CUDA_INCLUDE",
        "CUDA_HOME",
        "CUDA_PATH",
        "NCCL_HOME",
        "MFR_NO_NCCL",
    ] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    if env::var_os("MFR_NO_NCCL").is_some() {
        return Err("MFR_NO_NCCL is set".to_owned());
    }
    let mut dirs: Vec<PathBuf> = env::var("MFR_CUDA_INCLUDE")
        .map(|v| {
            v.split(':')
                .filter(|s| !s.is_empty())
                .map(PathBuf::from)
                .collect()
        })
        .unwrap_or_default();
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    // `make` unpacks them there (then writes .ready); a later unpack rebuilds with NCCL.
    if manifest.join(".cuda-headers/.ready").exists() {
        println!("cargo:rerun-if-changed=.cuda-headers/.ready");
    }
    dirs.push(manifest.join(".cuda-headers/nvidia/cu13/include"));
    if let Some(site) = torch_root.parent() {
        dirs.push(site.join("nvidia/cu13/include"));
        dirs.push(site.join("nvidia/nccl/include"));
    }
    for var in ["CUDA_HOME", "CUDA_PATH", "NCCL_HOME"] {
        if let Some(v) = env::var_os(var) {
            dirs.push(PathBuf::from(v).join("include"));
        }
    }
    dirs.push(PathBuf::from("/usr/local/cuda/include"));
    dirs.retain(|d| d.is_dir());
    let missing: Vec<&str> = [
        "cuda_runtime_api.h",
        "crt/host_config.h",
        "nv/target",
        "cublas_v2.h",
        "cusparse.h",
        "cusolverDn.h",
        "nccl.h",
    ]
    .into_iter()
    .filter(|h| {
        !dirs.iter().any(|d| d.join(h).exists()) && !Path::new("/usr/include").join(h).exists()
    })
    .collect();
    if missing.is_empty() {
        Ok(dirs)
    } else {
        Err(format!("no {} found", missing.join(", ")))
    }
}
