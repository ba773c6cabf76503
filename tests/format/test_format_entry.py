"""The hand-written entry codec against protobuf's generated classes, and its fast path."""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
from hypothesis import given, settings

import gpusaver.format.entry as E
from gpusaver._proto.tensor_bundle_pb2 import BundleEntryProto, BundleHeaderProto
from gpusaver.format import slices as S
from gpusaver.format.wire import Malformed

dims = st.sampled_from([0, 1, 2, 127, 128, 300, 2**20, 2**40])
entries = st.tuples(
    st.sampled_from([0, 1, 7, 14, 25, 127, 128, 200]),
    st.lists(dims, max_size=4).map(tuple),
    st.sampled_from([0, 1, 5, 2**31 - 1]),
    st.sampled_from([0, 5, 2**35]),
    st.sampled_from([0, 640, 2**33]),
    st.sampled_from([0, 1, 0xFFFFFFFF]),
)


def _general(data: bytes) -> object:
    saved = E._decode_common
    E._decode_common = lambda _: None
    try:
        return E.decode_entry(data)
    except Malformed as e:
        return type(e)
    finally:
        E._decode_common = saved


def _decode(data: bytes) -> object:
    try:
        return E.decode_entry(data)
    except Malformed as e:
        return type(e)


def _proto(dtype, shape, shard, offset, size, crc, slices=()) -> bytes:
    p = BundleEntryProto(dtype=dtype, shard_id=shard, offset=offset, size=size, crc32c=crc)
    p.shape.SetInParent()
    for d in shape:
        p.shape.dim.add(size=d)
    for extents in slices:
        s = p.slices.add()
        for start, length in extents:
            e = s.extent.add()
            if start:
                e.start = start
            if length != -1:
                e.length = length
    return p.SerializeToString(deterministic=True)


@settings(max_examples=400, deadline=None)
@given(entries)
def test_encode_matches_protobuf(args):
    assert E.encode_entry(*args) == _proto(*args)
    assert E.encode_entries([(args[0], args[1], args[3], args[4], args[5])], args[2]) == [_proto(*args)]


@settings(max_examples=400, deadline=None)
@given(entries, st.integers(0, 10**6), st.integers(0, 7))
def test_fast_decoder_agrees_with_the_general_one(args, where, bit):
    data = E.encode_entry(*args)
    assert _decode(data) == _general(data)
    mutated = bytearray(data)
    mutated[where % len(mutated)] ^= 1 << bit
    assert _decode(bytes(mutated)) == _general(bytes(mutated))


def test_sliced_entries_match_protobuf():
    extents = [[(0, 5), (0, -1)], [(5, 5), (0, -1)]]
    data = E.encode_entry(1, (10, 4), 0, 0, 0, 0, extents)
    assert data == _proto(1, (10, 4), 0, 0, 0, 0, extents)
    assert E.decode_entry(data).slices == extents
    assert S.encode_slice_proto([(0, -1)]) == b"\x0a\x00"


@pytest.mark.parametrize("num_shards", [1, 2, 300])
def test_header_matches_protobuf(num_shards):
    p = BundleHeaderProto(num_shards=num_shards)
    p.version.producer = 1
    assert E.encode_header(num_shards) == p.SerializeToString()
    assert E.decode_header(E.encode_header(num_shards)).num_shards == num_shards
