"""mirasol.runtime.serve: `mirasol-serve`, many live sources over HTTP on one Pipeline (the [serve] extra).

The room (the command itself is `runtime/cli/serve.py`): `app.py` (the HTTP routes, the token, JSON errors),
`websocket.py` (/ws), `service.py` (what the routes ask: checks and limits, then work for the inference thread),
`scheduler.py`
(the inference thread: fair batched pushes, questions token by token, standing questions), `sources.py`
(which sources a client may add, a source's state), `standing.py` (alert rules, the webhook), `hub.py`
(events to SSE and WebSocket subscribers), `metrics.py` (Prometheus), `fields.py` (request bodies),
`page.html` (the page, no build step), `load.py` (the load figure). Decoding, queues, drop policies and
telemetry per source are the live path's (`runtime/media/feed.py`); no PyTorch anywhere.
"""
