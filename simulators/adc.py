"""A simulated MCP3008 on the SPI bus, serving voltages that models set."""

from __future__ import annotations

from pi_controller.devices.mcp3008 import SPI0_SELECT
from pi_controller.devices.pins import SimulatedFactory

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
        received = [(word >> (7 - i)) & 1 for word in words for i in range(8)]
        sent: list[int] = []
        reply: list[int] = []
        request: list[int] | None = None
        for bit in received:
            sent.append(reply.pop(0) if reply else 0)  # MISO is driven on the edge the request bit arrives
            if request is None:
                request = [] if bit else None
            elif len(request) < 4:
                request.append(bit)
                if len(request) == 4:
                    reply = self._answer(*request)
        return [int("".join(map(str, sent[i:i + 8])), 2) for i in range(0, len(sent), 8)]

    def _answer(self, single: int, c2: int, c1: int, c0: int) -> list[int]:
        channel = c2 << 2 | c1 << 1 | c0
        level = self.fractions[channel] if single else self.fractions[channel] - self.fractions[channel ^ 1]
        value = round(min(1.0, max(0.0, level)) * (2 ** BITS - 1))
        # A sample bit and a null bit come before the result.
        return [(value >> (BITS + 1 - i)) & 1 for i in range(BITS + 2)]

    def close(self) -> None:
        if self._factory.spi_chips.get(self._select) is self:
            del self._factory.spi_chips[self._select]
