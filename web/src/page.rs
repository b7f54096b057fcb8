//! Server-rendered HTML: one stylesheet, a navigation bar, escaped text.

use axum::http::header;
use axum::response::{IntoResponse, Response};

/// An HTML page under the namenode's navigation bar.
pub struct Page {
    title: String,
    body: String,
    script: String,
}

impl Page {
    pub fn new(title: impl Into<String>) -> Page {
        Page {
            title: title.into(),
            body: String::new(),
            script: String::new(),
        }
    }

    /// Appends trusted markup (callers escape what came from users).
    pub fn push(&mut self, html: &str) -> &mut Page {
        self.body.push_str(html);
        self
    }

    /// Script run once the page has loaded.
    pub fn script(&mut self, js: &str) -> &mut Page {
        self.script.push_str(js);
        self
    }

    pub fn render(&self) -> String {
        format!(
            "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
             <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
             <title>{title} · quern</title><style>{STYLE}</style></head><body>\
             <nav><b>quern</b><a href=\"/\">Overview</a><a href=\"/datanodes\">Datanodes</a>\
             <a href=\"/browse\">Files</a><a href=\"/jobs\">Jobs</a>\
             <a href=\"/metrics\">Metrics</a></nav><main><h1>{title}</h1>{body}</main>\
             <script>{script}</script></body></html>\n",
            title = escape(&self.title),
            body = self.body,
            script = self.script,
        )
    }
}

impl IntoResponse for Page {
    fn into_response(self) -> Response {
        (
            [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
            self.render(),
        )
            .into_response()
    }
}

const STYLE: &str =
    "body{font:14px system-ui,sans-serif;margin:0;color:#1d2330;background:#f7f8fa}\
nav{background:#1d2330;padding:10px 20px}nav b{color:#fff;margin-right:24px}\
nav a{color:#c9d1e0;margin-right:16px;text-decoration:none}nav a:hover{color:#fff}\
main{padding:8px 24px 40px}h1{font-size:20px}h2{font-size:16px;margin-top:28px}\
table{border-collapse:collapse;background:#fff;min-width:50%}\
th,td{border-bottom:1px solid #e3e6ec;padding:5px 12px;text-align:left}\
td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}\
.live{color:#1a7f37}.dead,.failed{color:#cf222e}.warn{color:#9a6700}\
.cards{display:flex;gap:12px;flex-wrap:wrap}\
.card{background:#fff;border:1px solid #e3e6ec;border-radius:6px;padding:10px 16px;min-width:140px}\
.card .v{font-size:20px;font-weight:600}.card .k{color:#57606a}\
svg.chart{background:#fff;border:1px solid #e3e6ec;border-radius:6px}\
code{background:#eef0f4;padding:1px 4px;border-radius:3px}";

/// Text made safe to place in HTML content and attribute values.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Bytes in binary units, as `quern report` prints them.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_text_cannot_open_markup() {
        assert_eq!(
            escape("<script>\"x\"&'y'"),
            "&lt;script&gt;&quot;x&quot;&amp;&#39;y&#39;"
        );
    }

    #[test]
    fn bytes_read_as_people_write_them() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(3 << 30), "3.0 GiB");
    }
}
