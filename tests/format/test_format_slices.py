"""Slice specs and the ordered-code slice keys, against the spec's worked values."""

from __future__ import annotations

import pytest

from gpusaver.format import slices as S


@pytest.mark.parametrize(
    "value, encoded",
    [(0, "80"), (5, "85"), (63, "bf"), (-1, "7f"), (-64, "40"), (100, "c064"), (8192, "e02000"),
     (2**20, "f0100000"), (2**40, "fd0000000000"), (2**55, "ff8080000000000000")],
)
def test_signed_num_increasing(value, encoded):
    assert S._signed_num_increasing(value).hex() == encoded


def test_slice_keys_from_the_spec():
    assert S.encode_slice_key("foo", S.parse_slice_spec("0,5:-")).hex() == "00666f6f0001010280858" + "07f"
    assert S.encode_slice_key("part", [(5, 5), (0, -1)]) == b"\x00part\x00\x01\x01\x02\x85\x85\x80\x7f"
    # 0x00 and 0xff in a name are escaped
    assert S.encode_slice_key(b"a\x00\xff", [(0, -1)]) == b"\x00a\x00\xff\xff\x00\x00\x01\x01\x01\x80\x7f"


def test_shape_and_slice():
    assert S.parse_shape_and_slice("10 4 0,5:-") == ([10, 4], [(0, 5), (0, -1)])
    assert S.format_slice_spec([(0, 5), (0, -1)]) == "0,5:-"
    assert S.is_full([10, 4], [(0, 10), (0, -1)])
    assert S.slice_shape([10, 4], [(2, 3), (0, -1)]) == [3, 4]
    for bad in ["10 4", "", "10 4 0,5", "10 4 0,11:-", "10 -4 0,5:-", "a 4 0,5:-"]:
        with pytest.raises(ValueError):
            S.parse_shape_and_slice(bad)
    for bad in ["0,0:-", "-1,5", "1,2,3", "x,1"]:
        with pytest.raises(ValueError):
            S.parse_slice_spec(bad)


def test_slice_proto_round_trip():
    extents = [(0, -1), (5, 5), (0, 5)]
    assert S.encode_slice_proto(extents).hex() == "0a000a04080510050a021005"
    assert S.decode_slice_proto(S.encode_slice_proto(extents)) == extents
