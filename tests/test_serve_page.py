"""The service's page in a real browser: headless Chromium (Debian's `chromium` package; .ci/run installs it) loads
the page of the session's `mirasol-serve` with a UDP source at real pace and shows what the service knows."""
from __future__ import annotations

import pytest

from .live_tools import free_udp_port, sender
from .serve_tools import Browser, chromium

pytest.importorskip("av")
QUESTION = "which colour appeared first?"


@pytest.mark.skipif(chromium() is None, reason="no chromium here (Debian: apt-get install chromium)")
def test_page_shows_sources_answers_alerts_latency_and_drops(served, short_clips) -> None:
    port = free_udp_port()
    served.ok("POST", "/sources", {"id": "page-cam", "url": f"udp://127.0.0.1:{port}"}, status=201)
    served.ok("POST", "/sources/page-cam/standing", {"question": QUESTION, "every": 2, "on": "every",
                                                     "max_new_tokens": 8}, status=201)
    browser = Browser(chromium())  # type: ignore[arg-type]
    send = sender(short_clips[12], f"udp://127.0.0.1:{port}")
    try:
        browser.open(f"{served.url}/#token={served.token}")
        row = 'document.querySelector(\'#sources tr[data-source="page-cam"]\')'

        def shown() -> dict | None:
            seen = browser.evaluate(f"""(() => {{
                const tr = {row};
                if (!tr) return null;
                const cell = (name) => tr.querySelector("." + name).textContent;
                return {{state: cell("state"), pushed: Number(cell("pushed")), dropped: cell("dropped"),
                         latency: cell("latency"), answer: cell("answer"), connection:
                         document.getElementById("connection").textContent,
                         alerts: [...document.querySelectorAll('#alerts li[data-source="page-cam"]')]
                                 .map((li) => li.textContent)}};
            }})()""")
            return seen if seen and seen["pushed"] >= 6 and seen["alerts"] and seen["answer"] else None

        seen = served.until(shown, 60, "the page to show the source, an answer and an alert")
        status = served.ok("GET", "/sources/page-cam")
    finally:
        send.kill()
        browser.close()
        served.call("DELETE", "/sources/page-cam")
    assert seen["connection"] == "live" and seen["state"] == "live"
    assert seen["pushed"] <= status["pushed"] and seen["dropped"] == str(status["dropped"])
    last, p95, bound = seen["latency"].split(" / ")  # "12 ms / 30 ms / 2000 ms"
    assert last.endswith(" ms") and p95.endswith(" ms") and bound == "2000 ms"
    assert QUESTION in seen["answer"] and "chunks " in seen["answer"] and "media " in seen["answer"]
    assert all(QUESTION in alert and "[every]" in alert and "newest" in alert for alert in seen["alerts"]), seen
