"""pi-controller: a 10 Hz control daemon running sandboxed Wasm control plugins on a Raspberry Pi."""

__version__ = "0.1.0"
