//! The network side of one download attempt, on a thread of its own: the request (and Google
//! Drive's interstitial pages before the file), the checks on what the answer is, then the
//! body in chunks over a bounded channel. The caller waits on the channel in short slices, so a
//! stop signal is seen within a fraction of a second however long a stalled read takes; the
//! reqwest timeout (per connect and per read) ends a stall as a retryable failure.
use super::drive::{self, Refusal, MAX_PAGE};
use super::manifest::Format;
use anyhow::anyhow;
use reqwest::blocking::{Client, Response};
use reqwest::{header, StatusCode, Url};
use std::io::Read;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::time::Duration;

/// Bytes read before deciding whether an answer is the file (enough for every magic number
/// and for an HTML page's opening tags).
const SNIFF: usize = 1024;
/// Chunks of the body handed to the writer; at most `IN_FLIGHT` wait in the channel.
const CHUNK: usize = 1 << 16;
const IN_FLIGHT: usize = 16;
/// Google Drive's answers followed before the file must come (page, confirmation, file).
const MAX_HOPS: usize = 3;

pub(super) enum Failure {
    /// Worth another attempt (a cut, a stall, a 5xx, a 408 or 429).
    Retry(anyhow::Error),
    /// Worth another attempt from byte 0 (the server refused the Range).
    StartOver(anyhow::Error),
    /// Not worth one (a refused URL, a 4xx, a page that is not the file, a full disk, a stop).
    Final(anyhow::Error),
}

/// What one attempt asks for.
#[derive(Clone)]
pub(super) struct Request {
    /// The asset's name and where a person downloads it by hand, for messages.
    pub name: String,
    pub page: String,
    pub url: Url,
    /// Google Drive's interstitial pages are followed (else any HTML answer is refused).
    pub drive: bool,
    /// Bytes already in the partial file: asked for from here with Range.
    pub have: u64,
    /// The most bytes the file may hold.
    pub limit: u64,
    pub format: Format,
    pub timeout: Duration,
}

pub(super) enum Event {
    /// The file's answer: its total size when stated, and whether it continues at `have`.
    Head {
        total: Option<u64>,
        resumed: bool,
    },
    Bytes(Vec<u8>),
    End,
}

pub(super) type Events = Receiver<Result<Event, Failure>>;

/// Starts the attempt; its events arrive on the returned channel, a failure last.
pub(super) fn start(request: Request) -> Events {
    let (tx, rx) = sync_channel(IN_FLIGHT);
    std::thread::spawn(move || {
        if let Err(failure) = run(&request, &tx) {
            let _ = tx.send(Err(failure));
        }
    });
    rx
}

fn run(req: &Request, tx: &SyncSender<Result<Event, Failure>>) -> Result<(), Failure> {
    let client = Client::builder()
        .connect_timeout(req.timeout)
        .timeout(req.timeout)
        .user_agent(concat!(
            "meanflow-repro/",
            env!("CARGO_PKG_VERSION"),
            " (mfr fetch)"
        ))
        .build()
        .map_err(|e| Failure::Final(e.into()))?;
    let (mut url, mut cookie) = (req.url.clone(), None::<String>);
    for hop in 0..MAX_HOPS {
        let mut response = get(&client, &url, req, cookie.as_deref())?;
        let resumed = response.status() == StatusCode::PARTIAL_CONTENT && req.have > 0;
        // The body's length as the headers state it (read before any of the body is).
        let length = response.content_length();
        let prefix = read_prefix(&mut response)?;
        if !is_html(&response, &prefix, resumed) {
            return stream(req, response, (prefix, length), resumed, tx);
        }
        let at = response.url().clone();
        let cookies = set_cookies(&response);
        let page = read_page(response, prefix);
        if !req.drive {
            return Err(Failure::Final(not_the_file(req, &page)));
        }
        let next = drive::confirm(&page, &url, &at, &cookies)
            .map_err(|refusal| Failure::Final(refused(req, refusal)))?;
        (url, cookie) = (next.url, next.cookie);
        if hop + 1 == MAX_HOPS {
            break;
        }
    }
    Err(Failure::Final(anyhow!(
        "Google Drive answered {MAX_HOPS} pages and no file; nothing was kept: download it from {} in a browser and run `mfr fetch {} --file PATH`",
        req.page,
        req.name
    )))
}

/// One GET, with Range when resuming; an answer that is an error is a failure here, except a
/// Drive page behind a 4xx, which is read for what it says.
fn get(
    client: &Client,
    url: &Url,
    req: &Request,
    cookie: Option<&str>,
) -> Result<Response, Failure> {
    let mut request = client.get(url.clone());
    if req.have > 0 {
        request = request.header(header::RANGE, format!("bytes={}-", req.have));
    }
    if let Some(cookie) = cookie {
        request = request.header(header::COOKIE, cookie);
    }
    let response = request.send().map_err(|e| match e.is_builder() {
        true => Failure::Final(e.into()),
        false => Failure::Retry(e.into()),
    })?;
    let status = response.status();
    if status == StatusCode::RANGE_NOT_SATISFIABLE {
        return Err(Failure::StartOver(anyhow!(
            "the server refused to resume at byte {}; starting over",
            req.have
        )));
    }
    let transient = status.is_server_error()
        || status == StatusCode::REQUEST_TIMEOUT
        || status == StatusCode::TOO_MANY_REQUESTS;
    if transient {
        return Err(Failure::Retry(anyhow!("the server answered {status}")));
    }
    if status.is_success() {
        return Ok(response);
    }
    if req.drive && status.is_client_error() {
        let at = response.url().clone();
        let page = read_page(response, Vec::new());
        if let Some(refusal) = drive::refusal(&page, &at) {
            return Err(Failure::Final(refused(req, refusal)));
        }
    }
    Err(Failure::Final(anyhow!(
        "the server answered {status}; check the URL, or download it from {} and run `mfr fetch {} --file PATH`",
        req.page,
        req.name
    )))
}

/// Up to SNIFF bytes of the body (fewer only when the body is shorter).
fn read_prefix(response: &mut Response) -> Result<Vec<u8>, Failure> {
    let mut prefix = Vec::with_capacity(SNIFF);
    (&mut *response)
        .take(SNIFF as u64)
        .read_to_end(&mut prefix)
        .map_err(|e| Failure::Retry(e.into()))?;
    Ok(prefix)
}

/// The rest of an HTML answer, at most MAX_PAGE bytes of it, as text.
fn read_page(response: Response, mut prefix: Vec<u8>) -> String {
    let room = MAX_PAGE.saturating_sub(prefix.len()) as u64;
    let _ = response.take(room).read_to_end(&mut prefix);
    String::from_utf8_lossy(&prefix).into_owned()
}

fn set_cookies(response: &Response) -> Vec<String> {
    response
        .headers()
        .get_all(header::SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok().map(str::to_owned))
        .collect()
}

/// An HTML page: by its Content-Type, or (for an answer from byte 0) by its first bytes.
pub(super) fn is_html(response: &Response, prefix: &[u8], resumed: bool) -> bool {
    let content_type = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_ascii_lowercase();
    content_type.starts_with("text/html")
        || content_type.starts_with("application/xhtml")
        || (!resumed && sniffs_html(prefix))
}

/// Whether bytes open like an HTML document (after a byte-order mark and white space).
pub(super) fn sniffs_html(bytes: &[u8]) -> bool {
    let bytes = bytes.strip_prefix(b"\xef\xbb\xbf").unwrap_or(bytes);
    let start = bytes
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(bytes.len());
    let head = &bytes[start..bytes.len().min(start + 16)];
    [
        "<!doctype html",
        "<html",
        "<head",
        "<body",
        "<script",
        "<meta",
        "<title",
        "<form",
        "<!--",
    ]
    .iter()
    .any(|open| {
        head.len() >= open.len() && head[..open.len()].eq_ignore_ascii_case(open.as_bytes())
    })
}

/// Whether a file's first bytes are what its format begins with (None: not enough bytes).
pub(super) fn magic_ok(format: Format, head: &[u8]) -> bool {
    let zip = head.starts_with(b"PK\x03\x04") || head.starts_with(b"PK\x05\x06");
    match format {
        Format::Zip | Format::Npz => zip,
        // torch.save's zip format, or a legacy file (a pickle, protocol 2 or later).
        Format::Torch => zip || head.first() == Some(&0x80),
        // An 8-byte little-endian header length, then the JSON header.
        Format::Safetensors => {
            head.len() >= 9
                && u64::from_le_bytes(head[..8].try_into().expect("8 bytes")) < (100 << 20)
                && head[8] == b'{'
        }
        Format::Any => true,
    }
}

/// The body of the file's answer, after the checks that need no more than its head.
fn stream(
    req: &Request,
    mut response: Response,
    (prefix, length): (Vec<u8>, Option<u64>),
    resumed: bool,
    tx: &SyncSender<Result<Event, Failure>>,
) -> Result<(), Failure> {
    let start = if resumed { req.have } else { 0 };
    let total = length.map(|n| n.saturating_add(start));
    if let Some(total) = total.filter(|&t| t > req.limit) {
        return Err(Failure::Final(anyhow!(
            "the server offers {total} bytes, more than the asset's {}",
            req.limit
        )));
    }
    if !resumed && !magic_ok(req.format, &prefix) {
        return Err(Failure::Final(anyhow!(
            "the answer is not a {} file (it starts {}); nothing was kept: check the URL, or download it from {} and run `mfr fetch {} --file PATH`",
            req.format.name(),
            preview(&prefix),
            req.page,
            req.name
        )));
    }
    let send = |event| tx.send(Ok(event)).is_ok();
    if !send(Event::Head { total, resumed }) || (!prefix.is_empty() && !send(Event::Bytes(prefix)))
    {
        return Ok(());
    }
    loop {
        let mut chunk = vec![0u8; CHUNK];
        let n = response
            .read(&mut chunk)
            .map_err(|e| Failure::Retry(e.into()))?;
        if n == 0 {
            send(Event::End);
            return Ok(());
        }
        chunk.truncate(n);
        if !send(Event::Bytes(chunk)) {
            // The writer stopped (a signal, a full disk): nothing more to do.
            return Ok(());
        }
    }
}

/// The first bytes of an answer as a message shows them.
pub(super) fn preview(bytes: &[u8]) -> String {
    let head = &bytes[..bytes.len().min(16)];
    match head.iter().all(|b| b.is_ascii_graphic() || *b == b' ') {
        true => format!("\"{}\"", String::from_utf8_lossy(head)),
        false => format!("0x{}", crate::files::hex(head)),
    }
}

/// An HTML answer where a file was expected (a plain server's error page, a portal).
fn not_the_file(req: &Request, page: &str) -> anyhow::Error {
    anyhow!(
        "the server answered an HTML page (\"{}\"), not the file; nothing was kept: check the URL or the mirror, or download it from {} and run `mfr fetch {} --file PATH`",
        drive::plain(page).chars().take(120).collect::<String>(),
        req.page,
        req.name
    )
}

/// Google Drive's refusal as one sentence naming the asset and what to do.
fn refused(req: &Request, refusal: Refusal) -> anyhow::Error {
    let (name, page) = (&req.name, &req.page);
    match refusal {
        Refusal::Quota(words) => anyhow!(
            "Google Drive refuses the download: the file's download quota is exceeded (\"{words}\"); nothing was kept: try again in a day, or open {page} in a browser, download it, and run `mfr fetch {name} --file PATH`, or use a mirror (--mirror)"
        ),
        Refusal::SignIn => anyhow!(
            "Google Drive asks to sign in or to request access (the file is not shared with anyone who has the link, or its id is wrong); nothing was kept: open {page} in a browser signed in to an account that can read it, download it, and run `mfr fetch {name} --file PATH`"
        ),
        Refusal::Other(what) => anyhow!(
            "Google Drive answered {what}, not the file; nothing was kept: open {page} in a browser, download it, and run `mfr fetch {name} --file PATH`, or use a mirror (--mirror)"
        ),
    }
}
