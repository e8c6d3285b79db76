import pytest
import torch

from comfyui_ternary_flux.ternary import packing


@pytest.mark.parametrize("k", [1, 3, 4, 5, 31, 127, 128, 129, 255, 640, 1000])
@pytest.mark.parametrize("layout", packing.PACKINGS)
def test_round_trip_any_k(layout, k):
    gen = torch.Generator().manual_seed(k)
    t = torch.randint(-1, 2, (7, k), generator=gen, dtype=torch.int8)
    packed = packing.pack(t, layout)
    assert tuple(packed.shape) == packing.packed_shape(layout, 7, k)
    assert packed.dtype == torch.uint8
    assert torch.equal(packing.unpack(packed, layout, k), t)


def test_2bit_layout_bit_by_bit():
    # Column 128 g + 32 j + b lives in bits 2j..2j+1 of byte 32 g + b, coded t + 1.
    k = 300
    t = torch.zeros(2, k, dtype=torch.int8)
    t[1, 128 + 64 + 5] = 1  # g = 1, j = 2, b = 5
    t[0, 37] = -1  # g = 0, j = 1, b = 5
    packed = packing.pack_2bit(t)
    zero = 0b01010101
    assert packed[1, 37] == 0b01 | 0b01 << 2 | 0b10 << 4 | 0b01 << 6
    assert packed[0, 5] == 0b01 | 0b00 << 2 | 0b01 << 4 | 0b01 << 6
    # Byte 64 + 20 of a K = 300 row holds columns 276 (real) and 308, 340, 372 (padding).
    assert packed[0, 64 + 20] == zero


def test_base3_bytes():
    t = torch.tensor([[1, 0, -1, 1, 1, -1]], dtype=torch.int8)
    packed = packing.pack_base3(t)
    assert packed.tolist() == [[2 + 3 * 1 + 9 * 0 + 27 * 2 + 81 * 2, 0 + 3 + 9 + 27 + 81]]
    assert torch.equal(packing.base3_to_2bit(packed, 6), packing.pack_2bit(t))


def test_bad_inputs_are_refused():
    with pytest.raises(TypeError, match="int8"):
        packing.pack_2bit(torch.zeros(2, 4))
    for layout in packing.PACKINGS:
        with pytest.raises(ValueError, match="-1, 0 or 1"):
            packing.pack(torch.tensor([[0, 2]], dtype=torch.int8), layout)
    with pytest.raises(ValueError, match="does not fit"):
        packing.unpack_2bit(torch.zeros(2, 32, dtype=torch.uint8), 200)
    with pytest.raises(ValueError, match="corrupt"):
        packing.unpack_base3(torch.full((1, 2), 250, dtype=torch.uint8), 10)
    with pytest.raises(ValueError, match="unknown packing"):
        packing.pack(torch.zeros(1, 1, dtype=torch.int8), "3bit")
