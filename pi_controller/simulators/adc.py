"""A simulated MCP3008 on the SPI bus, serving voltages that models set."""

from __future__ import annotations

from pi_controller.devices.mcp3008 import SPI0_SELECT
from pi_controller.devices.mock_pins import SimulatedFactory

BITS = 10


class SimulatedMCP3008:
    """Answers single-ended and differential conversions with `fractions` of full scale (0..1),
    bit for bit as the chip does: a start bit, single/differential, three channel bits, then a null
    bit and the result, most significant bit first."""

    def __init__(self, factory: SimulatedFactory, chip_select: int):
        self.fractions = [0.0] * 8
        self._factory = factory
        self._select = f"GPIO{SPI0_SELECT[chip_select]}"
        factory.spi_chips[self._select] = self

    def transfer(self, words: list[int]) -> list[int]:
        """The chip's side of one transfer, on the words as integers (a read every sensor poll: bit by bit
        in Python was most of a simulated tick's reads). The request is the first 1 bit (the start bit)
        and the four bits after it; the reply's 12 bits go out on MISO from the bit after the request."""
        size = 8 * len(words)
        sent = int.from_bytes(bytes(words), "big")
        start = size - sent.bit_length()  # the start bit's index from the first bit sent
        if sent == 0 or start + 4 >= size:
            return [0] * len(words)
        request = (sent >> (size - start - 5)) & 0b1111
        reply = self._answer(request >> 3, request >> 2 & 1, request >> 1 & 1, request & 1)
        shift = size - (start + 5) - (BITS + 2)  # where the reply's last bit lands
        miso = reply << shift if shift >= 0 else reply >> -shift
        return list(miso.to_bytes(len(words), "big"))

    def _answer(self, single: int, c2: int, c1: int, c0: int) -> int:
        channel = c2 << 2 | c1 << 1 | c0
        level = self.fractions[channel] if single else self.fractions[channel] - self.fractions[channel ^ 1]
        # A sample bit and a null bit (both 0) come before the 10-bit result: 12 bits in all.
        return round(min(1.0, max(0.0, level)) * (2 ** BITS - 1))

    def close(self) -> None:
        if self._factory.spi_chips.get(self._select) is self:
            del self._factory.spi_chips[self._select]
