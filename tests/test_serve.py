"""`mirasol-serve` end to end: a real server process, its HTTP API, SSE and WebSocket, real senders on loopback.

One server for the session (`served` in conftest.py: the 0.25 s-chunk bundle, a token, stall timeout 1 s);
`python -m mirasol.runtime.media.sender` sends MPEG-TS at real-time pace to UDP ports it listens on.
"""
from __future__ import annotations

import json

import pytest

from mirasol.runtime.pipeline import Pipeline

from .live_tools import free_udp_port, sender

pytest.importorskip("av")
prometheus = pytest.importorskip("prometheus_client.parser")
QUESTION = "which colour appeared first?"
STAMPS = "X-Mirasol-Stamps"


def test_every_error_is_json_with_the_status_that_says_whose_fault(served) -> None:
    def refused(status: int, words: str, *args, **kwargs) -> None:
        code, data, headers = served.call(*args, **kwargs)
        assert code == status and headers["content-type"] == "application/json", (code, data)
        assert data["error"]["status"] == status and words in data["error"]["message"], data

    assert served.call("GET", "/healthz", token=None)[:2] == (200, {"status": "ok"})
    assert served.call("GET", "/", token=None)[0] == 200  # the page itself holds no data
    refused(401, "token is required", "GET", "/sources", token=None)
    refused(401, "token is required", "GET", "/metrics", token="wrong-token-0123456789")
    refused(404, "no route /nowhere", "GET", "/nowhere")
    refused(405, "Method Not Allowed", "PUT", "/sources")
    refused(404, "no source 'ghost'", "POST", "/sources/ghost/ask", {"question": QUESTION})
    refused(415, "send JSON", "POST", "/sources", raw=b"url=udp://127.0.0.1:9",
            headers={"Content-Type": "application/x-www-form-urlencoded"})
    refused(400, "not JSON", "POST", "/sources", raw=b"{", headers={"Content-Type": "application/json"})
    refused(400, "NaN", "POST", "/sources", raw=b'{"url": "udp://127.0.0.1:9", "latency_bound": NaN}',
            headers={"Content-Type": "application/json"})
    refused(400, "'latency_bound' must be in [0.01, 3600]", "POST", "/sources",
            {"url": "udp://127.0.0.1:9", "latency_bound": 1e308})
    refused(400, "unknown field(s) 'lateny_bound'", "POST", "/sources", {"url": "udp://127.0.0.1:9", "lateny_bound": 1})
    refused(400, "unsupported scheme ftp://", "POST", "/sources", {"url": "ftp://127.0.0.1/x"})
    refused(400, "unsupported scheme file://", "POST", "/sources", {"url": "file:///etc/passwd"})
    refused(403, "not for clients", "POST", "/sources",
            {"url": "udp://127.0.0.1:9", "options": {"protocol_whitelist": "file"}})
    refused(413, "the most is 65536", "POST", "/sources", raw=b" " * 70_000,
            headers={"Content-Type": "application/json"})
    refused(400, "'id' must be", "POST", "/sources", {"id": "../x", "url": "udp://127.0.0.1:9"})
    port = free_udp_port()
    served.ok("POST", "/sources", {"id": "idle", "url": f"udp://127.0.0.1:{port}"}, status=201)
    try:
        refused(409, "exists already", "POST", "/sources", {"id": "idle", "url": f"udp://127.0.0.1:{port}"})
        refused(409, "has pushed no chunk yet", "POST", "/sources/idle/ask", {"question": QUESTION})
        refused(413, "the most is 1000", "POST", "/sources/idle/ask", {"question": "x" * 1001})
        refused(400, "'question' is empty", "POST", "/sources/idle/ask", {"question": " "})
        refused(400, "'max_new_tokens' must be an integer", "POST", "/sources/idle/ask",
                {"question": QUESTION, "max_new_tokens": 2.5})
        refused(400, "'pattern' goes with", "POST", "/sources/idle/standing", {"question": QUESTION, "on": "change",
                                                                              "pattern": "yes"})
        refused(400, "no webhook", "POST", "/sources/idle/standing", {"question": QUESTION, "webhook": True})
        refused(400, "not a state of this bundle's stream", "PUT", "/sources/idle/state", raw=b"not an npz",
                headers={"Content-Type": "application/octet-stream"})
    finally:
        served.ok("DELETE", "/sources/idle")
    refused(404, "no source 'idle'", "GET", "/sources/idle")


def test_a_local_path_needs_the_operator(live_bundles, tmp_path) -> None:
    """Without --allow-local-sources a client may not read this machine's files; beyond loopback a token is a must."""
    from mirasol.runtime.cli.serve import main

    from .serve_tools import Server

    assert main([str(live_bundles["short"]), "--host", "0.0.0.0", "-q"]) == 2  # no token
    server = Server(live_bundles["short"], "-q", token=None)
    try:
        code, data, _ = server.call("POST", "/sources", {"url": str(tmp_path)})
        assert code == 403 and "--allow-local-sources" in data["error"]["message"]
        assert server.call("GET", "/sources")[0] == 200  # no token on loopback
    finally:
        assert server.close() == 0


def test_sources_questions_standing_alerts_snapshot_metrics(served, live_bundles, short_clips, tmp_path) -> None:
    """A UDP source at real pace: a standing question every 2 chunks fires with the times of the chunks it rests
    on; questions answered whole, over SSE and over the WebSocket; the state moves to another source; metrics."""
    port = free_udp_port()
    with served.websocket() as ws:
        ws.send(json.dumps({"type": "subscribe", "sources": ["cam1"], "kinds": ["chunk", "alert", "source"]}))
        assert json.loads(ws.recv(timeout=10))["type"] == "subscribed"
        added = served.ok("POST", "/sources", {"id": "cam1", "url": f"udp://127.0.0.1:{port}"}, status=201)
        assert added["state"] == "connecting" and added["source"]["reconnect"] == "forever"
        standing = served.ok("POST", "/sources/cam1/standing", {"question": QUESTION, "every": 2, "on": "every",
                                                                "max_new_tokens": 8}, status=201)
        send = sender(short_clips[12], f"udp://127.0.0.1:{port}")
        chunks: dict[int, dict] = {}
        alerts: list[dict] = []
        try:
            while len(alerts) < 3:
                event = json.loads(ws.recv(timeout=60))["event"]
                if event["event"] == "chunk":
                    chunks[event["index"]] = event
                elif event["event"] == "alert":
                    alerts.append(event)
            for alert in alerts:  # asked right after every 2nd chunk: its evidence ends with that chunk
                evidence = alert["evidence"]
                last, first = evidence["last_chunk"], evidence["first_chunk"]
                assert (last + 1) % 2 == 0 and first == max(0, last - 7) and evidence["chunks"] == last - first + 1
                assert (evidence["media_start_s"], evidence["media_end_s"]) == (chunks[first]["media_s"][0],
                                                                                chunks[last]["media_s"][1])
                assert alert["standing"] == standing["id"] and alert["rule"] == "every"
                assert 0 <= evidence["newest_age_ms"] < 2000
            lasts = [a["evidence"]["last_chunk"] for a in alerts]
            assert lasts == sorted(set(lasts))  # (one due while the last was still being answered is skipped)

            whole = served.ok("POST", "/sources/cam1/ask", {"question": QUESTION, "max_new_tokens": 8})
            assert whole["evidence"]["last_chunk"] >= 5 and whole["kind"] == "question" and "answer" in whole
            streamed = list(served.sse("POST", "/sources/cam1/ask", {"question": QUESTION, "max_new_tokens": 8,
                                                                    "stream": True}))
            assert streamed[-1][0] == "answer"
            assert "".join(d["text"] for e, d in streamed if e == "token") == streamed[-1][1]["answer"]
            ws.send(json.dumps({"type": "ask", "id": "q1", "source": "cam1", "question": QUESTION,
                                "max_new_tokens": 8}))
            tokens, reply = [], None
            while reply is None:
                message = json.loads(ws.recv(timeout=30))
                if message.get("id") == "q1":
                    tokens += [message["text"]] if message["type"] == "token" else []
                    reply = message if message["type"] in ("answer", "error") else None
            assert reply["type"] == "answer" and "".join(tokens) == reply["answer"]
        finally:
            send.kill()
        ws.send(json.dumps({"type": "ask", "source": "cam1"}))
        assert json.loads(ws.recv(timeout=10))["error"]["status"] == 400

    # snapshot and restore: the state moves to another source; the same greedy answer as the state here
    code, state, headers = served.call("GET", "/sources/cam1/state")
    assert code == 200 and headers["content-type"] == "application/octet-stream"
    stamps = json.loads(headers[STAMPS.lower()])
    served.ok("POST", "/sources", {"id": "moved", "url": f"udp://127.0.0.1:{free_udp_port()}"}, status=201)
    code, restored, _ = served.call("PUT", "/sources/moved/state", raw=state,
                                    headers={"Content-Type": "application/octet-stream", STAMPS: json.dumps(stamps)})
    assert code == 200 and restored["stamps"] == len(stamps) == min(8, restored["restored_chunks"])
    (tmp_path / "state.npz").write_bytes(state)
    expected = Pipeline.load(live_bundles["short"]).restore(tmp_path / "state.npz")
    moved = served.ok("POST", "/sources/moved/ask", {"question": QUESTION, "max_new_tokens": 8})
    assert moved["answer"] == expected.ask(QUESTION, max_new_tokens=8)
    assert restored["restored_chunks"] == expected.chunks
    assert (moved["evidence"]["first_chunk"], moved["evidence"]["last_chunk"]) == (stamps[0]["index"],
                                                                                  stamps[-1]["index"])
    served.ok("DELETE", "/sources/moved")

    # metrics: Prometheus text that prometheus_client's parser reads, agreeing with the API
    code, text, headers = served.call("GET", "/metrics")
    assert code == 200 and headers["content-type"].startswith("text/plain")
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in prometheus.text_string_to_metric_families(text.decode()) for s in family.samples}
    status = served.ok("GET", "/sources/cam1")
    pushed = samples[("mirasol_source_chunks_pushed_total", (("source", "cam1"),))]
    assert 12 >= status["pushed"] >= pushed >= 6
    assert samples[("mirasol_chunk_latency_seconds_count", (("source", "cam1"),))] == pushed
    assert samples[("mirasol_answer_seconds_count", (("kind", "standing"),))] >= 3
    assert samples[("mirasol_standing_chunks_total", (("source", "cam1"), ("standing", "standing-1")))] >= 6
    assert samples[("mirasol_source_queue_size", (("source", "cam1"),))] == 8
    assert ("mirasol_push_batch_size_count", ()) in samples and ("mirasol_backend_seconds_total", (("step", "push"),)) \
        in samples
    listed = served.ok("GET", "/sources/cam1/standing")["standing"][0]
    assert listed["alerts"] == listed["asked"] >= 3 and listed["cost_ms_per_chunk"] > 0
    assert listed["asked"] + listed["skipped"] == listed["chunks"] // 2
    summary = served.ok("DELETE", "/sources/cam1")
    assert summary["ended"] == "removed" and summary["pushed"] >= pushed


def test_many_sources_in_batches_and_one_that_fails(served, short_clips, tmp_path) -> None:
    """Three UDP sources at once are pushed together (batches of more than one chunk); a source given up
    (reconnect 0, nothing sending) is reported failed, not silently gone."""
    code, before, _ = served.call("GET", "/metrics")
    ports = [free_udp_port() for _ in range(3)]
    for i, port in enumerate(ports):
        served.ok("POST", "/sources", {"id": f"many-{i}", "url": f"udp://127.0.0.1:{port}"}, status=201)
    served.ok("POST", "/sources", {"id": "dead", "url": f"tcp://127.0.0.1:{free_udp_port()}", "reconnect": 0},
              status=201)
    send = sender(short_clips[8], *[f"udp://127.0.0.1:{port}" for port in ports])
    try:
        served.until(lambda: all(served.ok("GET", f"/sources/many-{i}")["pushed"] == 8 for i in range(3)), 30,
                     "8 chunks of each source")
        dead = served.until(lambda: (s := served.ok("GET", "/sources/dead"))["state"] == "failed" and s, 20, "failed")
        assert "Connection refused" in dead["error"]
    finally:
        send.kill()
    code, after, _ = served.call("GET", "/metrics")

    def batches(text: bytes) -> tuple[float, float]:
        found = {s.name: s.value for f in prometheus.text_string_to_metric_families(text.decode()) for s in f.samples
                 if s.name in ("mirasol_push_batch_size_sum", "mirasol_push_batch_size_count")}
        return found["mirasol_push_batch_size_sum"], found["mirasol_push_batch_size_count"]

    (sum0, count0), (sum1, count1) = batches(before), batches(after)
    assert sum1 - sum0 == 24 and count1 - count0 < 24  # 24 chunks in fewer push calls
    for name in ("many-0", "many-1", "many-2", "dead"):
        served.ok("DELETE", f"/sources/{name}")
