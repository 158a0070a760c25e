import triton

from sparse_rnnt.kernels.host import cdiv, next_power_of_2


def test_host_helpers_equal_tritons():
    # The launchers' plain-integer helpers against Triton's constexpr functions they replace.
    for a in [0, 1, 2, 3, 7, 8, 9, 255, 256, 257, 4095, 4097, 10**7 + 3]:
        assert next_power_of_2(a) == triton.next_power_of_2(a)
        for b in [1, 2, 3, 16, 64, 128, 4096]:
            assert cdiv(a, b) == triton.cdiv(a, b)
