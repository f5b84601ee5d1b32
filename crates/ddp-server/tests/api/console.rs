//! The web console's static files (PROTOCOL.md §13): served without a token, with their content
//! types, no-cache, a strict Content-Security-Policy and nosniff; `/console/ddp.js` is the
//! project's JavaScript client byte for byte. The console itself is driven in a real browser by
//! `scripts/test-browser`.

use ddp_testkit::TestServer;
use reqwest::StatusCode;

/// `clients/js/src/ddp.js`, read from the work tree.
fn js_client() -> Vec<u8> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../clients/js/src/ddp.js");
    std::fs::read(path).unwrap_or_else(|e| panic!("read {path}: {e}"))
}

#[tokio::test]
async fn console_files_are_served_without_a_token() {
    let s = TestServer::start().await;
    let files = [
        ("/console/", "text/html; charset=utf-8", "<script type=\"module\" src=\"./console.js\">"),
        ("/console/console.js", "text/javascript; charset=utf-8", "from './ddp.js'"),
        ("/console/console.css", "text/css; charset=utf-8", ":focus-visible"),
        ("/console/ddp.js", "text/javascript; charset=utf-8", "export class DeviceMirror"),
    ];
    for (path, content_type, needle) in files {
        let resp = s.client.get(format!("{}{path}", s.base)).send().await.expect("request sent");
        assert_eq!(resp.status(), StatusCode::OK, "{path}");
        let header =
            |name: &str| resp.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_owned).unwrap_or_default();
        assert_eq!(header("content-type"), content_type, "{path}");
        assert_eq!(header("cache-control"), "no-cache", "{path}");
        assert_eq!(header("x-content-type-options"), "nosniff", "{path}");
        let csp = header("content-security-policy");
        for directive in
            ["default-src 'self'", "script-src 'self'", "connect-src 'self' ws: wss:", "frame-ancestors 'none'"]
        {
            assert!(csp.contains(directive), "{path}: CSP {csp:?} lacks {directive:?}");
        }
        assert!(
            !csp.contains("unsafe-inline") && !csp.contains("unsafe-eval"),
            "{path}: CSP {csp:?} allows inline code"
        );
        let body = resp.bytes().await.expect("body");
        assert!(String::from_utf8_lossy(&body).contains(needle), "{path} lacks {needle:?}");
        if path == "/console/ddp.js" {
            assert!(body.as_ref() == js_client().as_slice(), "/console/ddp.js differs from clients/js/src/ddp.js");
        }
    }
}

#[tokio::test]
async fn console_without_slash_redirects_and_unknown_files_are_404() {
    let s = TestServer::start().await;
    let client = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().expect("client");
    let resp = client.get(format!("{}/console", s.base)).send().await.expect("request sent");
    assert_eq!(resp.status(), StatusCode::PERMANENT_REDIRECT);
    assert_eq!(resp.headers().get("location").and_then(|v| v.to_str().ok()), Some("/console/"));

    let resp = client.get(format!("{}/console/nothing.js", s.base)).send().await.expect("request sent");
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    let body: serde_json::Value = resp.json().await.expect("a JSON error");
    assert_eq!(body["reason"], "NOT_FOUND");
}

#[tokio::test]
async fn the_index_loads_no_inline_script_or_style() {
    let s = TestServer::start().await;
    let html = s.client.get(format!("{}/console/", s.base)).send().await.expect("sent").text().await.expect("text");
    // Every <script> has a src (the CSP would block an inline one), and no element carries a
    // style attribute or an inline event handler.
    for (i, _) in html.match_indices("<script") {
        let tag = &html[i..i + html[i..].find('>').expect("tag end")];
        assert!(tag.contains(" src="), "inline script: {tag}");
    }
    assert!(!html.contains(" style="), "inline style in index.html");
    assert!(!html.contains(" onclick=") && !html.contains(" onload="), "inline handler in index.html");
}
