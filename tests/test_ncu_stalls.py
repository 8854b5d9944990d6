"""The ncu source-page summariser (scripts/ncu_stalls.py) on a hand-made two-launch CSV."""

from __future__ import annotations

import pytest
from ncu_stalls import opcode, parse

HEAD = '"Address","Source","Warp Stall Sampling (All Samples)","stall_barrier","stall_wait","stall_barrier (Not Issued)"\n'


def launch(name: str, rows: list[tuple[str, int, int, int]]) -> str:
    body = "".join(f'"0x{i:x}","{src}","{n}","{bar}","{wait}","0"\n' for i, (src, n, bar, wait) in enumerate(rows))
    return f'"Kernel Name","{name}",\n' + HEAD + body


def test_parse_splits_launches_and_counts_reasons_opcodes_and_hot_lines() -> None:
    text = launch("_extend_kernel", [("HGMMA.64x32x16.F32.BF16 R120, R152, gdesc[UR16].tnspB, R120", 5, 0, 5),
                                     ("BAR.SYNC.DEFER_BLOCKING 0x0", 1, 1, 0),
                                     ("@!PT  LDS RZ, [RZ]", 30, 30, 0)])
    text += launch("_decode_split_kernel", [("LDGSTS.E.BYPASS.128 desc[UR30][R88.64], P2, [R223]", 7, 0, 7)])
    first, second = parse(text)
    assert (first.kernel, first.samples, second.kernel, second.samples) == ("_extend_kernel", 36, "_decode_split_kernel", 7)
    assert first.by_reason == {"barrier": 31, "wait": 5}
    assert first.by_opcode == {"LDS": 30, "HGMMA": 5, "BAR": 1}
    assert first.hottest(1) == [(30, 2, "@!PT  LDS RZ, [RZ]")]
    assert second.by_opcode == {"LDGSTS": 7}


def test_opcode_drops_predicates_and_modifiers() -> None:
    assert opcode("@!PT  LDS RZ, [RZ]") == "LDS"
    assert opcode("WARPGROUP.DEPBAR.LE gsb0, 0x0") == "WARPGROUP"


def test_an_export_without_sampling_columns_is_refused_by_name() -> None:
    text = '"Kernel Name","k",\n"Address","Source"\n"0x0","EXIT"\n'
    with pytest.raises(ValueError, match="Warp Stall Sampling"):
        parse(text)
