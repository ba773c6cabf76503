"""Protocol buffer messages of the TensorFlow checkpoint format (private).

The modules here (``tensor_bundle_pb2``, ``tensor_shape_pb2``,
``tensor_slice_pb2``, ``types_pb2``, ``versions_pb2``, ``checkpoint_state_pb2``,
``saver_pb2``) are generated from ``protos/*.proto`` by ``protos/generate.py``;
do not edit them by hand. Their messages are wire-compatible with TensorFlow's
messages of the same names (package ``tensorflow``).

TensorFlow registers ``tensorflow.BundleEntryProto`` and the others in
protobuf's process-wide default descriptor pool, so registering ours there
too would clash when both are imported. The generated modules therefore add
their descriptors to :data:`POOL`, a descriptor pool private to gpusaver, and
create their classes with :func:`build_messages`, which registers nothing
globally. Both sets of classes then live in one process, in either import
order and with either protobuf runtime (upb or pure Python).

Top-level messages pickle (by ``__module__``); nested ones such as
``TensorShapeProto.Dim`` do not, because protobuf unpickles nested messages
through the default pool.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import descriptor as _descriptor
from google.protobuf import descriptor_pool, message, reflection
from google.protobuf.internal import enum_type_wrapper

__all__ = ["POOL", "build_messages"]

#: The descriptor pool that holds every message and enum of gpusaver._proto.
POOL: descriptor_pool.DescriptorPool = descriptor_pool.DescriptorPool()


def _message_class(
    desc: _descriptor.Descriptor, module_name: str, qualname_prefix: str
) -> type[message.Message]:
    """Create the class of one message (and, nested in it, of its nested messages)."""
    namespace: dict[str, Any] = {
        name: _message_class(nested, module_name, f"{qualname_prefix}{desc.name}.")
        for name, nested in desc.nested_types_by_name.items()
    }
    namespace["DESCRIPTOR"] = desc
    namespace["__module__"] = module_name
    namespace["__qualname__"] = qualname_prefix + desc.name
    return reflection.GeneratedProtocolMessageType(desc.name, (message.Message,), namespace)


def build_messages(
    file_descriptor: _descriptor.FileDescriptor, module_name: str, namespace: dict[str, Any]
) -> None:
    """Define a generated module's top-level enums and message classes.

    The generated modules call this in place of protobuf's
    ``builder.BuildTopDescriptorsAndMessages``. It defines the same names
    (``_DATATYPE``, ``DataType``, ``DT_FLOAT``, ..., ``BundleEntryProto``), but
    unlike protobuf's builder it does not register the classes in the default
    symbol database: with the pure-Python protobuf runtime that registration
    adds the descriptors to the default pool, where they would collide with
    TensorFlow's.

    Args:
        file_descriptor: the module's ``DESCRIPTOR``, from :data:`POOL`.
        module_name: the module's full name, used as the classes' ``__module__``
            so that messages pickle.
        namespace: the module's ``globals()``.
    """
    for name, enum_desc in file_descriptor.enum_types_by_name.items():
        namespace[f"_{name.upper()}"] = enum_desc
        namespace[name] = enum_type_wrapper.EnumTypeWrapper(enum_desc)
        for value in enum_desc.values:
            namespace[value.name] = value.number
    for name, msg_desc in file_descriptor.message_types_by_name.items():
        namespace[name] = _message_class(msg_desc, module_name, "")
