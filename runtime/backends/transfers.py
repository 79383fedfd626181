"""Counting the bytes a backend that keeps arrays on a device copies between host and device.

A backend counts each copy where it queues it (TensorRT: `runtime/tensorrt/cuda.py`; ONNX Runtime on a device:
`onnxruntime_device.py`), so a test or an app can assert how many bytes a chunk or a token moved.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field


@dataclass
class Transfers:
    """Bytes copied host -> device and device -> host, counted when the copy is made or queued; thread-safe.

    `parent` (if any) counts the same copies too: a session's counter adds to its backend's or the process's.
    """

    host_to_device: int = 0
    device_to_host: int = 0
    copies: int = 0
    parent: "Transfers | None" = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, to_device: bool, nbytes: int) -> None:
        with self._lock:
            if to_device:
                self.host_to_device += nbytes
            else:
                self.device_to_host += nbytes
            self.copies += 1
        if self.parent is not None:
            self.parent.add(to_device, nbytes)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return {"host_to_device": self.host_to_device, "device_to_host": self.device_to_host,
                    "copies": self.copies}
