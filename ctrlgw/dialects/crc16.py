"""
The two 16-bit CRCs of the binary tracker protocols, table-driven and pure.

Both are reflected (least significant bit first) CRCs of the polynomials in their names;
the check values (of the ASCII bytes C{123456789}) are those of the CRC RevEng catalogue.
"""

from __future__ import annotations


def _table(reflectedPoly: int) -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ reflectedPoly if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_IBM = _table(0xA001)  # 0x8005 reflected
_CCITT = _table(0x8408)  # 0x1021 reflected


def crc16ibm(data: bytes) -> int:
    """
    CRC-16/ARC (Teltonika's "CRC-16/IBM"): poly 0x8005, init 0, no final xor; check 0xBB3D.
    """
    crc = 0
    for byte in data:
        crc = (crc >> 8) ^ _IBM[(crc ^ byte) & 0xFF]
    return crc


def crc16itu(data: bytes) -> int:
    """
    CRC-16/X-25 (Concox's "CRC-ITU"): poly 0x1021, init 0xFFFF, final xor 0xFFFF; check
    0x906E.
    """
    crc = 0xFFFF
    for byte in data:
        crc = (crc >> 8) ^ _CCITT[(crc ^ byte) & 0xFF]
    return crc ^ 0xFFFF
