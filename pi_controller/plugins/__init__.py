"""Sandboxed Wasm control plugins: the Extism adapter, the sandbox, the set and its folder, grants."""
