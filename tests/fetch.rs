//! `mfr fetch` against a local imitation of its servers (tests/common/mirror.rs) on 127.0.0.1:
//! success, resume after a cut, wrong and recorded hashes, 404, a server ignoring Range, a
//! stall, Google Drive's five answers (the file, the interstitial form, the cookie token, the
//! quota page, a sign-in page), HTML and wrong magic where a file belongs, links and FIFOs in the
//! cache, the manifest (shipped, overridden, malformed), and a stop signal during a stall.
//! Nothing half-written, unverified or not the file may ever land in the cache.
#[path = "common/mirror.rs"]
mod mirror;

use meanflow_repro::assets::{
    adopt, cached_path, fetch, listing, recorded, Asset, Format, Manifest, Options, Pin, Served,
    Size,
};
use mirror::{Behaviour, Drive, Mirror};
use sha2::{Digest, Sha256};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

fn temp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("mfr-fetch-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// 300 KB of bytes that start like a zip archive.
fn body() -> Vec<u8> {
    let mut body: Vec<u8> = (0..300_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    body[..4].copy_from_slice(b"PK\x03\x04");
    body
}

fn sha(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A served directory holding `file` = `bytes`, and a cache beside it.
fn site(name: &str, file: &str, bytes: &[u8]) -> (PathBuf, PathBuf) {
    let root = temp(name);
    let served = root.join("served");
    std::fs::create_dir_all(&served).unwrap();
    std::fs::write(served.join(file), bytes).unwrap();
    (served, root.join("cache"))
}

fn asset(name: &str, url: String, pin: Pin) -> Asset {
    Asset {
        name: name.to_owned(),
        served: Served::Http,
        url,
        file: format!("{name}.zip"),
        size: Size::AtMost(1 << 30),
        pin,
        format: Format::Zip,
        licence: "test".to_owned(),
        used_by: "tests".to_owned(),
        purpose: "a test file".to_owned(),
        source: "tests/fetch.rs".to_owned(),
        note: String::new(),
    }
}

fn drive_asset(name: &str, id: &str, url: String, pin: Pin) -> Asset {
    Asset {
        served: Served::GoogleDrive { id: id.to_owned() },
        ..asset(name, url, pin)
    }
}

fn options(cache: &Path) -> Options {
    let mut opts = Options::new(cache.to_owned());
    opts.mirror = None;
    opts.timeout = Duration::from_millis(500);
    opts.retries = 2;
    opts.backoff = Duration::from_millis(10);
    opts.progress = false;
    opts
}

fn ranges(server: &mirror::Server) -> Vec<String> {
    server
        .hits()
        .iter()
        .map(|h| h.range.map_or(String::new(), |r| r.to_string()))
        .collect()
}

/// Nothing of the asset in the cache but what a failure may leave on purpose.
fn assert_nothing_cached(asset: &Asset, cache: &Path) {
    let dest = cached_path(asset, cache);
    assert!(!dest.exists(), "{} was cached", dest.display());
    let part = dest.with_file_name(format!("{}.part", asset.file));
    assert!(!part.exists(), "{} was left", part.display());
}

#[test]
fn a_download_lands_only_once_verified_and_is_then_served_offline() {
    let data = body();
    let (dir, cache) = site("ok", "ok.zip", &data);
    let server = Mirror::new(&dir).start();
    let asset = asset("ok", server.url("ok.zip"), Pin::Sha256(sha(&data)));
    let mut opts = options(&cache);
    let path = fetch(&asset, &opts).unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), data);
    assert!(!path.with_file_name("ok.zip.part").exists());
    opts.offline = true;
    assert_eq!(fetch(&asset, &opts).unwrap(), path);
    assert_eq!(server.hits().len(), 1);
}

#[test]
fn a_cut_connection_resumes_with_a_range_request() {
    let data = body();
    let (dir, cache) = site("cut", "cut.zip", &data);
    let server = Mirror::new(&dir)
        .behaviour("cut.zip", Behaviour::CutOnceAt(120_000))
        .start();
    let asset = asset("cut", server.url("cut.zip"), Pin::Sha256(sha(&data)));
    let path = fetch(&asset, &options(&cache)).unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), data);
    assert_eq!(ranges(&server), ["", "120000"]);
}

#[test]
fn a_wrong_hash_is_kept_aside_and_never_used() {
    let data = body();
    let (dir, cache) = site("bad", "bad.zip", &data);
    let server = Mirror::new(&dir).start();
    let asset = asset("bad", server.url("bad.zip"), Pin::Sha256("00".repeat(32)));
    let err = format!("{:#}", fetch(&asset, &options(&cache)).unwrap_err());
    assert!(
        err.contains("kept aside") && err.contains("not used"),
        "{err}"
    );
    assert!(!cached_path(&asset, &cache).exists());
    assert!(cache.join("assets/bad.zip.rejected").exists());
}

#[test]
fn a_404_fails_at_once_and_leaves_nothing() {
    let (dir, cache) = site("missing", "other.zip", b"x");
    let server = Mirror::new(&dir).start();
    let asset = asset("missing", server.url("missing.zip"), Pin::Record);
    let err = format!("{:#}", fetch(&asset, &options(&cache)).unwrap_err());
    assert!(err.contains("404"), "{err}");
    assert_eq!(server.hits().len(), 1, "a 404 is not retried");
    assert_nothing_cached(&asset, &cache);
}

#[test]
fn a_server_ignoring_range_restarts_the_file() {
    let data = body();
    let (dir, cache) = site("norange", "norange.zip", &data);
    let server = Mirror::new(&dir)
        .behaviour("norange.zip", Behaviour::IgnoreRange)
        .start();
    let asset = asset(
        "norange",
        server.url("norange.zip"),
        Pin::Sha256(sha(&data)),
    );
    // A previous attempt left a partial file with wrong bytes in it.
    std::fs::create_dir_all(cache.join("assets")).unwrap();
    std::fs::write(cache.join("assets/norange.zip.part"), vec![7u8; 50_000]).unwrap();
    let path = fetch(&asset, &options(&cache)).unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), data);
    assert_eq!(ranges(&server), ["50000"]);
}

#[test]
fn a_stall_past_the_timeout_is_retried_then_given_up() {
    let data = body();
    let (dir, cache) = site("stall", "stall.zip", &data);
    let server = Mirror::new(&dir)
        .behaviour("stall.zip", Behaviour::StallAt(10_000))
        .start();
    let asset = asset("stall", server.url("stall.zip"), Pin::Sha256(sha(&data)));
    let started = Instant::now();
    let err = format!("{:#}", fetch(&asset, &options(&cache)).unwrap_err());
    assert!(err.contains("gave up after 3 attempts"), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the timeout did not fire"
    );
    assert_eq!(ranges(&server), ["", "10000", "20000"]);
    assert!(!cached_path(&asset, &cache).exists());
    // The partial file is kept to resume from: 3 attempts of 10,000 bytes each.
    let part = cache.join("assets/stall.zip.part");
    assert_eq!(std::fs::metadata(part).unwrap().len(), 30_000);
}

#[test]
fn offline_says_what_to_do() {
    let cache = temp("offline").join("cache");
    let asset = asset("offline", "http://127.0.0.1:9/x".to_owned(), Pin::Record);
    let mut opts = options(&cache);
    opts.offline = true;
    let err = fetch(&asset, &opts).unwrap_err().to_string();
    assert!(
        err.contains("--offline") && err.contains("offline.zip"),
        "{err}"
    );
}

#[test]
fn a_mirror_serves_the_same_file_names() {
    let data = body();
    let (dir, cache) = site("mirrored", "mirrored.zip", &data);
    let server = Mirror::new(&dir).start();
    let asset = drive_asset(
        "mirrored",
        "1AbCdEfGhIjKlMn",
        "http://127.0.0.1:9/uc".to_owned(),
        Pin::Sha256(sha(&data)),
    );
    let mut opts = options(&cache);
    opts.mirror = Some(format!("{}/", server.base));
    assert_eq!(std::fs::read(fetch(&asset, &opts).unwrap()).unwrap(), data);
    assert_eq!(server.hits()[0].target, "/mirrored.zip");
}

#[test]
fn an_endless_body_stops_at_the_assets_size_and_leaves_nothing() {
    let (dir, cache) = site("endless", "endless.zip", b"PK\x03\x04");
    let server = Mirror::new(&dir)
        .behaviour("endless.zip", Behaviour::Endless)
        .start();
    let mut asset = asset("endless", server.url("endless.zip"), Pin::Record);
    asset.format = Format::Any;
    asset.size = Size::AtMost(300_000);
    let err = format!("{:#}", fetch(&asset, &options(&cache)).unwrap_err());
    assert!(err.contains("more than the asset's 300000 bytes"), "{err}");
    assert_nothing_cached(&asset, &cache);
}

#[test]
fn bad_arguments_are_refused_before_any_traffic() {
    let data = body();
    let (dir, cache) = site("args", "args.zip", &data);
    let server = Mirror::new(&dir).start();
    let asset = asset("args", server.url("args.zip"), Pin::Record);
    let mut opts = options(&cache);
    opts.sha256 = Some("nothex".to_owned());
    let err = format!("{:#}", fetch(&asset, &opts).unwrap_err());
    assert!(
        err.contains("--sha256 nothex: expected 64 hex digits"),
        "{err}"
    );
    opts.sha256 = Some("ab".repeat(32));
    for mirror in ["not a url", "ftp://host/x", "http://"] {
        opts.mirror = Some(mirror.to_owned());
        let started = Instant::now();
        let err = format!("{:#}", fetch(&asset, &opts).unwrap_err());
        assert!(err.contains(&format!("mirror `{mirror}`")), "{err}");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{mirror} was retried"
        );
    }
    assert!(server.hits().is_empty(), "a request went out");
}

#[test]
fn a_marker_beside_a_wrong_file_is_not_trusted() {
    let data = body();
    let (dir, cache) = site("marked", "marked.zip", &data);
    let server = Mirror::new(&dir).start();
    let asset = asset("marked", server.url("marked.zip"), Pin::Sha256(sha(&data)));
    // Garbage under the final name, with a marker naming the right hash.
    std::fs::create_dir_all(cache.join("assets")).unwrap();
    let dest = cached_path(&asset, &cache);
    std::fs::write(&dest, b"garbage").unwrap();
    std::fs::write(
        cache.join("assets/marked.zip.sha256"),
        format!("{}  marked.zip\n", sha(&data)),
    )
    .unwrap();
    let opts = options(&cache);
    let path = fetch(&asset, &opts).unwrap();
    assert_eq!(
        std::fs::read(&path).unwrap(),
        data,
        "the garbage was served"
    );
    assert!(cache.join("assets/marked.zip.rejected").exists());
    assert_eq!(server.hits().len(), 1);
    // Verified now: a second fetch trusts the marker (same size and time), no traffic.
    fetch(&asset, &opts).unwrap();
    assert_eq!(server.hits().len(), 1);
}

// Google Drive's five answers.

const ID: &str = "1AbCdEfGhIjKlMnOpQ";

/// Fetches `data` through the Drive imitation answering as `mode`.
fn through_drive(
    name: &str,
    mode: Drive,
    data: &[u8],
) -> (anyhow::Result<PathBuf>, Asset, PathBuf, mirror::Server) {
    let (dir, cache) = site(name, "ckpt.zip", data);
    let server = Mirror::new(&dir).drive(ID, "ckpt.zip", mode).start();
    let asset = drive_asset(name, ID, server.drive_url(ID), Pin::Sha256(sha(data)));
    let got = fetch(&asset, &options(&cache));
    (got, asset, cache, server)
}

#[test]
fn drive_answering_the_file_directly_is_fetched_and_verified() {
    let data = body();
    let (got, _, _, server) = through_drive("drive-file", Drive::File, &data);
    assert_eq!(std::fs::read(got.unwrap()).unwrap(), data);
    assert_eq!(server.hits().len(), 1);
}

#[test]
fn drive_interstitial_form_is_submitted_with_its_hidden_inputs() {
    let data = body();
    let (got, _, _, server) = through_drive("drive-form", Drive::Form, &data);
    assert_eq!(std::fs::read(got.unwrap()).unwrap(), data);
    let targets: Vec<String> = server.hits().into_iter().map(|h| h.target).collect();
    assert_eq!(
        targets,
        [
            format!("/uc?export=download&id={ID}"),
            format!("/download?id={ID}&export=download&confirm=t&uuid=6f1c0c3e-imitation")
        ]
    );
}

#[test]
fn drive_cookie_token_is_sent_back_as_confirm() {
    let data = body();
    let (got, _, _, server) = through_drive("drive-cookie", Drive::Cookie, &data);
    assert_eq!(std::fs::read(got.unwrap()).unwrap(), data);
    let hits = server.hits();
    assert_eq!(hits.len(), 2);
    assert_eq!(
        hits[1].target,
        format!("/uc?export=download&id={ID}&confirm=Xq7-tok")
    );
    assert_eq!(
        hits[1].cookie.as_deref(),
        Some(format!("download_warning_13058876669334088843_{ID}=Xq7-tok").as_str())
    );
}

#[test]
fn drive_quota_page_is_one_clear_error_and_nothing_is_cached() {
    let (got, asset, cache, server) = through_drive("drive-quota", Drive::Quota, &body());
    let err = format!("{:#}", got.unwrap_err());
    assert!(err.contains("drive-quota"), "the asset is named: {err}");
    assert!(
        err.contains("quota is exceeded") && err.contains("Too many users"),
        "{err}"
    );
    assert!(
        err.contains(&format!("https://drive.google.com/file/d/{ID}/view")),
        "{err}"
    );
    assert!(err.contains("mfr fetch drive-quota --file PATH"), "{err}");
    assert_eq!(server.hits().len(), 1, "a refusal is not retried");
    assert_nothing_cached(&asset, &cache);
}

#[test]
fn drive_sign_in_page_is_one_clear_error_and_nothing_is_cached() {
    let (got, asset, cache, _) = through_drive("drive-signin", Drive::SignIn, &body());
    let err = format!("{:#}", got.unwrap_err());
    assert!(
        err.contains("drive-signin") && err.contains("sign in"),
        "{err}"
    );
    assert!(err.contains("not shared"), "{err}");
    assert_nothing_cached(&asset, &cache);
}

#[test]
fn a_cut_drive_download_resumes_through_the_interstitial() {
    let data = body();
    let (dir, cache) = site("drive-cut", "ckpt.zip", &data);
    let server = Mirror::new(&dir)
        .drive(ID, "ckpt.zip", Drive::Form)
        .behaviour("ckpt.zip", Behaviour::CutOnceAt(100_000))
        .start();
    let asset = drive_asset(
        "drive-cut",
        ID,
        server.drive_url(ID),
        Pin::Sha256(sha(&data)),
    );
    assert_eq!(
        std::fs::read(fetch(&asset, &options(&cache)).unwrap()).unwrap(),
        data
    );
    let resumed: Vec<Option<u64>> = server
        .hits()
        .iter()
        .filter(|h| h.target.starts_with("/download"))
        .map(|h| h.range)
        .collect();
    assert_eq!(resumed, [None, Some(100_000)]);
}

#[test]
fn an_html_page_from_a_plain_server_is_never_saved() {
    let page = b"<!DOCTYPE html><html><head><title>Portal login</title></head></html>";
    let (dir, cache) = site("portal", "portal.zip", page);
    let server = Mirror::new(&dir).start();
    let mut asset = asset("portal", server.url("portal.zip"), Pin::Record);
    asset.format = Format::Any;
    let err = format!("{:#}", fetch(&asset, &options(&cache)).unwrap_err());
    assert!(
        err.contains("HTML page") && err.contains("Portal login"),
        "{err}"
    );
    assert_nothing_cached(&asset, &cache);
    assert!(
        recorded(&asset, &cache).is_none(),
        "an HTML page's hash was recorded"
    );
}

#[test]
fn a_file_that_does_not_start_like_its_format_is_refused() {
    let (dir, cache) = site("magic", "magic.zip", &[0u8; 5000]);
    let server = Mirror::new(&dir).start();
    let asset = asset("magic", server.url("magic.zip"), Pin::Record);
    let err = format!("{:#}", fetch(&asset, &options(&cache)).unwrap_err());
    assert!(err.contains("not a zip file"), "{err}");
    assert_nothing_cached(&asset, &cache);
}

#[test]
fn the_first_download_is_recorded_and_a_differing_one_refused() {
    let first = body();
    let (dir, cache) = site("record", "record.zip", &first);
    let server = Mirror::new(&dir).start();
    let asset = asset("record", server.url("record.zip"), Pin::Record);
    let opts = options(&cache);
    fetch(&asset, &opts).unwrap();
    assert_eq!(recorded(&asset, &cache), Some(sha(&first)));
    let manifest = Manifest {
        assets: vec![asset.clone()],
    };
    assert!(listing(&manifest, &cache).contains(&format!("{} (recorded)", sha(&first))));
    // Upstream changes the file; the cached copy is lost; the next download differs.
    let mut second = first.clone();
    second[1000] ^= 1;
    std::fs::write(dir.join("record.zip"), &second).unwrap();
    std::fs::remove_file(cached_path(&asset, &cache)).unwrap();
    let err = format!("{:#}", fetch(&asset, &opts).unwrap_err());
    assert!(
        err.contains(&sha(&first)) && err.contains(&sha(&second)),
        "{err}"
    );
    assert!(err.contains("recorded-sha256"), "{err}");
    assert!(!cached_path(&asset, &cache).exists());
    assert!(cache.join("assets/record.zip.rejected").exists());
    assert_eq!(
        recorded(&asset, &cache),
        Some(sha(&first)),
        "the record moved"
    );
}

#[test]
fn a_symlinked_part_is_refused_and_its_target_left_alone() {
    let data = body();
    let (dir, cache) = site("symlink", "symlink.zip", &data);
    let server = Mirror::new(&dir).start();
    let asset = asset(
        "symlink",
        server.url("symlink.zip"),
        Pin::Sha256(sha(&data)),
    );
    let victim = cache.parent().unwrap().join("victim.txt");
    std::fs::write(&victim, b"precious").unwrap();
    std::fs::create_dir_all(cache.join("assets")).unwrap();
    std::os::unix::fs::symlink(&victim, cache.join("assets/symlink.zip.part")).unwrap();
    let err = format!("{:#}", fetch(&asset, &options(&cache)).unwrap_err());
    assert!(err.contains("symlink.zip.part is a symbolic link"), "{err}");
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    assert!(server.hits().is_empty());
}

/// Makes a FIFO at `path`.
fn mkfifo(path: &Path) {
    let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo on a NUL-terminated path this test owns.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
}

#[test]
fn a_fifo_in_the_cache_is_refused_without_hanging() {
    let data = body();
    let (dir, cache) = site("fifo", "fifo.zip", &data);
    let server = Mirror::new(&dir).start();
    let asset = asset("fifo", server.url("fifo.zip"), Pin::Sha256(sha(&data)));
    std::fs::create_dir_all(cache.join("assets")).unwrap();
    // Under the cached file's name (hashing it would block for ever), then beside it.
    for (fifo, expected) in [
        ("fifo.zip", "fifo.zip is a FIFO"),
        ("fifo.zip.part", "fifo.zip.part is a FIFO"),
    ] {
        let path = cache.join("assets").join(fifo);
        mkfifo(&path);
        let (tx, rx) = std::sync::mpsc::channel();
        let (asset, opts) = (asset.clone(), options(&cache));
        std::thread::spawn(move || tx.send(format!("{:?}", fetch(&asset, &opts))));
        let got = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("the fetch hung on a FIFO");
        assert!(got.contains(expected), "{got}");
        std::fs::remove_file(path).unwrap();
    }
    assert!(server.hits().is_empty());
}

#[test]
fn a_file_downloaded_by_hand_is_checked_and_copied_in() {
    let data = body();
    let root = temp("adopt");
    let cache = root.join("cache");
    let file = root.join("Downloads-ckpt.zip");
    std::fs::write(&file, &data).unwrap();
    let asset = drive_asset(
        "adopt",
        ID,
        "http://127.0.0.1:9/uc".to_owned(),
        Pin::Sha256(sha(&data)),
    );
    let path = adopt(&asset, &file, &options(&cache)).unwrap();
    assert_eq!(std::fs::read(path).unwrap(), data);
    assert!(file.exists(), "the user's file is left where it was");
    std::fs::write(&file, b"PK\x03\x04 something else").unwrap();
    let other = Asset {
        name: "adopt2".to_owned(),
        file: "adopt2.zip".to_owned(),
        ..asset
    };
    let err = format!("{:#}", adopt(&other, &file, &options(&cache)).unwrap_err());
    assert!(err.contains("kept aside"), "{err}");
    assert!(!cached_path(&other, &cache).exists());
}

// The manifest.

#[test]
fn the_shipped_manifest_lists_every_public_artifact() {
    let manifest = Manifest::shipped().unwrap();
    let names: Vec<&str> = manifest.assets.iter().map(|a| a.name.as_str()).collect();
    for name in [
        "VIRTUAL_imagenet256_labeled",
        "pt_inception",
        "sd-vae-ft-mse",
        "sd-vae-ft-ema",
        "meanflow-b4-jax",
        "meanflow-b4-jax-fid-stats",
        "meanflow-b4-pth",
        "imf-b2",
        "imf-m2",
        "imf-l2",
        "imf-xl2",
        "imf-b2-full",
        "imf-xl2-full",
        "imf-fid-stats",
        "imf-fid-stats-torch",
    ] {
        assert!(names.contains(&name), "{name} is missing from {names:?}");
    }
    let drive = manifest.find("meanflow-b4-jax").unwrap();
    assert_eq!(
        drive.served,
        Served::GoogleDrive {
            id: "19MR1WLycyqc627gsOJF4yzR4ZkU8fvOu".to_owned()
        }
    );
    assert_eq!(
        drive.url,
        "https://drive.google.com/uc?export=download&id=19MR1WLycyqc627gsOJF4yzR4ZkU8fvOu"
    );
    // The SD-VAE files are pinned to a Hugging Face commit, not to a branch.
    for vae in ["sd-vae-ft-mse", "sd-vae-ft-ema"] {
        let url = &manifest.find(vae).unwrap().url;
        let revision = url
            .split("/resolve/")
            .nth(1)
            .unwrap()
            .split('/')
            .next()
            .unwrap();
        assert!(
            revision.len() == 40 && revision.bytes().all(|b| b.is_ascii_hexdigit()),
            "{url}"
        );
    }
}

fn entry(name: &str, extra: &str) -> String {
    format!(
        "[[asset]]\nname = \"{name}\"\nserved = \"http\"\nurl = \"http://127.0.0.1:9/{name}.zip\"\nfile = \"{name}.zip\"\n\
         max_size = 1000\nsha256 = \"record\"\nformat = \"zip\"\nlicence = \"test\"\nused_by = \"tests\"\n\
         purpose = \"a test file\"\nsource = \"tests/fetch.rs\"\n{extra}"
    )
}

#[test]
fn mfr_manifest_adds_entries_and_overrides_keys_of_shipped_ones() {
    let root = temp("override");
    let path = root.join("site.toml");
    let text = entry("stand-in", "") + "\n[[asset]]\nname = \"sd-vae-ft-mse\"\nurl = \"https://mirror.example/vae/sd-vae-ft-mse.safetensors\"\n";
    std::fs::write(&path, text).unwrap();
    let manifest = Manifest::with_overrides(&path).unwrap();
    let shipped = Manifest::shipped().unwrap();
    assert_eq!(manifest.assets.len(), shipped.assets.len() + 1);
    assert_eq!(manifest.find("stand-in").unwrap().pin, Pin::Record);
    let vae = manifest.find("sd-vae-ft-mse").unwrap();
    assert_eq!(
        vae.url,
        "https://mirror.example/vae/sd-vae-ft-mse.safetensors"
    );
    // A new url keeps the pin: a mirror cannot change what the file must be.
    assert_eq!(vae.pin, shipped.find("sd-vae-ft-mse").unwrap().pin);
}

#[test]
fn a_malformed_or_unknown_key_manifest_is_one_sentence_naming_file_and_key() {
    let root = temp("malformed");
    let cases = [
        (entry("x", "sha = \"0\"\n"), "unknown field `sha`"),
        ("[[asset]\nname = 3\n".to_owned(), "invalid TOML"),
        (
            entry("x", "").replace("max_size = 1000\n", ""),
            "`size` or `max_size`",
        ),
        (
            entry("x", "").replace("\"record\"", "\"abc\""),
            "`sha256` must be 64 hex digits",
        ),
        (entry("../x", ""), "`name` \"../x\" is not a plain name"),
        (
            entry("x", "").replace("file = \"x.zip\"", "file = \"x.part\""),
            "`file` ends with `.part`",
        ),
        (
            entry("x", "").replace("http://127.0.0.1:9", "file:///etc"),
            "`url`",
        ),
        (entry("x", "") + "\n" + &entry("x", ""), "listed twice"),
        (
            entry("x", "").replace("purpose = \"a test file\"", "purpose = \"a\\u001b[31m\""),
            "`purpose` must be one line",
        ),
    ];
    for (i, (text, expected)) in cases.iter().enumerate() {
        let path = root.join(format!("bad-{i}.toml"));
        std::fs::write(&path, text).unwrap();
        let err = format!("{:#}", Manifest::with_overrides(&path).unwrap_err());
        assert!(
            err.contains(&path.display().to_string()),
            "the file is named: {err}"
        );
        assert!(
            err.contains(expected),
            "case {i}: expected {expected:?} in {err}"
        );
        assert!(!err.contains('\n'), "one line: {err}");
    }
}

// A stop signal during a stall, through the binary as a user runs it.

#[test]
fn sigterm_stops_a_stalled_download_within_seconds_and_keeps_the_part() {
    let data = body();
    let (dir, cache) = site("sigterm", "stalled.zip", &data);
    let server = Mirror::new(&dir)
        .behaviour("stalled.zip", Behaviour::StallAt(10_000))
        .start();
    let manifest = dir.parent().unwrap().join("site.toml");
    let text = entry("stalled", "")
        .replace("http://127.0.0.1:9", &server.base)
        .replace("max_size = 1000", "max_size = 1000000");
    std::fs::write(&manifest, text).unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_mfr"))
        .args(["fetch", "stalled"])
        .env("MFR_MANIFEST", &manifest)
        .env("MFR_CACHE", &cache)
        .env_remove("MFR_MIRROR")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let part = cache.join("assets/stalled.zip.part");
    let started = Instant::now();
    while std::fs::metadata(&part).map_or(0, |m| m.len()) < 10_000 {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no bytes arrived"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The server now hangs (for 30 s; the default read timeout is 60 s).
    std::thread::sleep(Duration::from_millis(300));
    let signalled = Instant::now();
    // SAFETY: kill() on a child this test spawned and has not reaped.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            signalled.elapsed() < Duration::from_secs(10),
            "still running 10 s after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    // The fetcher sees the flag within 0.1 s; the rest is the process ending (libtorch's
    // libraries take about a second to unload on this 2-core machine). Before, the stall held
    // it for the 60 s read timeout.
    assert!(
        signalled.elapsed() < Duration::from_secs(3),
        "took {:?}",
        signalled.elapsed()
    );
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert_eq!(out.code(), Some(143), "{stderr}");
    assert!(out.signal().is_none());
    assert!(stderr.contains("stopped by SIGTERM"), "{stderr}");
    assert_eq!(
        std::fs::metadata(&part).unwrap().len(),
        10_000,
        "the part is kept to resume"
    );
}
