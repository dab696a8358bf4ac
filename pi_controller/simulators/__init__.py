"""Simulated physics for `--simulate` runs and `pi-controller simulate`.

Models drive gpiozero mock pins and a simulated MCP3008, so a simulated reading travels the same
path as a real one (pin or SPI bus, gpiozero device, sensor), and read actuators back from their pins.
"""
