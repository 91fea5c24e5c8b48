"""2-D images in and out: decoding with limits, bit depth, YCbCr colour, PNG output, input pairs, pair discovery
on disk and the 2-D phantoms. Imports nothing else of the project's (and never torch)."""
