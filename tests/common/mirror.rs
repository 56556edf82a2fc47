//! A local imitation of the servers `mfr fetch` downloads from, on 127.0.0.1 in the test
//! process: a directory of files served plainly at `/<file>` (what a --mirror serves), some of
//! them also behind Google Drive's answers at `/uc?export=download&id=<id>` (the file directly,
//! the virus-scan interstitial's form, the older cookie token, the quota-exceeded page, a
//! sign-in redirect), each file with a way of misbehaving (a cut, a stall, an endless body, a
//! server ignoring Range). Every request is logged. Use it as
//!
//! ```ignore
//! let server = Mirror::new(&dir).drive("1AbCdEfGhIjK", "ckpt.zip", Drive::Form).start();
//! // manifest url = server.drive_url("1AbCdEfGhIjK"), or --mirror server.base
//! ```
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How Google Drive answers the direct link of a file.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Drive {
    /// The file, at once (a small file).
    File,
    /// "Google Drive can't scan this file for viruses": a form whose submission gets the file.
    Form,
    /// An HTML page and a `download_warning_*` cookie; `confirm=<token>` gets the file.
    Cookie,
    /// "Too many users have viewed or downloaded this file recently."
    Quota,
    /// A redirect to a sign-in page (the file is not shared publicly).
    SignIn,
}

/// How a file's bytes are served.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Behaviour {
    Serve,
    /// The first answer stops after this many body bytes; later ones serve normally.
    CutOnceAt(usize),
    /// Every answer is the whole file with 200, whatever Range asks.
    IgnoreRange,
    /// Every answer stops after this many bytes, then the connection hangs for `STALL`.
    StallAt(usize),
    /// No length, and the body never ends.
    Endless,
}

/// How long a stalled answer hangs before its connection closes.
pub const STALL: Duration = Duration::from_secs(30);

/// One request the server received.
#[derive(Clone, Debug)]
pub struct Hit {
    /// The request target: path and query.
    pub target: String,
    /// The first byte a Range header asked for.
    pub range: Option<u64>,
    pub cookie: Option<String>,
}

pub struct Mirror {
    dir: PathBuf,
    behaviours: BTreeMap<String, Behaviour>,
    drive: BTreeMap<String, (String, Drive)>,
}

pub struct Server {
    /// `http://127.0.0.1:<port>`: files are at `<base>/<file>`.
    pub base: String,
    hits: Arc<Mutex<Vec<Hit>>>,
}

struct State {
    mirror: Mirror,
    base: String,
    hits: Arc<Mutex<Vec<Hit>>>,
    /// Answers served per file so far (a cut happens on the first only).
    served: Mutex<BTreeMap<String, usize>>,
}

const TOKEN: &str = "Xq7-tok";
const UUID: &str = "6f1c0c3e-imitation";

impl Mirror {
    /// Serves the files of `dir` (read at each request, so they may change).
    pub fn new(dir: &Path) -> Mirror {
        Mirror {
            dir: dir.to_owned(),
            behaviours: BTreeMap::new(),
            drive: BTreeMap::new(),
        }
    }

    pub fn behaviour(mut self, file: &str, behaviour: Behaviour) -> Mirror {
        self.behaviours.insert(file.to_owned(), behaviour);
        self
    }

    /// Puts `file` behind Google Drive's id `id`, answering as `drive` says.
    pub fn drive(mut self, id: &str, file: &str, drive: Drive) -> Mirror {
        self.drive.insert(id.to_owned(), (file.to_owned(), drive));
        self
    }

    pub fn start(self) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let hits = Arc::new(Mutex::new(Vec::new()));
        let state = Arc::new(State {
            mirror: self,
            base: base.clone(),
            hits: hits.clone(),
            served: Mutex::new(BTreeMap::new()),
        });
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let state = state.clone();
                std::thread::spawn(move || answer(stream, &state));
            }
        });
        Server { base, hits }
    }
}

impl Server {
    pub fn url(&self, file: &str) -> String {
        format!("{}/{file}", self.base)
    }

    /// What a manifest entry's url is for a Drive id served here.
    pub fn drive_url(&self, id: &str) -> String {
        format!("{}/uc?export=download&id={id}", self.base)
    }

    pub fn hits(&self) -> Vec<Hit> {
        self.hits.lock().unwrap().clone()
    }
}

fn answer(mut stream: TcpStream, state: &State) {
    let mut request = Vec::new();
    let mut byte = [0u8; 1];
    while !request.ends_with(b"\r\n\r\n") && stream.read(&mut byte).map(|n| n == 1).unwrap_or(false)
    {
        request.push(byte[0]);
    }
    let text = String::from_utf8_lossy(&request).into_owned();
    let target = text.split_whitespace().nth(1).unwrap_or("/").to_owned();
    let header = |name: &str| {
        text.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_owned())
        })
    };
    let range = header("range")
        .and_then(|r| {
            r.strip_prefix("bytes=")
                .map(|r| r.trim_end_matches('-').to_owned())
        })
        .and_then(|r| r.parse::<u64>().ok());
    let cookie = header("cookie");
    state.hits.lock().unwrap().push(Hit {
        target: target.clone(),
        range,
        cookie: cookie.clone(),
    });
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    let params: BTreeMap<&str, &str> = query.split('&').filter_map(|p| p.split_once('=')).collect();
    let id = params.get("id").copied().unwrap_or_default();
    let drive = state.mirror.drive.get(id).cloned();
    match (path, drive) {
        ("/uc", Some((file, mode))) => drive_answer(&mut stream, state, &file, mode, &params, range),
        ("/download", Some((file, Drive::Form)))
            if params.get("confirm") == Some(&"t") && params.get("uuid") == Some(&UUID) =>
        {
            send_file(&mut stream, state, &file, range)
        }
        ("/ServiceLogin", _) => html(
            &mut stream,
            "200 OK",
            "",
            "<!DOCTYPE html><html><head><title>Sign in - Google Accounts</title></head><body>Sign in to continue to Google Drive</body></html>",
        ),
        (path, _) => {
            let file = path.trim_start_matches('/').rsplit('/').next().unwrap_or_default();
            send_file(&mut stream, state, file, range)
        }
    }
}

/// Google Drive's answer to its direct link (and to the confirmations it asks for).
fn drive_answer(
    stream: &mut TcpStream,
    state: &State,
    file: &str,
    mode: Drive,
    params: &BTreeMap<&str, &str>,
    range: Option<u64>,
) {
    let id = params.get("id").copied().unwrap_or_default();
    match mode {
        Drive::File => send_file(stream, state, file, range),
        Drive::Form => {
            let page = format!(
                "<!DOCTYPE html><html><head><title>Google Drive - Virus scan warning</title></head><body>\
                 <p class=\"uc-warning-caption\">Google Drive can't scan this file for viruses.</p>\
                 <form id=\"download-form\" action=\"{}/download\" method=\"get\">\
                 <input type=\"submit\" id=\"uc-download-link\" value=\"Download anyway\"/>\
                 <input type=\"hidden\" name=\"id\" value=\"{id}\">\
                 <input type=\"hidden\" name=\"export\" value=\"download\">\
                 <input type=\"hidden\" name=\"confirm\" value=\"t\">\
                 <input type=\"hidden\" name=\"uuid\" value=\"{UUID}\"></form></body></html>",
                state.base
            );
            html(stream, "200 OK", "", &page)
        }
        Drive::Cookie if params.get("confirm") == Some(&TOKEN) => {
            send_file(stream, state, file, range)
        }
        Drive::Cookie => html(
            stream,
            "200 OK",
            &format!("Set-Cookie: download_warning_13058876669334088843_{id}={TOKEN}; Path=/\r\n"),
            "<html><head><title>Google Drive - Virus scan warning</title></head><body>This file is too large for Google to scan for viruses.</body></html>",
        ),
        Drive::Quota => html(
            stream,
            "200 OK",
            "",
            "<!DOCTYPE html><html><head><title>Google Drive - Quota exceeded</title></head><body>\
             <p class=\"uc-error-caption\">Sorry, you can't view or download this file at this time.</p>\
             <p class=\"uc-error-subcaption\">Too many users have viewed or downloaded this file recently. Please try accessing the file again later. If the file you are trying to access is particularly large or is shared with many people, it may take up to 24 hours to be able to view or download the file.</p></body></html>",
        ),
        Drive::SignIn => {
            let head = format!(
                "HTTP/1.1 302 Found\r\nLocation: {}/ServiceLogin?continue=x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                state.base
            );
            let _ = stream.write_all(head.as_bytes());
        }
    }
}

fn html(stream: &mut TcpStream, status: &str, extra: &str, body: &str) {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/html; charset=utf-8\r\n{extra}Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = stream.write_all(head.as_bytes());
    let _ = stream.write_all(body.as_bytes());
}

/// A file of the directory from `range` on, misbehaving as its behaviour says.
fn send_file(stream: &mut TcpStream, state: &State, file: &str, range: Option<u64>) {
    let behaviour = *state
        .mirror
        .behaviours
        .get(file)
        .unwrap_or(&Behaviour::Serve);
    let plain = !file.is_empty() && !file.starts_with('.') && !file.contains(['/', '\\']);
    let body = match plain.then(|| std::fs::read(state.mirror.dir.join(file))) {
        Some(Ok(body)) => body,
        _ => {
            let _ = stream.write_all(
                b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            );
            return;
        }
    };
    let nth = {
        let mut served = state.served.lock().unwrap();
        let n = served.entry(file.to_owned()).or_insert(0);
        *n += 1;
        *n - 1
    };
    if behaviour == Behaviour::Endless {
        let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n");
        let chunk = vec![0x5au8; 1 << 16];
        while stream.write_all(&chunk).is_ok() {}
        return;
    }
    let start = match (behaviour, range) {
        (Behaviour::IgnoreRange, _) | (_, None) => 0,
        (_, Some(r)) => (r as usize).min(body.len()),
    };
    let status = if start > 0 {
        "206 Partial Content"
    } else {
        "200 OK"
    };
    let rest = &body[start..];
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/octet-stream\r\nContent-Disposition: attachment; filename=\"{file}\"\r\nContent-Length: {}\r\nContent-Range: bytes {start}-{}/{}\r\nConnection: close\r\n\r\n",
        rest.len(),
        body.len().saturating_sub(1),
        body.len()
    );
    let _ = stream.write_all(head.as_bytes());
    let _ = match behaviour {
        Behaviour::CutOnceAt(at) if nth == 0 => stream.write_all(&rest[..at.min(rest.len())]),
        Behaviour::StallAt(at) => {
            let sent = stream
                .write_all(&rest[..at.min(rest.len())])
                .and_then(|()| stream.flush());
            std::thread::sleep(STALL);
            sent
        }
        _ => stream.write_all(rest),
    };
}
