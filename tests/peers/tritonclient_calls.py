"""Run by the OIP peers' Python (.cache/oip-peers), never imported by the tests: Triton's own
gRPC client calls an OIP server and prints what it saw as one JSON object.

Usage: python tritonclient_calls.py ADDRESS MODEL INPUT ROWS.npy
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any

import numpy as np
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException


def _infer(
    client: triton.InferenceServerClient, model: str, name: str, x: np.ndarray, version: str = ""
) -> list[float]:
    tensor = triton.InferInput(name, list(x.shape), triton.np_to_triton_dtype(x.dtype))
    tensor.set_data_from_numpy(x)
    result = client.infer(model, [tensor], model_version=version)
    return [float(v) for v in result.as_numpy("score")]


def _status(call: Callable[[], Any]) -> dict[str, str]:
    try:
        call()
    except InferenceServerException as exc:
        return {"status": str(exc.status()), "message": str(exc.message())}
    return {"status": "OK", "message": ""}


def main(address: str, model: str, name: str, rows: str) -> None:
    x = np.load(rows).astype(np.float32)
    client = triton.InferenceServerClient(address)
    width = x.shape[1]
    out: dict[str, Any] = {
        "live": client.is_server_live(),
        "ready": client.is_server_ready(),
        "server": client.get_server_metadata(as_json=True),
        "model_ready": client.is_model_ready(model),
        "model_v1_ready": client.is_model_ready(model, "1"),
        "unknown_ready": client.is_model_ready("no-such-model"),
        "metadata": client.get_model_metadata(model, as_json=True),
        "scores": _infer(client, model, name, x),
        "scores_v1": _infer(client, model, name, x, version="1"),
        "errors": {
            "unknown_model": _status(lambda: _infer(client, "no-such-model", name, x)),
            "unknown_version": _status(lambda: _infer(client, model, name, x, version="99")),
            "bad_shape": _status(
                lambda: _infer(client, model, name, np.zeros((2, width + 1), np.float32))
            ),
            "bad_datatype": _status(lambda: _infer(client, model, name, x.astype(np.float64))),
            "bad_input_name": _status(lambda: _infer(client, model, "not-" + name, x)),
        },
    }
    client.close()
    print(json.dumps(out))


if __name__ == "__main__":
    main(*sys.argv[1:])
