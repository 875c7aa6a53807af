"""Volumes and chunked processing: the tensorstore volume store (`store`), MIP pyramids (`pyramid`),
PNG/TIFF import and export (`images`), chunking and chunked stack alignment (`chunking`, `chunked`),
volume pipelines (`pipeline`), executors (`distributed`) and device sharding (`sharding`)."""
