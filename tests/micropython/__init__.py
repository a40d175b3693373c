"""The MicroPython portability ring: codecs compiled by mpy-cross and run under MicroPython."""
