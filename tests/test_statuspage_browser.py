"""The status page in headless Chromium, against a real supervisor.

The test starts the daemon and the page's own process, loads the page in
Debian's chromium through the DevTools protocol (tests/cdp.py), compares the
DOM with ``herd --json status``, restarts a service with ``herd`` and watches
the page change without a reload.  With ``STATUSPAGE_SCREENSHOT=FILE`` it
also saves a screenshot there (docs/status-page.png is made so).
"""

from __future__ import annotations

import base64
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cdp import Browser
from helpers import SLEEP, Supervisor, wait_until
from statuspage_proc import StatusPage


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Browser]:
    b = Browser(tmp_path / "chromium-profile")
    try:
        yield b
    finally:
        b.close()


def config(sup: Supervisor) -> dict:
    talk = ("echo db ready; echo 'disk almost full' >&2; "
            "echo '<img src=x onerror=\"window.__pwned=1\"><script>window.__pwned=2</script>'; "
            "exec sleep 1000000")
    return {"services": {
        "db": {"command": ["/bin/sh", "-c", talk], "environment": {"SVTEST_MARKER": sup.marker("db")}},
        "web": {"command": ["/bin/sh", "-c", "echo serving; exec " + SLEEP + " 1000000"], "requires": ["db"],
                "environment": {"SVTEST_MARKER": sup.marker("web")}},
        "cache": {"command": [SLEEP, "1000000"], "requires": ["db"], "provides": ["memo"],
                  "environment": {"SVTEST_MARKER": sup.marker("cache")}},
        "api": {"command": [SLEEP, "1000000"], "requires": ["web", "cache"],
                "environment": {"SVTEST_MARKER": sup.marker("api")}},
        "report": {"command": ["/bin/true"], "one-shot": True},
        "spare": {"command": [SLEEP, "1000000"], "auto-start": False},
    }}


ROWS_JS = """[...document.querySelectorAll('section.host[data-host="local"] tr.svc')].map(r => ({
  name: r.dataset.service, state: r.dataset.state,
  pid: r.dataset.pid === '' ? null : Number(r.dataset.pid), enabled: r.dataset.enabled === 'true'}))"""


def dom_rows(browser: Browser) -> list[dict]:
    return browser.eval(ROWS_JS) or []


def herd_rows(sup: Supervisor) -> list[dict]:
    services = sup.herd("status", json=True, check=True).data["services"]
    return [{"name": s["name"], "state": s["state"], "pid": s["pid"], "enabled": s["enabled"]} for s in services]


def test_page_shows_the_supervisor_live(sup: Supervisor, browser: Browser, tmp_path: Path) -> None:
    sup.start(config(sup))
    wait_until(lambda: all(s["state"] == "running" for n, s in sup.status().items() if n in ("db", "web", "cache", "api")),
               15, "the services running")
    page = StatusPage("-s", str(sup.status_socket))
    try:
        browser.call("Page.enable")
        started = time.monotonic()
        browser.call("Page.navigate", url=page.url)
        wait_until(lambda: len(dom_rows(browser)) == 6, 30, "six service rows in the page")
        first_paint = time.monotonic() - started

        # The DOM says what `herd --json status` says.
        wait_until(lambda: dom_rows(browser) == herd_rows(sup), 10, "the DOM to match herd --json status")
        # The page came from our server alone: no request left 127.0.0.1.
        origins = browser.eval("[...new Set(performance.getEntriesByType('resource').map(e => new URL(e.name).origin))]")
        assert origins == [page.url.rstrip("/")], origins

        # The supervisor's own state.
        ping = sup.herd("ping", json=True, check=True).data
        head = browser.eval("document.querySelector('section.host[data-host=\"local\"] [data-field=pid]').textContent")
        assert head == str(ping["pid"])
        assert browser.eval("document.querySelector('section.host').dataset.connected") == "true"

        # The dependency graph: one node per service, one edge per requirement.
        edges = browser.eval("[...document.querySelectorAll('svg.graph path.edge')].map(p => p.dataset.from + '>' + p.dataset.to).sort()")
        assert edges == sorted(["web>db", "cache>db", "api>web", "api>cache"])
        nodes = browser.eval("[...document.querySelectorAll('svg.graph g.node')].map(g => g.dataset.node).sort()")
        assert nodes == sorted(r["name"] for r in herd_rows(sup))

        # Each service's recent log (stdout, stderr, the supervisor's own lines).
        db_log = browser.eval("document.querySelector('tr.log-row[data-log-for=\"db\"]').textContent")
        assert "db ready" in db_log and "disk almost full" in db_log
        # What a service prints is text, never markup.
        assert '<img src=x onerror="window.__pwned=1"><script>' in db_log
        assert browser.eval("document.querySelectorAll('pre.log img, pre.log script').length") == 0
        assert browser.eval("typeof window.__pwned") == "undefined"

        # A restart through herd: the page follows, without a reload.
        browser.eval("window.__notReloaded = 'yes'")
        old = sup.status("web")["pid"]
        sup.herd("restart", "web", check=True)
        new = sup.status("web")["pid"]
        assert new != old
        wait_until(lambda: {r["name"]: r["pid"] for r in dom_rows(browser)}["web"] == new, 10,
                   "the new pid of web in the page")
        assert browser.eval("window.__notReloaded") == "yes"
        wait_until(lambda: dom_rows(browser) == herd_rows(sup), 10, "the DOM to match herd after the restart")
        # New log lines arrive too.
        wait_until(lambda: browser.eval(
            "document.querySelector('tr.log-row[data-log-for=\"web\"]').textContent").count("serving") >= 2,
            10, "the restarted web's 'serving' line in the page")

        # A stop, a disable: the same.
        sup.herd("stop", "cache", check=True)
        sup.herd("disable", "spare", check=True)
        wait_until(lambda: dom_rows(browser) == herd_rows(sup), 10, "the DOM to match herd after stop/disable")
        assert browser.eval("window.__notReloaded") == "yes"
        assert first_paint < 30  # generous: what is measured closely is the HTTP time (test_statuspage_http)

        shot = os.environ.get("STATUSPAGE_SCREENSHOT")
        browser.eval("document.querySelector('tr.svc[data-service=\"db\"]').click()")
        png = base64.b64decode(browser.call("Page.captureScreenshot", format="png")["data"])
        assert png.startswith(b"\x89PNG\r\n\x1a\n")
        (tmp_path / "status-page.png").write_bytes(png)
        if shot:
            Path(shot).write_bytes(png)
    finally:
        page.close()


def test_page_says_when_the_supervisor_is_down(sup: Supervisor, browser: Browser) -> None:
    sup.start({"services": {"one": {"command": [SLEEP, "1000000"]}}})
    page = StatusPage("-s", str(sup.status_socket))
    try:
        browser.call("Page.navigate", url=page.url)
        wait_until(lambda: len(dom_rows(browser)) == 1, 30, "the row of 'one'")
        browser.eval("window.__notReloaded = 'yes'")
        assert sup.stop() == 0
        wait_until(lambda: browser.eval("document.querySelector('section.host').dataset.connected") == "false",
                   15, "the page to show the supervisor down")
        error = browser.eval("document.querySelector('[data-field=error]').textContent")
        assert str(sup.status_socket) in error
        assert browser.eval("window.__notReloaded") == "yes"
    finally:
        page.close()


def test_write_actions_from_the_page(sup: Supervisor, browser: Browser, tmp_path: Path) -> None:
    sup.start({"services": {"db": {"command": [SLEEP, "1000000"]},
                            "web": {"command": [SLEEP, "1000000"], "requires": ["db"]}}})
    wait_until(lambda: all(s["state"] == "running" for s in sup.status().values()), 15, "the services running")
    token = tmp_path / "token"
    token.write_text("operator-token-0123456789abcdef\n")
    token.chmod(0o600)
    page = StatusPage("-s", str(sup.status_socket), "--allow-writes", "--token-file", str(token),
                      "--control-socket", str(sup.socket))
    try:
        browser.call("Page.navigate", url=page.url)
        wait_until(lambda: len(dom_rows(browser)) == 2, 30, "the rows")
        # Logged out: a login form, no action buttons.
        assert browser.eval("document.querySelectorAll('button[data-action]').length") == 0
        browser.eval("document.querySelector('#auth input[name=token]').value = 'operator-token-0123456789abcdef';"
                     "document.querySelector('#auth form').submit()")
        wait_until(lambda: browser.eval("document.querySelectorAll('tr.svc[data-service=\"web\"] button[data-action]').length") == 5,
                   30, "the action buttons after login")
        old = sup.status("web")["pid"]
        browser.eval("document.querySelector('tr.svc[data-service=\"web\"] button[data-action=\"restart\"]').click()")
        wait_until(lambda: sup.status("web")["pid"] != old, 15, "web restarted from the page")
        new = sup.status("web")["pid"]
        wait_until(lambda: {r["name"]: r["pid"] for r in dom_rows(browser)}["web"] == new, 10, "the new pid shown")
        wait_until(lambda: not browser.eval("document.getElementById('toast').classList.contains('bad')") and
                   "web" in browser.eval("document.getElementById('toast').textContent"), 10, "the reply shown")
    finally:
        page.close()
