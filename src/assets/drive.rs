//! Google Drive's answers to a direct-download link, read as gdown reads them: a large file
//! comes behind an HTML interstitial ("Google Drive can't scan this file for viruses") whose
//! form (`<form id="download-form" action=...>` with hidden inputs) is submitted to get the
//! file; older pages carry the confirmation as a `download_warning*` cookie (sent back as
//! `confirm=`) or as a `/uc?export=download&confirm=...` link. Any other page (the download
//! quota exceeded, a sign-in or access-request page, an error) is a refusal, never the file.
//! Pages are scanned as text (they are a few KB, and at most `MAX_PAGE` bytes are read); no
//! script on them is run and nothing they say is trusted beyond the next URL to ask.
use reqwest::Url;

/// The most of an HTML answer that is read.
pub(super) const MAX_PAGE: usize = 1 << 20;

/// The next request after an interstitial: its URL, and the cookie to send with it.
#[derive(Debug, PartialEq)]
pub(super) struct Confirm {
    pub url: Url,
    pub cookie: Option<String>,
}

/// Why a page is not the way to the file.
#[derive(Debug, PartialEq)]
pub(super) enum Refusal {
    /// Too many downloads of the file recently; Drive's words.
    Quota(String),
    /// A sign-in or access-request page: the file is not shared with "anyone with the link".
    SignIn,
    /// Any other page; what it says (its error line or title).
    Other(String),
}

/// What to request after Drive answered `page` (HTML) to a request for `asked`, the answer
/// coming from `at` (after redirects) with `cookies` (its Set-Cookie headers).
pub(super) fn confirm(
    page: &str,
    asked: &Url,
    at: &Url,
    cookies: &[String],
) -> Result<Confirm, Refusal> {
    if let Some(refusal) = refusal(page, at) {
        return Err(refusal);
    }
    let next = form_target(page, at)
        .or_else(|| link_target(page, at))
        .map(|url| Confirm { url, cookie: None })
        .or_else(|| cookie_target(asked, cookies));
    match next {
        Some(next) if allowed(&next.url, at) => Ok(next),
        Some(next) => Err(Refusal::Other(format!(
            "its form points to {}, another site over plain http",
            next.url
        ))),
        None => Err(Refusal::Other(error_line(page).unwrap_or_else(|| {
            title(page).map_or("an HTML page with no download form".to_owned(), |t| {
                format!("a page titled \"{t}\"")
            })
        }))),
    }
}

/// The quota and sign-in pages, known by their words or by where they come from.
pub(super) fn refusal(page: &str, at: &Url) -> Option<Refusal> {
    let lower = page.to_ascii_lowercase();
    let sign_in = at
        .host_str()
        .is_some_and(|h| h == "accounts.google.com" || h.ends_with(".accounts.google.com"))
        || at.path().to_ascii_lowercase().contains("servicelogin")
        || [
            "servicelogin",
            "you need access",
            "request access",
            "you need permission",
        ]
        .iter()
        .any(|w| lower.contains(w));
    let quota = lower.contains("too many users have viewed or downloaded this file")
        || (lower.contains("quota") && lower.contains("exceeded"));
    match (quota, sign_in) {
        (true, _) => Some(Refusal::Quota(error_line(page).unwrap_or_else(|| {
            "too many users have viewed or downloaded this file recently".to_owned()
        }))),
        (false, true) => Some(Refusal::SignIn),
        (false, false) => None,
    }
}

/// A next URL over https, or on the page's own site (a local imitation serves plain http).
fn allowed(next: &Url, at: &Url) -> bool {
    next.scheme() == "https"
        || (next.scheme() == "http"
            && next.host_str() == at.host_str()
            && next.port_or_known_default() == at.port_or_known_default())
}

/// The virus-scan warning's form: its action with its hidden inputs as the query.
fn form_target(page: &str, at: &Url) -> Option<Url> {
    let mut from = 0;
    let (start, form) = loop {
        let (start, tag) = find_tag(page, from, "form")?;
        if attr(tag, "id").as_deref() == Some("download-form") {
            break (start, tag);
        }
        from = start + tag.len();
    };
    let mut url = at.join(&attr(form, "action")?).ok()?;
    let end = find_ci(page, start, "</form").unwrap_or(page.len());
    let body = &page[start..end];
    let mut inputs: Vec<(String, String)> = Vec::new();
    let mut from = 0;
    while let Some((at_input, tag)) = find_tag(body, from, "input") {
        from = at_input + tag.len();
        let hidden = attr(tag, "type").is_some_and(|t| t.eq_ignore_ascii_case("hidden"));
        if let (true, Some(name)) = (hidden, attr(tag, "name")) {
            inputs.push((name, attr(tag, "value").unwrap_or_default()));
        }
    }
    set_query(&mut url, &inputs);
    Some(url)
}

/// `url` with the `pairs` in its query, replacing any of the same names.
fn set_query(url: &mut Url, pairs: &[(String, String)]) {
    let kept: Vec<(String, String)> = url
        .query_pairs()
        .filter(|(k, _)| !pairs.iter().any(|(n, _)| n == k))
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    url.query_pairs_mut()
        .clear()
        .extend_pairs(kept.iter().chain(pairs));
}

/// The older page's link, `href="/uc?export=download&confirm=...&id=..."`.
fn link_target(page: &str, at: &Url) -> Option<Url> {
    let mut from = 0;
    while let Some((start, tag)) = find_tag(page, from, "a") {
        from = start + tag.len();
        if let Some(href) = attr(tag, "href").filter(|h| h.starts_with("/uc?export=download")) {
            return at.join(&href).ok();
        }
    }
    None
}

/// The oldest scheme: a `download_warning*` cookie whose value goes back as `confirm=`.
fn cookie_target(asked: &Url, cookies: &[String]) -> Option<Confirm> {
    let (name, token) = cookies.iter().find_map(|c| {
        let pair = c.split(';').next()?.trim();
        let (name, value) = pair.split_once('=')?;
        let token_ok = !value.is_empty() && value.bytes().all(|b| b.is_ascii_graphic());
        (name.starts_with("download_warning") && token_ok).then_some((name, value))
    })?;
    let mut url = asked.clone();
    set_query(&mut url, &[("confirm".to_owned(), token.to_owned())]);
    Some(Confirm {
        url,
        cookie: Some(format!("{name}={token}")),
    })
}

/// Drive's error line (`<p class="uc-error-subcaption">...</p>`), as plain text.
fn error_line(page: &str) -> Option<String> {
    let at = find_ci(page, 0, "uc-error-subcaption")?;
    let open = page[at..].find('>')? + at + 1;
    let close = find_ci(page, open, "</p").unwrap_or(page.len());
    Some(plain(&page[open..close])).filter(|t| !t.is_empty())
}

fn title(page: &str) -> Option<String> {
    let (start, tag) = find_tag(page, 0, "title")?;
    let open = start + tag.len();
    let close = find_ci(page, open, "</title").unwrap_or(page.len());
    Some(plain(&page[open..close])).filter(|t| !t.is_empty())
}

/// Text for a message: tags dropped, entities decoded, control characters and runs of
/// spaces removed, at most 200 characters.
pub(super) fn plain(html: &str) -> String {
    let mut text = String::new();
    let mut in_tag = false;
    for c in html.chars() {
        match c {
            '<' => in_tag = true,
            '>' => in_tag = false,
            _ if !in_tag => text.push(c),
            _ => {}
        }
    }
    let text = decode(&text);
    let words: Vec<&str> = text
        .split(|c: char| c.is_whitespace() || c.is_control())
        .filter(|w| !w.is_empty())
        .collect();
    let text = words.join(" ");
    match text.char_indices().nth(200) {
        Some((cut, _)) => format!("{}...", &text[..cut]),
        None => text,
    }
}

/// Where `needle` (ASCII, lowercase) first occurs in `haystack` at or after `from`, ignoring
/// ASCII case.
fn find_ci(haystack: &str, from: usize, needle: &str) -> Option<usize> {
    let bytes = haystack.as_bytes();
    let n = needle.len();
    if from + n > bytes.len() {
        return None;
    }
    (from..=bytes.len() - n).find(|&i| bytes[i..i + n].eq_ignore_ascii_case(needle.as_bytes()))
}

/// The next `<name ...>` tag at or after `from`: where it starts, and its text up to `>`.
fn find_tag<'a>(page: &'a str, from: usize, name: &str) -> Option<(usize, &'a str)> {
    let open = format!("<{name}");
    let mut from = from;
    loop {
        let start = find_ci(page, from, &open)?;
        let after = page.as_bytes().get(start + open.len()).copied();
        if matches!(after, Some(b) if b.is_ascii_whitespace() || b == b'>' || b == b'/') {
            let end = page[start..]
                .find('>')
                .map_or(page.len(), |e| start + e + 1);
            return Some((start, &page[start..end]));
        }
        from = start + open.len();
    }
}

/// The value of attribute `name` in a tag's text (quoted with " or ', or bare), decoded.
fn attr(tag: &str, name: &str) -> Option<String> {
    let bytes = tag.as_bytes();
    let mut i = tag.find(|c: char| c.is_ascii_whitespace())?;
    while i < bytes.len() {
        while i < bytes.len() && (bytes[i].is_ascii_whitespace() || bytes[i] == b'/') {
            i += 1;
        }
        let key_start = i;
        while i < bytes.len() && !b"=> \t\r\n/".contains(&bytes[i]) {
            i += 1;
        }
        let key = &tag[key_start..i];
        if key.is_empty() {
            return None;
        }
        if bytes.get(i) != Some(&b'=') {
            continue;
        }
        i += 1;
        let (value, next) = match bytes.get(i) {
            Some(&q) if q == b'"' || q == b'\'' => {
                let end = tag[i + 1..]
                    .find(q as char)
                    .map_or(tag.len(), |e| i + 1 + e);
                (&tag[i + 1..end], end + 1)
            }
            _ => {
                let end = tag[i..]
                    .find(|c: char| c.is_ascii_whitespace() || c == '>')
                    .map_or(tag.len(), |e| i + e);
                (&tag[i..end], end)
            }
        };
        if key.eq_ignore_ascii_case(name) {
            return Some(decode(value));
        }
        i = next;
    }
    None
}

/// HTML's character references: the named ones a Drive page uses, and numeric ones.
fn decode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(amp) = rest.find('&') {
        out.push_str(&rest[..amp]);
        rest = &rest[amp..];
        // Bytes, not a str slice: the 12th byte may fall inside a character.
        let near = &rest.as_bytes()[..rest.len().min(12)];
        let Some(semi) = near.iter().position(|&b| b == b';') else {
            out.push('&');
            rest = &rest[1..];
            continue;
        };
        let entity = &rest[1..semi];
        let c = match entity {
            "amp" => Some('&'),
            "lt" => Some('<'),
            "gt" => Some('>'),
            "quot" => Some('"'),
            "apos" => Some('\''),
            "nbsp" => Some(' '),
            _ => entity
                .strip_prefix("#x")
                .or_else(|| entity.strip_prefix("#X"))
                .map(|h| u32::from_str_radix(h, 16))
                .or_else(|| entity.strip_prefix('#').map(str::parse::<u32>))
                .and_then(Result::ok)
                .and_then(char::from_u32),
        };
        match c {
            Some(c) => {
                out.push(c);
                rest = &rest[semi + 1..];
            }
            None => {
                out.push('&');
                rest = &rest[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(s: &str) -> Url {
        Url::parse(s).unwrap()
    }

    #[test]
    fn the_virus_scan_form_is_submitted_with_its_hidden_inputs() {
        let page = r#"<html><head><title>Google Drive - Virus scan warning</title></head><body>
            <form id="download-form" action="https://drive.usercontent.google.com/download" method="get">
            <input type="submit" id="uc-download-link" value="Download anyway"/>
            <input type="hidden" name="id" value="abcDEF123_-x">
            <input type="hidden" name="export" value="download">
            <input type="hidden" name="confirm" value="t">
            <input type="hidden" name="uuid" value="1234&amp;5"></form></body></html>"#;
        let asked = url("https://drive.google.com/uc?export=download&id=abcDEF123_-x");
        let next = confirm(page, &asked, &asked, &[]).unwrap();
        assert_eq!(
            next.url.as_str(),
            "https://drive.usercontent.google.com/download?id=abcDEF123_-x&export=download&confirm=t&uuid=1234%265"
        );
        assert_eq!(next.cookie, None);
    }

    #[test]
    fn the_cookie_token_goes_back_as_confirm() {
        let asked = url("https://drive.google.com/uc?export=download&id=X1234567890");
        let cookies = [
            "NID=1; Path=/".to_owned(),
            "download_warning_13058876669334088843_X=Tok-3n; Domain=.drive.google.com; Path=/uc"
                .to_owned(),
        ];
        let next = confirm(
            "<html><body>warning</body></html>",
            &asked,
            &asked,
            &cookies,
        )
        .unwrap();
        assert_eq!(
            next.url.as_str(),
            "https://drive.google.com/uc?export=download&id=X1234567890&confirm=Tok-3n"
        );
        assert_eq!(
            next.cookie.as_deref(),
            Some("download_warning_13058876669334088843_X=Tok-3n")
        );
    }

    #[test]
    fn quota_sign_in_and_other_pages_are_refusals() {
        let asked = url("https://drive.google.com/uc?export=download&id=X1234567890");
        let quota = r#"<p class="uc-error-caption">Sorry, you can't view or download this file at this time.</p><p class="uc-error-subcaption">Too many users have viewed or downloaded this file recently. Please try accessing the file again later.</p>"#;
        match confirm(quota, &asked, &asked, &[]) {
            Err(Refusal::Quota(words)) => assert!(words.starts_with("Too many users"), "{words}"),
            other => panic!("{other:?}"),
        }
        let login = url("https://accounts.google.com/v3/signin/identifier?continue=x");
        assert_eq!(
            confirm("<html>Sign in</html>", &asked, &login, &[]),
            Err(Refusal::SignIn)
        );
        let other = "<html><title>Page &amp; not found</title></html>";
        assert_eq!(
            confirm(other, &asked, &asked, &[]),
            Err(Refusal::Other(
                "a page titled \"Page & not found\"".to_owned()
            ))
        );
    }

    #[test]
    fn crafted_pages_end_in_a_refusal_without_panicking() {
        let asked = url("https://drive.google.com/uc?export=download&id=X1234567890");
        for page in [
            "<form id=\"download-form\"",
            "<form id=download-form action=",
            "<form id='download-form' action='/x'><input type=hidden name=a value=\"&#xFFFFFFFF;&#99999999999;&ééééééééé;\"",
            "&ééééééééééééé<title>é",
            "<a href=\"/uc?export=download",
            "<p class=\"uc-error-subcaption\"",
            "<<<<>>>>=\"\"''",
        ] {
            let _ = confirm(page, &asked, &asked, &["download_warning=".to_owned(), "=".to_owned()]);
        }
        assert_eq!(decode("a&amp;b&#233;&#x41;&bogus;&"), "a&béA&bogus;&");
    }

    /// Pieces of Drive pages, in any order and number: whatever they make is scanned without a
    /// panic and ends in a URL or a refusal.
    const PIECES: [&str; 24] = [
        "<form",
        " id=\"download-form\"",
        " id=download-form",
        " action=\"",
        " action='",
        "/download",
        "https://x.example/d?a=1",
        "<input",
        " type=\"hidden\"",
        " name=\"",
        " value=\"",
        "\"",
        "'",
        ">",
        "</form>",
        "<a href=\"/uc?export=download&confirm=",
        "&amp;",
        "&#",
        ";",
        "é",
        "<title>",
        "uc-error-subcaption",
        "</p",
        " ",
    ];

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 512, failure_persistence: None, ..Default::default() })]
        #[test]
        fn any_page_made_of_drive_pieces_is_scanned_without_panic(
            picks in proptest::collection::vec(0..PIECES.len(), 0..120)
        ) {
            let page: String = picks.iter().map(|&i| PIECES[i]).collect();
            let asked = url("https://drive.google.com/uc?export=download&id=X1234567890");
            let _ = confirm(&page, &asked, &asked, std::slice::from_ref(&page));
        }
    }

    #[test]
    fn a_form_sending_elsewhere_over_plain_http_is_refused() {
        let asked = url("https://drive.google.com/uc?export=download&id=X1234567890");
        let page = r#"<form id="download-form" action="http://evil.example/x"><input type="hidden" name="a" value="b"></form>"#;
        assert!(matches!(
            confirm(page, &asked, &asked, &[]),
            Err(Refusal::Other(_))
        ));
    }
}
