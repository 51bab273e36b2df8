"""CUDA IPC weight payloads of ``/update_weights_from_tensor``: how the trainer writes them, and the only way the
engine reads them.

A CUDA tensor crosses processes as the arguments of torch's ``rebuild_cuda_tensor`` (made by
``torch.multiprocessing.reductions.reduce_tensor``): the IPC handle of the cudaMalloc block holding its storage,
the storage's offset and size in that block, a shared ref-counter slot and an IPC event. The engine maps the
block and views it: no copy, no host round trip. The producer must keep the tensor alive until the consumer has
let go (torch's ref counter keeps a freed block out of the producer's allocator until then). SGLang carries
these as a pickle, base64-encoded, one per tensor-parallel rank (``serialized_named_tensors``); so do we.

Unpickling runs code in general. ``decode_payload`` reads through ``WeightPayloadUnpickler``, whose
``find_class`` allows only:

- the CUDA tensor rebuild (torch's ``rebuild_cuda_tensor``, SGLang's UUID-patched variant, ours), each mapped to
  ``rebuild_shared_cuda_tensor``, which checks every argument's type before calling torch's;
- the classes those arguments name (``torch.Tensor``, ``Parameter``, the storage classes), handed over as inert
  markers that cannot be called;
- ``torch.Size``, torch dtypes and ``collections.OrderedDict``.

Anything else is refused naming it (``ForbiddenGlobal``). That rules out running code, not every harm: a caller
can still make the engine map GPU memory that another process of the same user shared, or fail. So the server
binds 127.0.0.1 by default; keep it away from callers you do not trust.

Devices travel as UUIDs in our payloads (``share_cuda_tensor``): an index names different GPUs in processes with
different ``CUDA_VISIBLE_DEVICES`` (Ray sets it per actor); SGLang's patched reductions do the same. Torch's own
integer index is accepted too.
"""

from __future__ import annotations

import base64
import binascii
import collections
import io
import pickle
from dataclasses import dataclass
from typing import Mapping

import torch
from torch.multiprocessing.reductions import rebuild_cuda_tensor as torch_rebuild_cuda_tensor
from torch.multiprocessing.reductions import reduce_tensor

DEVICE_ARG = 6  # position of the device among rebuild_cuda_tensor's arguments
NUM_REBUILD_ARGS = 15


class ForbiddenGlobal(ValueError):
    """The payload names a class or function outside the allowlist."""

    def __init__(self, qualified_name: str):
        super().__init__(f"refused to unpickle {qualified_name}: a weight payload may name only torch's CUDA tensor "
                         "rebuild and the classes it takes (weights/ipc.py)")
        self.qualified_name = qualified_name


@dataclass(frozen=True)
class ClassMarker:
    """A class a rebuild argument names (``torch.Tensor``, ``TypedStorage``), unpickled as an inert value: a
    payload can pass it along, not call it."""

    name: str


TENSOR_CLASSES = {("torch", "Tensor"), ("torch.nn.parameter", "Parameter")}
STORAGE_CLASSES = {("torch.storage", "TypedStorage"), ("torch.storage", "UntypedStorage"), ("torch", "UntypedStorage")}
REBUILD_FUNCTIONS = {
    ("torch.multiprocessing.reductions", "rebuild_cuda_tensor"),
    ("sglang.srt.patch_torch", "_rebuild_cuda_tensor_modified"),  # SGLang's device-UUID variant, by release
    ("sglang.srt.utils.patch_torch", "_rebuild_cuda_tensor_modified"),
    (__name__, "rebuild_shared_cuda_tensor"),
}
DTYPES = {name: value for name, value in vars(torch).items() if isinstance(value, torch.dtype)}


class WeightPayloadUnpickler(pickle.Unpickler):
    """Resolves only the globals a CUDA tensor payload needs (module docstring); refuses the rest by name."""

    def find_class(self, module: str, name: str):
        key = (module, name)
        if key in REBUILD_FUNCTIONS:
            return rebuild_shared_cuda_tensor
        if key in TENSOR_CLASSES or key in STORAGE_CLASSES:
            return ClassMarker(f"{module}.{name}")
        if key == ("torch", "Size"):
            return torch.Size
        if key == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch" and name in DTYPES:
            return DTYPES[name]
        raise ForbiddenGlobal(f"{module}.{name}")


def decode_payload(text: str):
    """One entry of ``serialized_named_tensors``: base64, then the restricted unpickler. Shared CUDA tensors are
    mapped as they are read. Raises ForbiddenGlobal, or ValueError for anything else malformed."""
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as error:
        raise ValueError(f"not base64: {error}") from None
    try:
        return WeightPayloadUnpickler(io.BytesIO(raw)).load()
    except ForbiddenGlobal:
        raise
    except (pickle.UnpicklingError, EOFError, TypeError, AttributeError, IndexError, KeyError) as error:
        raise ValueError(f"not a weight payload: {type(error).__name__}: {error}") from None


def rebuild_shared_cuda_tensor(*args) -> torch.Tensor:
    """Map a CUDA tensor another process shared (torch's ``rebuild_cuda_tensor`` arguments, the device as an
    index or a UUID), after checking every argument's type; always a plain tensor without grad."""
    if len(args) != NUM_REBUILD_ARGS:
        raise ValueError(f"a shared CUDA tensor takes {NUM_REBUILD_ARGS} rebuild arguments, got {len(args)} (do the "
                         "trainer and the engine run the same torch?)")
    for (what, accepts), value in zip(_REBUILD_ARG_CHECKS, args):
        if not accepts(value):
            raise ValueError(f"rebuild argument {what!r} is malformed: {type(value).__name__} {value!r:.80}")
    args = list(args)
    args[0], args[4], args[10] = torch.Tensor, torch.storage.TypedStorage, False
    args[DEVICE_ARG] = device_index(args[DEVICE_ARG])
    return torch_rebuild_cuda_tensor(*args)


def _is_count(value) -> bool:
    return type(value) is int and value >= 0


def _is_ints(value) -> bool:
    return isinstance(value, tuple) and all(type(v) is int for v in value)


def _is_marker(names: set[tuple[str, str]]):
    qualified = {f"{module}.{name}" for module, name in names}
    return lambda value: isinstance(value, ClassMarker) and value.name in qualified


_REBUILD_ARG_CHECKS = (
    ("tensor class", _is_marker(TENSOR_CLASSES)), ("size", _is_ints), ("stride", _is_ints),
    ("tensor offset", _is_count), ("storage class", _is_marker(STORAGE_CLASSES)),
    ("dtype", lambda v: isinstance(v, torch.dtype)), ("device", lambda v: _is_count(v) or isinstance(v, str)),
    ("storage handle", lambda v: isinstance(v, bytes)), ("storage size", _is_count), ("storage offset", _is_count),
    ("requires_grad", lambda v: isinstance(v, bool)), ("ref-counter handle", lambda v: isinstance(v, bytes)),
    ("ref-counter offset", _is_count), ("event handle", lambda v: v is None or isinstance(v, bytes)),
    ("event sync", lambda v: isinstance(v, bool)),
)


def device_index(device: int | str) -> int:
    """This process's index of a CUDA device given by index or by UUID."""
    if isinstance(device, int):
        return device
    for index in range(torch.cuda.device_count()):
        if str(torch.cuda.get_device_properties(index).uuid) == device:
            return index
    raise ValueError(f"no CUDA device with UUID {device} is visible to the engine (is it on the trainer's host?)")


# ---- the trainer's side --------------------------------------------------------------------------------------
class SharedCudaTensor:
    """A CUDA tensor's IPC handle that pickles as a call to ``rebuild_shared_cuda_tensor`` (device by UUID)."""

    def __init__(self, rebuild_args: tuple):
        self.rebuild_args = rebuild_args

    def __reduce__(self):
        return rebuild_shared_cuda_tensor, self.rebuild_args


def share_cuda_tensor(tensor: torch.Tensor) -> SharedCudaTensor:
    """The IPC handle of a CUDA tensor; keep the tensor alive until every engine has answered."""
    if tensor.device.type != "cuda":
        raise ValueError(f"CUDA IPC shares GPU memory only; this tensor is on {tensor.device}")
    _, args = reduce_tensor(tensor.detach())
    args = list(args)
    if isinstance(args[DEVICE_ARG], int):  # a UUID already where SGLang patched torch's reductions in this process
        args[DEVICE_ARG] = str(torch.cuda.get_device_properties(args[DEVICE_ARG]).uuid)
    return SharedCudaTensor(tuple(args))


def encode_payload(obj) -> str:
    """One entry of ``serialized_named_tensors``."""
    return base64.b64encode(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)).decode("ascii")


# ---- what the engine accepts ---------------------------------------------------------------------------------
def flat_buffer(payload, num_bytes: int) -> torch.Tensor:
    """The flattened-bucket form's payload: one uint8 tensor of at least ``num_bytes``; its first ``num_bytes``."""
    if not isinstance(payload, torch.Tensor) or payload.dtype != torch.uint8 or payload.dim() != 1:
        raise ValueError(f"load_format flattened_bucket takes one 1-d uint8 tensor, got {_describe(payload)}")
    if payload.numel() < num_bytes:
        raise ValueError(f"the shared buffer holds {payload.numel()} bytes; the layout needs {num_bytes}")
    return payload[:num_bytes]


def named_tensors(payload) -> dict[str, torch.Tensor]:
    """SGLang's form: a list of (name, tensor) pairs (a mapping of them is taken too)."""
    pairs = list(payload.items()) if isinstance(payload, Mapping) else payload
    if not isinstance(pairs, (list, tuple)) or not pairs:
        raise ValueError("the per-tensor form takes a non-empty list of (name, tensor) pairs, got "
                         f"{_describe(payload)}")
    named = {}
    for index, pair in enumerate(pairs):
        if not (isinstance(pair, tuple) and len(pair) == 2 and isinstance(pair[0], str)
                and isinstance(pair[1], torch.Tensor)):
            raise ValueError(f"entry {index} is not a (name, tensor) pair: {_describe(pair)}")
        if pair[0] in named:
            raise ValueError(f"tensor {pair[0]!r} appears twice")
        named[pair[0]] = pair[1]
    return named


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return type(value).__name__
