//! `mfr fetch` against a local HTTP server on 127.0.0.1: success, resume after a cut, wrong hash,
//! 404, a server that ignores Range, a stall past the timeout. Nothing half-written or unverified
//! may ever land in the cache.
use meanflow_repro::assets::{cached_path, fetch, Asset, Options, Pin};
use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Clone, Copy)]
enum Behaviour {
    Serve,
    /// The first response stops after this many body bytes; later ones serve normally.
    CutOnceAt(usize),
    IgnoreRange,
    NotFound,
    /// Every response stops after this many bytes and then hangs.
    StallAt(usize),
    /// No length; the body never ends.
    Endless,
}

/// Serves `body` at any path, each connection on its own thread; returns its base URL and the
/// Range headers it was sent. At most `max` connections, then the thread ends.
fn serve(body: Vec<u8>, behaviour: Behaviour, max: usize) -> (String, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let ranges = Arc::new(Mutex::new(Vec::new()));
    let seen = ranges.clone();
    let body = Arc::new(body);
    std::thread::spawn(move || {
        for (i, stream) in listener.incoming().take(max).enumerate() {
            let Ok(stream) = stream else { continue };
            let (seen, body) = (seen.clone(), body.clone());
            std::thread::spawn(move || respond(stream, i, &body, behaviour, &seen));
        }
    });
    (base, ranges)
}

fn respond(
    mut stream: TcpStream,
    i: usize,
    body: &[u8],
    behaviour: Behaviour,
    seen: &Mutex<Vec<String>>,
) {
    let mut request = Vec::new();
    let mut byte = [0u8; 1];
    while !request.ends_with(b"\r\n\r\n") && stream.read(&mut byte).map(|n| n == 1).unwrap_or(false)
    {
        request.push(byte[0]);
    }
    let text = String::from_utf8_lossy(&request).to_lowercase();
    let range = text
        .lines()
        .find_map(|l| l.strip_prefix("range: bytes="))
        .map(|r| r.trim().trim_end_matches('-').to_owned());
    seen.lock().unwrap().push(range.clone().unwrap_or_default());
    if let Behaviour::Endless = behaviour {
        let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n");
        let chunk = vec![0x5au8; 1 << 16];
        while stream.write_all(&chunk).is_ok() {}
        return;
    }
    if let Behaviour::NotFound = behaviour {
        let _ = stream
            .write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        return;
    }
    let start = match (behaviour, &range) {
        (Behaviour::IgnoreRange, _) | (_, None) => 0,
        (_, Some(r)) => r.parse::<usize>().unwrap_or(0),
    };
    let status = if start > 0 {
        "206 Partial Content"
    } else {
        "200 OK"
    };
    let rest = &body[start..];
    let header = format!(
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nContent-Range: bytes {start}-{}/{}\r\nConnection: close\r\n\r\n",
        rest.len(),
        body.len() - 1,
        body.len()
    );
    let _ = stream.write_all(header.as_bytes());
    let _ = match behaviour {
        Behaviour::CutOnceAt(at) if i == 0 => stream.write_all(&rest[..at]),
        Behaviour::StallAt(at) => {
            let sent = stream
                .write_all(&rest[..at.min(rest.len())])
                .and_then(|()| stream.flush());
            std::thread::sleep(Duration::from_secs(2));
            sent
        }
        _ => stream.write_all(rest),
    };
}

fn body() -> Vec<u8> {
    (0..300_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect()
}

fn sha(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn setup(name: &str, base: &str, pin: Pin) -> (Asset, Options, PathBuf) {
    let cache = std::env::temp_dir().join(format!("mfr-fetch-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&cache);
    let asset = Asset {
        name: name.to_owned(),
        url: format!("{base}/files/{name}.bin"),
        file: format!("{name}.bin"),
        size: None,
        pin,
        licence: "test".to_owned(),
        used_by: "tests".to_owned(),
        note: String::new(),
    };
    let mut opts = Options::new(cache.clone());
    opts.mirror = None;
    opts.timeout = Duration::from_millis(500);
    opts.retries = 2;
    opts.backoff = Duration::from_millis(10);
    opts.progress = false;
    (asset, opts, cache)
}

#[test]
fn a_download_lands_only_once_verified_and_is_then_served_offline() {
    let data = body();
    let (base, _) = serve(data.clone(), Behaviour::Serve, 4);
    let (asset, mut opts, _) = setup("ok", &base, Pin::Sha256(sha(&data)));
    let path = fetch(&asset, &opts).unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), data);
    assert!(!path.with_file_name("ok.bin.part").exists());
    opts.offline = true;
    assert_eq!(fetch(&asset, &opts).unwrap(), path);
}

#[test]
fn a_cut_connection_resumes_with_a_range_request() {
    let data = body();
    let (base, ranges) = serve(data.clone(), Behaviour::CutOnceAt(120_000), 4);
    let (asset, opts, _) = setup("cut", &base, Pin::Sha256(sha(&data)));
    let path = fetch(&asset, &opts).unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), data);
    assert_eq!(ranges.lock().unwrap().as_slice(), ["", "120000"]);
}

#[test]
fn a_wrong_hash_is_kept_aside_and_never_used() {
    let data = body();
    let (base, _) = serve(data, Behaviour::Serve, 4);
    let (asset, opts, cache) = setup("bad", &base, Pin::Sha256("00".repeat(32)));
    let err = format!("{:#}", fetch(&asset, &opts).unwrap_err());
    assert!(
        err.contains("kept aside") && err.contains("not used"),
        "{err}"
    );
    assert!(!cached_path(&asset, &cache).exists());
    assert!(cache.join("assets/bad.bin.rejected").exists());
}

#[test]
fn a_404_fails_at_once_and_leaves_nothing() {
    let (base, ranges) = serve(Vec::new(), Behaviour::NotFound, 4);
    let (asset, opts, cache) = setup("missing", &base, Pin::Sha256("00".repeat(32)));
    let err = format!("{:#}", fetch(&asset, &opts).unwrap_err());
    assert!(err.contains("404"), "{err}");
    assert_eq!(ranges.lock().unwrap().len(), 1, "a 404 is not retried");
    assert!(!cached_path(&asset, &cache).exists());
}

#[test]
fn a_server_ignoring_range_restarts_the_file() {
    let data = body();
    let (base, ranges) = serve(data.clone(), Behaviour::IgnoreRange, 4);
    let (asset, opts, cache) = setup("norange", &base, Pin::Sha256(sha(&data)));
    // A previous attempt left a partial file with wrong bytes in it.
    std::fs::create_dir_all(cache.join("assets")).unwrap();
    std::fs::write(cache.join("assets/norange.bin.part"), vec![7u8; 50_000]).unwrap();
    let path = fetch(&asset, &opts).unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), data);
    assert_eq!(ranges.lock().unwrap().as_slice(), ["50000"]);
}

#[test]
fn a_stall_past_the_timeout_is_retried_then_given_up() {
    let data = body();
    let (base, ranges) = serve(data.clone(), Behaviour::StallAt(10_000), 8);
    let (asset, opts, cache) = setup("stall", &base, Pin::Sha256(sha(&data)));
    let started = std::time::Instant::now();
    let err = format!("{:#}", fetch(&asset, &opts).unwrap_err());
    assert!(err.contains("gave up after 3 attempts"), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the timeout did not fire"
    );
    assert_eq!(ranges.lock().unwrap().as_slice(), ["", "10000", "20000"]);
    assert!(!cached_path(&asset, &cache).exists());
    // The partial file is kept to resume from: 3 attempts of 10,000 bytes each.
    assert_eq!(
        std::fs::metadata(cache.join("assets/stall.bin.part"))
            .unwrap()
            .len(),
        30_000
    );
}

#[test]
fn offline_and_unpinned_assets_say_what_to_do() {
    let (asset, mut opts, _) = setup(
        "offline",
        "http://127.0.0.1:9",
        Pin::Sha256("00".repeat(32)),
    );
    opts.offline = true;
    let err = fetch(&asset, &opts).unwrap_err().to_string();
    assert!(err.contains("--offline"), "{err}");
    let (asset, opts, _) = setup("unpinned", "http://127.0.0.1:9", Pin::Unpinned);
    let err = fetch(&asset, &opts).unwrap_err().to_string();
    assert!(err.contains("--sha256"), "{err}");
}

#[test]
fn a_mirror_serves_the_same_file_names() {
    let data = body();
    let (base, _) = serve(data.clone(), Behaviour::Serve, 4);
    let (asset, mut opts, _) = setup("mirrored", "http://127.0.0.1:9", Pin::Sha256(sha(&data)));
    opts.mirror = Some(format!("{base}/mirror/"));
    assert_eq!(std::fs::read(fetch(&asset, &opts).unwrap()).unwrap(), data);
}

#[test]
fn an_endless_body_stops_at_the_assets_size_and_leaves_nothing() {
    let (base, _) = serve(Vec::new(), Behaviour::Endless, 4);
    let (mut asset, opts, cache) = setup("endless", &base, Pin::Sha256("00".repeat(32)));
    asset.size = Some(300_000);
    let err = format!("{:#}", fetch(&asset, &opts).unwrap_err());
    assert!(err.contains("more than the asset's 300000 bytes"), "{err}");
    assert!(!cached_path(&asset, &cache).exists());
    assert!(
        !cache.join("assets/endless.bin.part").exists(),
        "the oversized part is removed"
    );
}

#[test]
fn bad_arguments_are_refused_before_any_traffic() {
    let data = body();
    let (base, ranges) = serve(data, Behaviour::Serve, 4);
    let (asset, mut opts, _) = setup("args", &base, Pin::Unpinned);
    opts.sha256 = Some("nothex".to_owned());
    let err = format!("{:#}", fetch(&asset, &opts).unwrap_err());
    assert!(
        err.contains("--sha256 nothex: expected 64 hex digits"),
        "{err}"
    );
    opts.sha256 = Some("ab".repeat(32));
    for mirror in ["not a url", "ftp://host/x", "http://"] {
        opts.mirror = Some(mirror.to_owned());
        let started = std::time::Instant::now();
        let err = format!("{:#}", fetch(&asset, &opts).unwrap_err());
        assert!(err.contains(&format!("mirror `{mirror}`")), "{err}");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{mirror} was retried"
        );
    }
    assert!(ranges.lock().unwrap().is_empty(), "a request went out");
}

#[test]
fn a_marker_beside_a_wrong_file_is_not_trusted() {
    let data = body();
    let (base, ranges) = serve(data.clone(), Behaviour::Serve, 4);
    let (asset, opts, cache) = setup("marked", &base, Pin::Sha256(sha(&data)));
    // Garbage under the final name, with a marker naming the right hash.
    std::fs::create_dir_all(cache.join("assets")).unwrap();
    let dest = cached_path(&asset, &cache);
    std::fs::write(&dest, b"garbage").unwrap();
    std::fs::write(
        cache.join("assets/marked.bin.sha256"),
        format!("{}  marked.bin\n", sha(&data)),
    )
    .unwrap();
    let path = fetch(&asset, &opts).unwrap();
    assert_eq!(
        std::fs::read(&path).unwrap(),
        data,
        "the garbage was served"
    );
    assert!(cache.join("assets/marked.bin.rejected").exists());
    assert_eq!(ranges.lock().unwrap().len(), 1);
    // Verified now: a second fetch trusts the marker (same size and time), no traffic.
    fetch(&asset, &opts).unwrap();
    assert_eq!(ranges.lock().unwrap().len(), 1);
}
