"""Device strings, parsed and canonicalised as TensorFlow spells them.

``gpu:1``, ``/gpu:1``, ``/device:GPU:1``, ``cuda:1`` and
``/job:localhost/replica:0/task:0/device:GPU:1`` all name the same device,
whose canonical form is the last one. Variables are grouped by canonical
device; the sorted groups become the shards of a sharded save.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from gpusaver.errors import InvalidArgumentError, InvalidArgumentTypeError

__all__ = ["DeviceSpec", "parse_device", "canonical_device", "CPU0"]

_TYPES = {"cpu": "CPU", "gpu": "GPU", "cuda": "GPU"}
_FIELD = re.compile(r"^(job|replica|task|device):(.*)$", re.IGNORECASE)


@dataclass(frozen=True, order=True)
class DeviceSpec:
    """A fully specified device."""

    job: str = "localhost"
    replica: int = 0
    task: int = 0
    device_type: str = "CPU"
    index: int = 0

    @property
    def canonical(self) -> str:
        """``/job:localhost/replica:0/task:0/device:GPU:1``."""
        return f"/job:{self.job}/replica:{self.replica}/task:{self.task}/device:{self.device_type}:{self.index}"

    @property
    def is_gpu(self) -> bool:
        return self.device_type == "GPU"

    @property
    def short(self) -> str:
        """``/gpu:1`` style, for messages."""
        return f"/{self.device_type.lower()}:{self.index}"

    def __str__(self) -> str:
        return self.canonical


def _int(text: str, what: str, spec: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise InvalidArgumentError(f"invalid device {spec!r}: {what} {text!r} is not an integer") from None
    if value < 0:
        raise InvalidArgumentError(f"invalid device {spec!r}: {what} must be >= 0")
    return value


def _type_and_index(text: str, spec: str) -> tuple[str, int]:
    parts = text.split(":")
    kind = _TYPES.get(parts[0].lower())
    if kind is None or len(parts) > 2:
        raise InvalidArgumentError(f"invalid device {spec!r}: expected CPU or GPU (or cuda), got {text!r}")
    index = 0 if len(parts) == 1 or parts[1] in ("", "*") else _int(parts[1], "device index", spec)
    return kind, index


def parse_device(spec: "str | DeviceSpec") -> DeviceSpec:
    """Parses a device string in any usual spelling.

    Raises:
        ValueError: the string names no CPU or GPU device.
    """
    if isinstance(spec, DeviceSpec):
        return spec
    if not isinstance(spec, str):
        raise InvalidArgumentTypeError(f"a device is a string such as '/gpu:0', not {type(spec).__name__}")
    text = spec.strip()
    fields: dict[str, object] = {}
    pieces = [p for p in text.split("/") if p]
    if not pieces:
        raise InvalidArgumentError(f"invalid device {spec!r}: empty")
    for piece in pieces:
        m = _FIELD.match(piece)
        key, val = ("device", piece) if m is None else (m.group(1).lower(), m.group(2))
        if key in fields:
            raise InvalidArgumentError(f"invalid device {spec!r}: {key} given twice")
        if key == "job":
            if not val:
                raise InvalidArgumentError(f"invalid device {spec!r}: empty job")
            fields["job"] = val
        elif key in ("replica", "task"):
            fields[key] = _int(val, key, spec)
        else:
            fields["device"] = _type_and_index(val, spec)
    kind, index = fields.get("device", ("CPU", 0))  # type: ignore[misc]
    return DeviceSpec(
        job=str(fields.get("job", "localhost")),
        replica=int(fields.get("replica", 0)),  # type: ignore[arg-type]
        task=int(fields.get("task", 0)),  # type: ignore[arg-type]
        device_type=kind,
        index=index,
    )


def canonical_device(spec: "str | DeviceSpec") -> str:
    """The canonical string of a device, e.g. ``canonical_device("gpu:1")``."""
    return parse_device(spec).canonical


CPU0 = DeviceSpec()
