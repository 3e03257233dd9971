"""The former name of ``initserve.safetensors_writer``, kept so that code written against it
(the client, branches in flight) still imports. New code imports safetensors_writer."""

from initserve.safetensors_writer import BodyWriter, FileMap, Part, map_file

Layout = FileMap
build_layout = map_file

__all__ = ["BodyWriter", "FileMap", "Layout", "Part", "build_layout", "map_file"]
