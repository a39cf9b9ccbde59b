"""A running webui, over HTTP only (and, for the built-in trainer's files, the webui machine's disk): the
client both benchmarks use, and the driver of the webui's own Textual Inversion trainer. Nothing of the
webui is imported; it sits above the hosts layer and below micro/ and bench/, which both use it."""
