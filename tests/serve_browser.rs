//! The page at `/` in a real browser: `serve` (testbed generator and judge) runs as a child
//! process, headless Chromium is driven through chromedriver (WebDriver, `fantoccini`), and
//! an edit is made the way a person makes one: pick a file, type the instruction, submit,
//! watch. Nothing waits on the clock: the server's and chromedriver's "started" lines say
//! when they are up, and WebDriver waits for the page's own state.
//!
//! Needs `chromium` and `chromedriver` (`scripts/test` installs them with apt-get); set
//! `ICEDIT_SKIP_BROWSER_TEST=1` to skip where no browser can be installed. Screenshots go
//! to `target/test-artifacts/` for a person to look at.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use futures::FutureExt;
use hyper_util::client::legacy::connect::HttpConnector;
use serde_json::{json, Value};

/// How to get the browser: scripts/test (the README's test command) installs it.
const INSTALL: &str = "scripts/test installs them (apt-get install chromium chromium-driver)";

/// A child process killed when dropped.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The first of `names` found as a file on `PATH`.
fn on_path(names: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .flat_map(|dir| names.iter().map(move |n| dir.join(n)))
        .find(|p| p.is_file())
}

/// Reads `child`'s stdout until a line satisfies `ready` and returns that line; the rest of
/// stdout is drained on a thread so the child never blocks on a full pipe. Panics with
/// `what` and the `log` file if the child exits first.
fn wait_for_line(
    child: &mut Child,
    what: &str,
    log: &Path,
    ready: impl Fn(&str) -> bool,
) -> String {
    let mut lines = BufReader::new(child.stdout.take().expect("stdout is piped")).lines();
    let mut seen = Vec::new();
    let found = loop {
        match lines.next() {
            Some(Ok(line)) if ready(&line) => break line,
            Some(Ok(line)) => seen.push(line),
            _ => panic!(
                "{what} exited before it was ready\nstdout:\n{}\nstderr:\n{}",
                seen.join("\n"),
                std::fs::read_to_string(log).unwrap_or_default()
            ),
        }
    };
    std::thread::spawn(move || for _ in lines {});
    found
}

/// Starts `serve` on a free port; returns it and its base URL.
fn start_server(out: &Path, log: &Path) -> (Killed, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_icedit-scale"))
        .args(["serve", "--addr", "127.0.0.1:0", "--out"])
        .arg(out)
        .args(["--steps", "12", "--probe-steps", "3", "--seeds", "6"])
        .env_remove("ICEDIT_SERVE_TOKEN")
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .expect("starting icedit-scale serve");
    let line = wait_for_line(&mut child, "icedit-scale serve", log, |l| {
        l.starts_with("listening on ")
    });
    let base = line["listening on ".len()..].trim().to_string();
    (Killed(child), base)
}

/// Starts chromedriver on a free port; returns it and its URL.
fn start_chromedriver(chromedriver: &Path, log: &Path) -> (Killed, String) {
    let port = {
        let probe = TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap().port()
    };
    let mut child = Command::new(chromedriver)
        .arg(format!("--port={port}"))
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {}: {e}", chromedriver.display()));
    wait_for_line(&mut child, "chromedriver", log, |l| {
        l.contains("started successfully")
    });
    (Killed(child), format!("http://127.0.0.1:{port}"))
}

/// A 256x192 PNG with a sky, a ground and a red disc: something to edit.
fn source_png(path: &Path) {
    let image = image::RgbImage::from_fn(256, 192, |x, y| {
        let (dx, dy) = (x as i32 - 170, y as i32 - 70);
        if dx * dx + dy * dy < 30 * 30 {
            image::Rgb([220, 40, 40])
        } else if y > 130 {
            image::Rgb([60, 140 + (x % 32) as u8, 50])
        } else {
            image::Rgb([120, 170, 230 - (y / 2) as u8])
        }
    });
    image.save(path).unwrap();
}

async fn eval(client: &Client, script: &str) -> Value {
    client
        .execute(script, vec![])
        .await
        .unwrap_or_else(|e| panic!("running {script:?}: {e}"))
}

/// Sizes the window so that its viewport (the page's area, without the browser's own
/// frame) is `width` x `height`.
async fn set_viewport(client: &Client, width: u32, height: u32) {
    client.set_window_size(width, height).await.unwrap();
    let inner = eval(client, "return [window.innerWidth, window.innerHeight]").await;
    let frame = |i: usize, asked: u32| {
        let got = inner[i].as_u64().unwrap_or(u64::from(asked)) as u32;
        asked + asked.saturating_sub(got)
    };
    client
        .set_window_size(frame(0, width), frame(1, height))
        .await
        .unwrap();
}

/// Saves a screenshot of the whole page at `width` (the viewport made as tall as the page,
/// at least `min_height`).
async fn screenshot(client: &Client, width: u32, min_height: u32, path: &Path) {
    set_viewport(client, width, min_height).await;
    let height = eval(
        client,
        "window.scrollTo(0, 0); return document.documentElement.scrollHeight",
    )
    .await
    .as_u64()
    .unwrap_or(u64::from(min_height)) as u32;
    set_viewport(client, width, height.clamp(min_height, 6000)).await;
    let png = client.screenshot().await.unwrap();
    std::fs::write(path, png).unwrap();
}

#[tokio::test]
async fn the_page_runs_an_edit_in_a_browser() {
    let (chromium, chromedriver) = (
        on_path(&["chromium", "chromium-browser", "google-chrome"]),
        on_path(&["chromedriver"]),
    );
    let (Some(chromium), Some(chromedriver)) = (chromium, chromedriver) else {
        if std::env::var("ICEDIT_SKIP_BROWSER_TEST").as_deref() == Ok("1") {
            eprintln!("skipped: no chromium/chromedriver (ICEDIT_SKIP_BROWSER_TEST=1)");
            return;
        }
        panic!(
            "the page test needs chromium and chromedriver on PATH: {INSTALL} \
             (or set ICEDIT_SKIP_BROWSER_TEST=1 to skip it)"
        );
    };
    let started = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let source = tmp.path().join("source.png");
    source_png(&source);
    let (_server, base) = start_server(&tmp.path().join("out"), &tmp.path().join("serve.log"));
    let (_driver, webdriver) = start_chromedriver(&chromedriver, &tmp.path().join("driver.log"));

    let capabilities = json!({
        "browserName": "chrome",
        "goog:chromeOptions": {
            "binary": chromium,
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                     "--disable-dev-shm-usage", "--hide-scrollbars",
                     "--window-size=1280,1000"],
        },
    });
    // chromedriver speaks plain HTTP on 127.0.0.1: no TLS.
    let client = ClientBuilder::new(HttpConnector::new())
        .capabilities(capabilities.as_object().unwrap().clone())
        .connect(&webdriver)
        .await
        .unwrap_or_else(|e| panic!("a Chromium session through chromedriver ({INSTALL}): {e}"));

    let artifacts = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    let outcome = AssertUnwindSafe(make_an_edit(&client, &base, &source, &artifacts))
        .catch_unwind()
        .await;
    if outcome.is_err() {
        // What the page showed and what the server logged, for whoever reads the failure.
        if let Ok(png) = client.screenshot().await {
            let _ = std::fs::write(artifacts.join("serve-page-failed.png"), png);
        }
        eprintln!(
            "serve log:\n{}",
            std::fs::read_to_string(tmp.path().join("serve.log")).unwrap_or_default()
        );
    }
    // Closing the session quits Chromium (killing chromedriver alone would leave it running).
    let _ = client.close().await;
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
    eprintln!(
        "browser test took {:.1} s; screenshots in {}",
        started.elapsed().as_secs_f64(),
        artifacts.display()
    );
}

/// Makes an edit on the page as a person would, checks what the page shows once it is
/// done, and saves screenshots at desktop and phone width into `artifacts`.
async fn make_an_edit(client: &Client, base: &str, source: &Path, artifacts: &Path) {
    client.goto(&format!("{base}/")).await.unwrap();
    // A refine wider than the server's --max-refine (1024 by default) is offered disabled.
    client
        .wait()
        .for_element(Locator::Css("#refine option[value='1536']:disabled"))
        .await
        .expect("the 1536 refine disabled past --max-refine");
    let offered = eval(
        client,
        "return document.querySelector(\"#refine option[value='1024']\").disabled",
    )
    .await;
    assert_eq!(offered, Value::Bool(false));
    client
        .find(Locator::Css("#image"))
        .await
        .unwrap()
        .send_keys(source.to_str().unwrap())
        .await
        .unwrap();
    // The thumbnail shows once the browser has read the file.
    client
        .wait()
        .for_element(Locator::Css("#drop.has-image"))
        .await
        .expect("the thumbnail of the picked file");
    client
        .find(Locator::Css("#prompt"))
        .await
        .unwrap()
        .send_keys("make the red ball blue")
        .await
        .unwrap();
    let seeds = client.find(Locator::Css("#seeds")).await.unwrap();
    seeds.clear().await.unwrap();
    seeds.send_keys("6").await.unwrap();
    client
        .find(Locator::Css("#live"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    client
        .find(Locator::Css("#submit"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();

    // The page marks #status `final` once the edit's last event came.
    let status = client
        .wait()
        .at_most(Duration::from_secs(120))
        .for_element(Locator::Css("#status.final"))
        .await
        .unwrap_or_else(|e| panic!("the edit did not end within 120 s: {e}"));
    let state = status.text().await.unwrap();
    assert_eq!(
        state.trim(),
        "done",
        "#status; page log: {}",
        client
            .find(Locator::Css("#log"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap_or_default()
    );

    let cards = client.find_all(Locator::Css(".card")).await.unwrap();
    assert_eq!(cards.len(), 6, "one card per candidate");
    let pruned = client.find_all(Locator::Css(".card.pruned")).await.unwrap();
    assert!(!pruned.is_empty(), "some candidates were pruned");
    let picks = client.find_all(Locator::Css(".card.pick")).await.unwrap();
    assert_eq!(picks.len(), 1, "exactly one pick");
    let pick = picks[0].attr("data-candidate").await.unwrap();
    assert!(pick.is_some(), "the pick names its candidate");
    let pick_class = picks[0].attr("class").await.unwrap().unwrap_or_default();
    assert!(
        !pick_class.contains("pruned"),
        "the pick was not pruned: {pick_class}"
    );
    // The final image loads in the before/after view.
    client
        .wait()
        .for_element(Locator::Css("#compare img.after.loaded"))
        .await
        .expect("the final image loads");
    let summary = client
        .find(Locator::Css("#summary"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(summary.contains("NFE spent"), "summary: {summary:?}");
    let history = client.find_all(Locator::Css("#history li")).await.unwrap();
    assert!(!history.is_empty(), "the edit is in the history");

    screenshot(client, 1280, 1000, &artifacts.join("serve-page.png")).await;
    // Phone width: the screen as a phone shows it, scrolled to the result.
    set_viewport(client, 390, 844).await;
    eval(
        client,
        "document.getElementById('run').scrollIntoView({block: 'start'}); return null",
    )
    .await;
    let png = client.screenshot().await.unwrap();
    std::fs::write(artifacts.join("serve-page-phone.png"), png).unwrap();
    let layout = eval(
        client,
        "return {columns: getComputedStyle(document.getElementById('grid'))\
           .gridTemplateColumns.split(' ').length,\
         overflow: document.documentElement.scrollWidth - window.innerWidth}",
    )
    .await;
    assert!(
        layout["columns"].as_u64().is_some_and(|c| c <= 2),
        "at phone width the cards take one or two columns: {layout}"
    );
    assert!(
        layout["overflow"].as_i64().is_some_and(|o| o <= 0),
        "nothing is wider than a phone's screen: {layout}"
    );
    screenshot(
        client,
        390,
        844,
        &artifacts.join("serve-page-phone-full.png"),
    )
    .await;
}
