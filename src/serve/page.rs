//! The web page at `/`: static HTML, CSS and JavaScript embedded in the binary (no CDN, no
//! build step). The page drives the same API as any client: `POST /v1/edits`, then the
//! edit's Server-Sent Events.

use axum::http::header;
use axum::response::IntoResponse;

/// `GET /`.
pub async fn index() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        include_str!("page/index.html"),
    )
}

/// `GET /app.js`.
pub async fn script() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        include_str!("page/app.js"),
    )
}

/// `GET /style.css`.
pub async fn style() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/css; charset=utf-8")],
        include_str!("page/style.css"),
    )
}

#[cfg(test)]
mod tests {
    use crate::engine::strategy::StrategyField;

    /// The page's optional request fields (`KNOBS` in app.js), each with its form element.
    fn page_knobs() -> Vec<String> {
        let script = include_str!("page/app.js");
        let list = script
            .split("const KNOBS = [")
            .nth(1)
            .and_then(|rest| rest.split(']').next())
            .expect("app.js declares KNOBS");
        list.split(',')
            .map(|k| k.trim().trim_matches('\'').to_string())
            .filter(|k| !k.is_empty())
            .collect()
    }

    #[test]
    fn the_page_offers_every_strategy_knob_and_nothing_unknown() {
        let mut knobs = page_knobs();
        knobs.sort();
        let mut expected: Vec<String> = StrategyField::ALL
            .iter()
            .map(|f| f.key().to_string())
            .chain(["size".to_string()])
            .collect();
        expected.sort();
        assert_eq!(knobs, expected);
        let html = include_str!("page/index.html");
        for knob in page_knobs() {
            assert!(
                html.contains(&format!("id=\"{knob}\"")),
                "index.html has no element for {knob}"
            );
        }
    }
}
