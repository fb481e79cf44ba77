"""The KServe v2 inference protocol as Triton Inference Server speaks it over HTTP/REST, with Triton's binary tensor
data extension: what `tritonclient.http` sends and expects.

A request body is JSON `{"id", "inputs": [{"name", "shape", "datatype", "data" | "parameters": {"binary_data_size"}}],
"outputs": [{"name", "parameters": {"binary_data"}}], "parameters"}`. With binary data, the header
`Inference-Header-Content-Length` gives the JSON's length and the raw tensors follow it, in input order, row-major
little-endian. Responses mirror this: `{"model_name", "model_version", "id", "outputs": [...]}`.
Only numeric tensors (no BYTES) are needed by the FasterTransformer GPT model.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np

HEADER_LENGTH = "Inference-Header-Content-Length"
DATATYPES = {
    "BOOL": np.dtype(np.bool_), "UINT8": np.dtype("<u1"), "UINT16": np.dtype("<u2"), "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"), "INT8": np.dtype("<i1"), "INT16": np.dtype("<i2"), "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"), "FP16": np.dtype("<f2"), "FP32": np.dtype("<f4"), "FP64": np.dtype("<f8"),
}
_NAME_OF = {dtype: name for name, dtype in DATATYPES.items()}


class ProtocolError(ValueError):
    """A malformed request: answered with HTTP 400 and the message, the server goes on."""


@dataclass
class InferRequest:
    id: str | None
    inputs: dict[str, np.ndarray]
    requested: dict[str, bool] | None  # output name -> binary; None: every output, binary per `binary_default`
    binary_default: bool


def datatype_of(array: np.ndarray) -> str:
    try:
        return _NAME_OF[array.dtype.newbyteorder("<")] if array.dtype != np.bool_ else "BOOL"
    except KeyError:
        raise ProtocolError(f"no protocol datatype for numpy dtype {array.dtype}") from None


def _shape(entry: dict, name: str) -> list[int]:
    shape = entry.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in shape):
        raise ProtocolError(f"input '{name}': shape must be a list of non-negative integers, got {shape!r}")
    return shape


def decode_request(body: bytes, header_length: int | None = None) -> InferRequest:
    """Parse an infer request body (JSON, or JSON + binary tensors when header_length is given)."""
    if header_length is not None and not 0 < header_length <= len(body):
        raise ProtocolError(f"{HEADER_LENGTH}={header_length} does not fit a body of {len(body)} bytes")
    head, binary = (body[:header_length], body[header_length:]) if header_length is not None else (body, b"")
    try:
        obj = json.loads(head)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"request is not valid JSON: {exc}") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("inputs"), list):
        raise ProtocolError("request JSON must be an object with an 'inputs' list")
    inputs, offset = {}, 0
    for entry in obj["inputs"]:
        name = entry.get("name") if isinstance(entry, dict) else None
        if not isinstance(name, str):
            raise ProtocolError(f"every input needs a 'name', got {entry!r:.80}")
        if name in inputs:
            raise ProtocolError(f"input '{name}' is given twice")
        datatype = entry.get("datatype")
        if datatype not in DATATYPES:
            raise ProtocolError(f"input '{name}': datatype {datatype!r} is not one of {sorted(DATATYPES)}")
        dtype, shape = DATATYPES[datatype], _shape(entry, name)
        count = math.prod(shape)
        size = (entry.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            if size != count * dtype.itemsize:
                raise ProtocolError(f"input '{name}': binary_data_size {size} != {count} x {datatype} "
                                    f"({count * dtype.itemsize} bytes) for shape {shape}")
            if offset + size > len(binary):
                raise ProtocolError(f"input '{name}': the body ends before its {size} bytes of binary data")
            array = np.frombuffer(binary, dtype=dtype, count=count, offset=offset).reshape(shape)
            offset += size
        else:
            if "data" not in entry:
                raise ProtocolError(f"input '{name}' has neither 'data' nor binary_data_size")
            try:
                array = np.asarray(entry["data"], dtype=dtype).reshape(-1)
            except (ValueError, TypeError) as exc:
                raise ProtocolError(f"input '{name}': data are not {datatype} values: {exc}") from None
            if array.size != count:
                raise ProtocolError(f"input '{name}': {array.size} values for shape {shape} ({count})")
            array = array.reshape(shape)
        inputs[name] = array
    if offset != len(binary):
        raise ProtocolError(f"{len(binary) - offset} bytes of binary data belong to no input")
    requested = None
    if obj.get("outputs") is not None:
        requested = {}
        for entry in obj["outputs"]:
            if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
                raise ProtocolError(f"every requested output needs a 'name', got {entry!r:.80}")
            requested[entry["name"]] = bool((entry.get("parameters") or {}).get("binary_data", False))
    binary_default = bool((obj.get("parameters") or {}).get("binary_data_output", False))
    request_id = obj.get("id")
    return InferRequest(str(request_id) if request_id is not None else None, inputs, requested, binary_default)


def encode_response(model_name: str, model_version: str, request_id: str | None, outputs: dict[str, np.ndarray],
                    binary: dict[str, bool]) -> tuple[bytes, dict[str, str]]:
    """(body, headers) of an infer response; outputs named in `binary` with True go as raw bytes after the JSON."""
    entries, blobs = [], []
    for name, array in outputs.items():
        entry = {"name": name, "datatype": datatype_of(array), "shape": list(array.shape)}
        if binary.get(name):
            raw = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            entry["data"] = array.reshape(-1).tolist()
        entries.append(entry)
    response = {"model_name": model_name, "model_version": model_version, "outputs": entries}
    if request_id is not None:
        response["id"] = request_id
    head = json.dumps(response).encode()
    if not blobs:
        return head, {"Content-Type": "application/json"}
    return head + b"".join(blobs), {"Content-Type": "application/octet-stream", HEADER_LENGTH: str(len(head))}
