"""Stage 1, the data: the factor grid, the renderer and the official file, sharded HDF5.

grid (factor names, classes, indices) -> render / official (images) -> shards (the writer,
the manifest, checksums) -> reader (a training worker's batches). images holds the PNG and
raw byte forms of a binary image, groundtruth the true image of any grid index, readout the
classes an image reads back as over the whole grid.
"""
