"""One pure parser per wire format, behind one small interface (:class:`~sensord.formats.base.Parser`).

Formats never import the serving side (source, pipeline, sinks): the daemon picks a parser per
subscription with :func:`sensord.formats.build.build_parser` and feeds it bytes.
"""
