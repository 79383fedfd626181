"""The decoupled model (`mirasol-triton --decoupled`): the answer's text sent as it is generated, as Triton's own
LLM backends do, over a gRPC stream (Triton's HTTP endpoint refuses decoupled models).

Each request gets zero or more responses holding `PIECE` (the answer's next text, whole UTF-8 characters), then one
final response (flag TRITONSERVER_RESPONSE_COMPLETE_FINAL) holding what the plain model returns: `CONTEXT`, `ANSWER`
(the whole answer) and `CHUNKS` — or the request's error. All of a batch's responses are sent before `execute`
returns, so Triton's sequence batcher still hands each sequence its next request only after this one is done.
"""
from __future__ import annotations

from typing import Any

import numpy as np


def execute_decoupled(model: Any, requests: list[Any]) -> None:
    """Serve `requests` for `model` (a TritonPythonModel), sending every response through the requests' senders."""
    pb = model.pb
    senders = [request.get_response_sender() for request in requests]

    def on_text(i: int, text: str) -> None:
        piece = pb.Tensor("PIECE", np.array([[text.encode("utf-8")]], dtype=np.object_))
        senders[i].send(pb.InferenceResponse([piece]))

    for request, sender, reply in zip(requests, senders, model.serve(requests, on_text)):
        try:
            sender.send(model.response(reply), flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        except Exception as error:  # the client has gone (a cancelled stream): the other requests are still sent
            pb.Logger.log_warn(f"mirasol: sequence {request.correlation_id()!r}, request {request.request_id()!r}: "
                               f"the final response could not be sent: {error}")
