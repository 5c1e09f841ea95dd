"""The application layer: the `cmg` verb dispatcher and the end-to-end demo; the only layer
that knows every other one."""
