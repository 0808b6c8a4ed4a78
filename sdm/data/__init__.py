"""Datasets on an object store: Parquet shards of encoded images and label maps, plus a JSON dataset card."""
