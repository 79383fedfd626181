"""The WebSocket at /ws: events and questions over one connection, as JSON text messages.

    -> {"type": "subscribe", "sources": ["cam1"], "kinds": ["alert", "answer"]}     (both optional)
    <- {"type": "subscribed", "kinds": [...]}, then {"type": "event", "event": {...}} for each event
    -> {"type": "ask", "id": "q1", "source": "cam1", "question": "...", "max_new_tokens": 16}
    <- {"type": "token", "id": "q1", "text": "..."} ..., then {"type": "answer", "id": "q1", ...the answer record}
    <- {"type": "error", "id": "q1", "error": {"status": 400, "message": "..."}}   (a refused message)

Questions run concurrently with each other and with the event stream; a client that goes away cancels its
questions. Messages are bounded by the server's request size (uvicorn's ws_max_size).
"""
from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

from starlette.websockets import WebSocket, WebSocketDisconnect

from .fields import RequestError
from .hub import Subscription

Message = dict[str, Any]


async def serve_websocket(socket: WebSocket, service: Any,
                          subscribe: Callable[[Any, Any, Any], Subscription]) -> None:
    await socket.accept()
    loop = asyncio.get_running_loop()
    outbox: asyncio.Queue[Message] = asyncio.Queue()
    subscription: Subscription | None = None
    pump: asyncio.Task | None = None
    questions: set[asyncio.Task] = set()

    async def send_all() -> None:
        while True:
            await socket.send_text(json.dumps(await outbox.get()))

    async def forward(events: Subscription) -> None:
        while True:
            outbox.put_nowait({"type": "event", "event": await events.next()})

    async def ask(message: Message) -> None:
        ident = message.pop("id", None)
        source = message.pop("source", None)
        try:
            if not isinstance(source, str):
                raise RequestError(400, "'source' (a source id) is required")
            question = await service.ask(source, message, on_token=lambda text: loop.call_soon_threadsafe(
                outbox.put_nowait, {"type": "token", "id": ident, "text": text}))
            try:
                record = await service.answer(question)
            finally:
                question.future.cancel()
            if "error" in record:
                raise RequestError(400, record["error"])
            outbox.put_nowait({"type": "answer", "id": ident, **record})
        except RequestError as error:
            outbox.put_nowait({"type": "error", "id": ident, "error": {"status": error.status,
                                                                       "message": error.message}})

    sender = asyncio.create_task(send_all())
    try:
        while True:
            try:
                text = await socket.receive_text()
            except (WebSocketDisconnect, KeyError, RuntimeError):  # gone, or a binary frame
                return
            try:
                message = json.loads(text)
                if not isinstance(message, dict):
                    raise ValueError("not an object")
            except ValueError:
                outbox.put_nowait({"type": "error", "id": None,
                                   "error": {"status": 400, "message": "a message must be a JSON object"}})
                continue
            kind = message.pop("type", None)
            if kind == "subscribe":
                try:
                    new = subscribe(service, message.get("sources"), message.get("kinds"))
                except RequestError as error:
                    outbox.put_nowait({"type": "error", "id": None,
                                       "error": {"status": error.status, "message": error.message}})
                    continue
                if pump is not None:
                    pump.cancel()
                if subscription is not None:
                    subscription.close()
                subscription, pump = new, asyncio.create_task(forward(new))
                outbox.put_nowait({"type": "subscribed", "kinds": sorted(new.kinds)})
            elif kind == "ask":
                task = asyncio.create_task(ask(message))
                questions.add(task)
                task.add_done_callback(questions.discard)
            else:
                outbox.put_nowait({"type": "error", "id": message.get("id"), "error": {
                    "status": 400, "message": f"unknown message type {kind!r}: send 'subscribe' or 'ask'"}})
    finally:
        for task in (sender, pump, *questions):
            if task is not None:
                task.cancel()
        if subscription is not None:
            subscription.close()
